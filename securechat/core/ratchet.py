"""Double Ratchet for one pairwise session (core: no I/O, randomness passed in).

Follows Signal's "The Double Ratchet Algorithm" (rev. 1, 2016-11-20), section 3,
with the recommended functions of section 5.2:

* ``KDF_RK(rk, dh_out)``: HKDF-SHA256, salt = rk, IKM = dh_out, info
  :data:`ROOT_INFO`, 64 bytes -> (new root key, chain key);
* ``KDF_CK(ck)``: HMAC-SHA256(ck, 0x01) = message key, HMAC-SHA256(ck, 0x02) =
  next chain key;
* ``ENCRYPT(mk, pt, ad)``: ChaCha20-Poly1305 (RFC 8439, pyca/cryptography)
  with key ``mk`` and a fresh random 12-byte nonce sent after the header;
  associated data is ``ad || header``. Message = ``header (41) || nonce (12)
  || ciphertext+tag``.

Why this AEAD and a random 96-bit nonce (ratchet version 2; version 1 used
XChaCha20-Poly1305 with a 24-byte nonce and cost about twice as much per
message through PyNaCl's wrapper). ``mk`` is a one-purpose key: it seals
exactly one message, so the nonce does not have to separate messages under a
key, and a fixed nonce would be sound in normal operation. The one way a key
seals twice is a crashed client restoring an older state and then sending a
*different* plaintext under the same ``mk``; a random nonce keeps
confidentiality and integrity there too unless two of those few messages draw
the same 96-bit nonce (probability about 2**-96 per pair). A nonce derived
from ``mk`` would not. Random 96-bit nonces are unsafe only for keys that
seal billions of messages, which a message key never does.

Theory of operation (states of one session)::

    responder, before first receive  --recv (DH step)-->  receiving, no send chain
    receiving, no send chain         --send (new DH key)--> sending + receiving
    sending + receiving              --recv new peer key--> receiving, no send chain
    initiator starts in "sending, no receive chain" and joins the cycle above.

One deliberate difference from the spec's pseudocode: the spec generates the
next sending key pair while *receiving* a new ratchet key. We defer it to the
next *send*, so decryption needs no randomness and is a pure function of the
state and the message. The sequence of root-key updates is identical (a peer
can only present a new ratchet key after receiving one of ours), so the keys
equal the spec's for the same random key pairs; the differential test checks
this against an independent implementation.

Failure rule: :func:`decrypt` never mutates the state. It returns the
plaintext and an :class:`Update` that the caller applies with :func:`apply`
only when it accepts the message. A forged, replayed or malformed message
raises :class:`AuthenticationError` and leaves the session exactly as it was,
so honest messages keep opening.
"""

from __future__ import annotations

import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securechat.core import dh
from securechat.errors import AuthenticationError, InvalidPublicKeyError, SessionError

Rng = Callable[[int], bytes]

# --- fixed by the primitives / the spec ---------------------------------------------------
KEY_SIZE: Final = 32  # X25519 keys, root/chain/message keys
TAG_SIZE: Final = 16  # Poly1305 tag
NONCE_SIZE: Final = 12  # ChaCha20-Poly1305 (RFC 8439); random, one message per key
MAX_COUNTER: Final = 2**32 - 1  # N and PN are u32 on the wire

# --- our format -----------------------------------------------------------------------------
RATCHET_VERSION: Final = 2  # 1 was XChaCha20-Poly1305 with a 24-byte nonce
_HEADER: Final = struct.Struct(">B32sII")  # version, ratchet public key, PN, N
HEADER_SIZE: Final = _HEADER.size  # 41
_BODY_START: Final = HEADER_SIZE + NONCE_SIZE
OVERHEAD: Final = _BODY_START + TAG_SIZE  # bytes a message adds to its plaintext
ROOT_INFO: Final = b"securechat/v1/ratchet/root"
MESSAGE_KEY_CONSTANT: Final = b"\x01"
CHAIN_KEY_CONSTANT: Final = b"\x02"

# --- bounds we chose --------------------------------------------------------------------------
# At most this many message keys are derived and stored for one incoming
# message (gap in one chain, or PN minus what we had received of the old one).
# Bounds the work a forged header can cause to MAX_SKIP HMAC pairs.
MAX_SKIP: Final = 1000
# Total skipped keys kept per session; beyond it the oldest are evicted (those
# messages, if they ever arrive, fail to open). Bounds memory and state size.
MAX_SKIPPED_KEYS: Final = 2000
# A DH step (X25519 + HKDF) measured against KDF_CK steps (two HMAC-SHA256): about 30x.
DH_STEP_COST: Final = 30

STATE_VERSION: Final = 1
_STATE_HEAD: Final = struct.Struct(">B32s32sBIIII")
_SKIPPED_ENTRY: Final = struct.Struct(">32sI32s")
_HAS_DHR: Final = 1
_HAS_SEND: Final = 2
_HAS_RECV: Final = 4


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """KDF_RK: (next root key, new chain key)."""
    out = HKDF(_SHA256, 2 * KEY_SIZE, salt=root_key, info=ROOT_INFO).derive(dh_out)
    return out[:KEY_SIZE], out[KEY_SIZE:]


_SHA256: Final = hashes.SHA256()
_HMAC: Final = crypto_hmac.HMAC


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK: (next chain key, message key).

    Both outputs are HMAC-SHA256 under the same key, so the key is set up once
    and the keyed state copied: the same two HMACs, cheaper than keying twice.
    """
    chain = _HMAC(chain_key, _SHA256)
    message = chain.copy()
    chain.update(CHAIN_KEY_CONSTANT)
    message.update(MESSAGE_KEY_CONSTANT)
    return chain.finalize(), message.finalize()


def seal(message_key: bytes, nonce: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """ENCRYPT: ChaCha20-Poly1305 ciphertext || tag."""
    return ChaCha20Poly1305(message_key).encrypt(nonce, plaintext, associated_data)


def open_sealed(
    message_key: bytes, nonce: bytes, ciphertext: bytes, associated_data: bytes
) -> bytes:
    """DECRYPT: the plaintext, or the one opaque AuthenticationError."""
    try:
        return ChaCha20Poly1305(message_key).decrypt(nonce, ciphertext, associated_data)
    except InvalidTag as exc:
        raise AuthenticationError() from exc


@dataclass(frozen=True, slots=True)
class Header:
    """The ratchet header, sent in clear and bound as associated data."""

    ratchet_key: bytes
    previous_count: int  # PN
    number: int  # N

    def encode(self) -> bytes:
        return _HEADER.pack(RATCHET_VERSION, self.ratchet_key, self.previous_count, self.number)

    @classmethod
    def decode(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise AuthenticationError()
        version, key, pn, n = _HEADER.unpack(data)
        if version != RATCHET_VERSION:
            raise AuthenticationError()
        return cls(key, pn, n)


SkippedKey = tuple[bytes, int]  # (ratchet public key, message number)
KeyEntry = tuple[SkippedKey, bytes]


@dataclass(slots=True)
class RatchetState:
    """All secrets of one session direction pair (spec section 3.2 names in comments)."""

    root_key: bytes  # RK
    dhs_private: bytes  # DHs
    dhs_public: bytes
    dhr: bytes | None  # DHr
    send_chain: bytes | None  # CKs; None: the next send starts a DH step
    recv_chain: bytes | None  # CKr
    ns: int = 0
    nr: int = 0
    pn: int = 0
    # MKSKIPPED, insertion-ordered so the oldest entry is evicted first (in O(1):
    # deleting a plain dict's first key again and again makes each next one slower to find)
    skipped: OrderedDict[SkippedKey, bytes] = field(default_factory=OrderedDict)

    def __repr__(self) -> str:  # never print keys
        return (
            f"RatchetState(ns={self.ns}, nr={self.nr}, pn={self.pn}, skipped={len(self.skipped)})"
        )


def _keypair(rng: Rng) -> tuple[bytes, bytes]:
    private = rng(KEY_SIZE)
    if len(private) != KEY_SIZE:
        raise SessionError("random source returned the wrong number of bytes")
    return private, dh.public_key(private)


def init_initiator(shared_key: bytes, peer_ratchet_key: bytes, rng: Rng) -> RatchetState:
    """RatchetInitAlice: the initiator's first sending chain from SK and Bob's key."""
    private, public = _keypair(rng)
    root, chain = kdf_rk(shared_key, dh.x25519(private, peer_ratchet_key))
    return RatchetState(root, private, public, peer_ratchet_key, chain, None)


def init_responder(shared_key: bytes, own_private: bytes, own_public: bytes) -> RatchetState:
    """RatchetInitBob: the key pair Alice used (signed prekey or identity key)."""
    return RatchetState(shared_key, own_private, own_public, None, None, None)


def _start_sending(state: RatchetState, rng: Rng) -> bytes:
    """The send half of a DH ratchet step, deferred to the first send (see above)."""
    if state.dhr is None:
        raise SessionError("this session cannot send before it has received a message")
    private, public = _keypair(rng)
    root, chain = kdf_rk(state.root_key, dh.x25519(private, state.dhr))
    state.dhs_private, state.dhs_public = private, public
    state.root_key, state.send_chain = root, chain
    return chain


def encrypt(state: RatchetState, plaintext: bytes, ad: bytes, rng: Rng) -> bytes:
    """RatchetEncrypt: returns ``header || nonce || ciphertext`` and advances the state."""
    chain = state.send_chain
    if chain is None:
        chain = _start_sending(state, rng)
    number = state.ns
    if number >= MAX_COUNTER:
        raise SessionError("sending chain exhausted; start a new session")
    nonce = rng(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise SessionError("random source returned the wrong number of bytes")
    state.send_chain, message_key = kdf_ck(chain)
    state.ns = number + 1
    header = _HEADER.pack(RATCHET_VERSION, state.dhs_public, state.pn, number)
    sealed = ChaCha20Poly1305(message_key).encrypt(nonce, plaintext, ad + header)
    return b"".join((header, nonce, sealed))


class Update(NamedTuple):
    """What :func:`apply` changes after an accepted :func:`decrypt`.

    An immutable tuple rather than a frozen dataclass: one is built per
    received message, and a tuple costs a third as much to construct.
    """

    used_skipped: SkippedKey | None = None
    root_key: bytes | None = None  # set when a DH step happened
    dhr: bytes | None = None
    recv_chain: bytes = b""
    nr: int = 0
    new_skipped: tuple[tuple[SkippedKey, bytes], ...] = ()


def _skip(chain: bytes, start: int, until: int, ratchet_key: bytes) -> tuple[bytes, list[KeyEntry]]:
    if until - start > MAX_SKIP:
        raise AuthenticationError()
    keys: list[KeyEntry] = []
    for n in range(start, until):
        chain, mk = kdf_ck(chain)
        keys.append(((ratchet_key, n), mk))
    return chain, keys


def can_step(state: RatchetState) -> bool:
    """Whether a message with a *new* ratchet key may belong to this session.

    The peer makes a new ratchet key only after it received one of ours, and
    we make one only at our first send after a DH step. So a new key is
    possible only if we have sent since our last step (a sending chain), or
    if we never received at all (a responder's fresh session). Anything else
    is a forgery, refused without spending a DH on it.
    """
    return state.send_chain is not None or state.dhr is None


def work(state: RatchetState, message: bytes) -> int | None:
    """What :func:`decrypt` would spend on ``message``, in KDF_CK steps (a DH step
    counts :data:`DH_STEP_COST`); None if this session cannot open it at all.

    Cheap (it reads only the header), so a receiver can pick the session whose
    ratchet key matches and charge the work against a budget before doing it.
    """
    if len(message) < OVERHEAD:
        return None
    fields: tuple[int, bytes, int, int] = _HEADER.unpack_from(message)
    version, ratchet_key, previous_count, number = fields
    if version != RATCHET_VERSION:
        return None
    if (ratchet_key, number) in state.skipped:
        return 0
    dhr = state.dhr
    if dhr is not None and hmac.compare_digest(ratchet_key, dhr):
        if state.recv_chain is None or number < state.nr or number - state.nr > MAX_SKIP:
            return None
        return number - state.nr + 1
    if not can_step(state) or number > MAX_SKIP:
        return None
    old = 0
    if state.recv_chain is not None:
        old = previous_count - state.nr
        if not 0 <= old <= MAX_SKIP:
            return None
    return DH_STEP_COST + number + 1 + old


def decrypt(state: RatchetState, message: bytes, ad: bytes) -> tuple[bytes, Update]:
    """RatchetDecrypt without side effects: (plaintext, update to apply).

    On a DH step the skipped keys of the old receiving chain (up to PN) are
    derived only after the message opened: they change nothing the new chain
    needs, and a forged header then costs one DH and its own chain's steps.
    """
    if len(message) < OVERHEAD:
        raise AuthenticationError()
    version, ratchet_key, previous_count, number = _HEADER.unpack_from(message)
    if version != RATCHET_VERSION:
        raise AuthenticationError()
    nonce, body = message[HEADER_SIZE:_BODY_START], message[_BODY_START:]
    full_ad = ad + message[:HEADER_SIZE]
    if state.skipped:
        slot = (ratchet_key, number)
        skipped_key = state.skipped.get(slot)
        if skipped_key is not None:
            return open_sealed(skipped_key, nonce, body, full_ad), Update(slot)
    new_keys: list[KeyEntry] | tuple[()] = ()
    root: bytes | None = None
    dhr = state.dhr
    old_chain = None
    if dhr is not None and hmac.compare_digest(ratchet_key, dhr):
        if state.recv_chain is None or number < state.nr:
            raise AuthenticationError()  # key already used and deleted: a replay
        chain, start = state.recv_chain, state.nr
    else:
        if state.recv_chain is not None and dhr is not None:
            if not 0 <= previous_count - state.nr <= MAX_SKIP:
                raise AuthenticationError()
            old_chain = state.recv_chain
        try:
            shared = dh.x25519(state.dhs_private, ratchet_key)
        except InvalidPublicKeyError as exc:
            raise AuthenticationError() from exc
        root, chain = kdf_rk(state.root_key, shared)
        start = 0
    if number != start:
        chain, new_keys = _skip(chain, start, number, ratchet_key)
    chain, message_key = kdf_ck(chain)
    plaintext = open_sealed(message_key, nonce, body, full_ad)
    if old_chain is not None and dhr is not None:
        _, old_keys = _skip(old_chain, state.nr, previous_count, dhr)
        new_keys = [*old_keys, *new_keys]
    return plaintext, Update(None, root, ratchet_key, chain, number + 1, tuple(new_keys))


def apply(state: RatchetState, update: Update) -> None:
    """Commit an accepted decryption: delete used keys, store skipped ones."""
    if update.used_skipped is not None:
        del state.skipped[update.used_skipped]
        return
    if update.root_key is not None:  # DH ratchet step (spec DHRatchet, send half deferred)
        state.pn, state.ns = state.ns, 0
        state.send_chain = None
        state.root_key = update.root_key
    state.dhr = update.dhr
    state.recv_chain, state.nr = update.recv_chain, update.nr
    if update.new_skipped:
        skipped = state.skipped
        skipped.update(update.new_skipped)
        while len(skipped) > MAX_SKIPPED_KEYS:
            skipped.popitem(last=False)


# --- persistence ------------------------------------------------------------------------------


def serialize(state: RatchetState) -> bytes:
    """Versioned binary form; the public key is recomputed on load."""
    flags = (
        (_HAS_DHR if state.dhr is not None else 0)
        | (_HAS_SEND if state.send_chain is not None else 0)
        | (_HAS_RECV if state.recv_chain is not None else 0)
    )
    parts = [
        _STATE_HEAD.pack(
            STATE_VERSION,
            state.root_key,
            state.dhs_private,
            flags,
            state.ns,
            state.nr,
            state.pn,
            len(state.skipped),
        )
    ]
    parts += [x for x in (state.dhr, state.send_chain, state.recv_chain) if x is not None]
    parts += [_SKIPPED_ENTRY.pack(k, n, mk) for (k, n), mk in state.skipped.items()]
    return b"".join(parts)


def deserialize(data: bytes) -> RatchetState:
    """Inverse of :func:`serialize`; SessionError on anything non-canonical."""
    if len(data) < _STATE_HEAD.size:
        raise SessionError("session state is truncated")
    version, root, private, flags, ns, nr, pn, count = _STATE_HEAD.unpack_from(data)
    if version != STATE_VERSION or flags & ~(_HAS_DHR | _HAS_SEND | _HAS_RECV):
        raise SessionError("session state has an unknown version or flags")
    optional = [bool(flags & bit) for bit in (_HAS_DHR, _HAS_SEND, _HAS_RECV)]
    expected = _STATE_HEAD.size + KEY_SIZE * sum(optional) + count * _SKIPPED_ENTRY.size
    if count > MAX_SKIPPED_KEYS or len(data) != expected:
        raise SessionError("session state has the wrong length")
    offset = _STATE_HEAD.size
    values: list[bytes | None] = []
    for present in optional:
        values.append(data[offset : offset + KEY_SIZE] if present else None)
        offset += KEY_SIZE if present else 0
    dhr, send_chain, recv_chain = values
    skipped: OrderedDict[SkippedKey, bytes] = OrderedDict()
    for k, n, mk in _SKIPPED_ENTRY.iter_unpack(data[offset:]):
        skipped[(k, n)] = mk
    if len(skipped) != count:
        raise SessionError("session state repeats a skipped key")
    public = dh.public_key(private)
    return RatchetState(root, private, public, dhr, send_chain, recv_chain, ns, nr, pn, skipped)
