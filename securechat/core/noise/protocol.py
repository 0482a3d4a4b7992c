"""The client<->relay link: Noise handshake and transport records (core: no I/O).

Why Noise: the relay must know *cryptographically* whose mailbox a connection
may read, and the client must know it talks to the relay it pinned. The link is
``Noise_XX_25519_ChaChaPoly_BLAKE2s`` (Noise spec revision 34): the client's
Noise static key IS its X25519 identity key, the relay's static key is the key
clients pin. XX hides the client's identity from passive observers and from an
active attacker who does not hold the relay's key (the client sends ``s`` in
message 3 only after checking the relay's ``s`` from message 2).

Layers in this module, bottom up:

* :class:`CipherState`, ``_SymmetricState``, :class:`HandshakeState`: the Noise
  objects of spec sections 5.1-5.3, for every non-PSK pattern of sections 7.4,
  7.5 and 18 (one-way, fundamental and deferred), with the 25519 DH, the
  ChaChaPoly cipher and the BLAKE2s or SHA256 hash. They are checked against
  the public cacophony and snow vectors.
* :class:`NoiseConnection`: the sans-I/O link. Bytes from the socket go in,
  events, application plaintext and bytes to write back come out.

Records on TCP: every Noise message (handshake or transport) is prefixed by its
length as 2 bytes big-endian. A length below 16 (the AEAD tag) is refused, and
during the handshake a length above ``MAX_HANDSHAKE_RECORD`` (1,120) is refused, both
as soon as the 2 header bytes are seen, before anything is buffered. A handshake
payload above ``MAX_HANDSHAKE_PAYLOAD`` (1,024) is refused after decryption (message 3
could carry up to 1,056 bytes in a 1,120-byte record).

NoiseConnection states and transitions (anything else is a failure)::

    state            input                      -> next state
    INIT_START       initiate() -> msg 1         -> INIT_WAIT_2
    INIT_WAIT_2      record msg 2, verify_remote -> TRANSPORT (msg 3 returned)
    RESP_WAIT_1      record msg 1 (empty payload)-> RESP_WAIT_3 (msg 2 returned)
    RESP_WAIT_3      record msg 3, verify_remote -> TRANSPORT (HandshakeComplete)
    TRANSPORT        record                     -> TRANSPORT (plaintext out)
    any              bad record / error         -> FAILED (terminal)

A bad record during the handshake raises :class:`HandshakeError`; after it,
:class:`AuthenticationError` (one opaque error: tampering, replay, reordering
and truncation all look the same). ``verify_remote`` errors propagate as they
are. After any error every later call raises :class:`ProtocolError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from securechat.core import dh
from securechat.errors import (
    AuthenticationError,
    HandshakeError,
    InvalidPublicKeyError,
    ProtocolError,
    UsageError,
)

# --- fixed by the Noise specification (rev. 34) and the chosen suite ---------------
MAX_MESSAGE: Final = 65535  # Noise messages are at most 65535 bytes, tag included
TAG_SIZE: Final = 16  # ChaChaPoly authentication tag
MAX_PLAINTEXT: Final = MAX_MESSAGE - TAG_SIZE
DHLEN: Final = 32  # X25519 public key size
HASHLEN: Final = 32  # BLAKE2s and SHA256 digest size
KEY_SIZE: Final = 32  # ChaChaPoly key size
MAX_NONCE: Final = 2**64 - 1  # reserved by the spec: never used to encrypt
_NONCE_PAD: Final = b"\x00\x00\x00\x00"  # ChaChaPoly nonce = 4 zero bytes || LE64(n)
_ZERO_DH: Final = bytes(DHLEN)

# --- securechat link choices ----------------------------------------------------------
PROTOCOL_NAME: Final = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"
PATTERN: Final = "XX"
PROLOGUE: Final = b"securechat/v1 relay link"
RECORD_HEADER: Final = 2  # 2-byte big-endian length before every Noise message
MIN_RECORD: Final = TAG_SIZE  # no valid Noise message of ours is shorter than a tag
_STATIC_CACHE: Final = 16  # loaded static keys kept (relay: 1; a client: a few identities)
MAX_HANDSHAKE_PAYLOAD: Final = 1024  # chosen: bounds what an unauthenticated peer makes us buffer
# Longest XX handshake message (message 2): e + encrypted s + encrypted payload = 1,120.
# Message 3 (encrypted s + encrypted payload) fits a longer payload in the same record
# length, so the payload bound is checked on its own after decryption.
MAX_HANDSHAKE_RECORD: Final = DHLEN + (DHLEN + TAG_SIZE) + MAX_HANDSHAKE_PAYLOAD + TAG_SIZE

# --- handshake patterns (spec sections 7.4, 7.5, 18) ----------------------------------
# Each pattern: (initiator pre-message, responder pre-message, message patterns).
# Messages alternate initiator -> responder, responder -> initiator, ...
_Pattern = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, ...], ...]]


def _p(pre_i: str, pre_r: str, *messages: str) -> _Pattern:
    return (
        tuple(pre_i.split()),
        tuple(pre_r.split()),
        tuple(tuple(m.replace(",", " ").split()) for m in messages),
    )


PATTERNS: Final[dict[str, _Pattern]] = {
    # one-way
    "N": _p("", "s", "e, es"),
    "K": _p("s", "s", "e, es, ss"),
    "X": _p("", "s", "e, es, s, ss"),
    # fundamental interactive
    "NN": _p("", "", "e", "e, ee"),
    "NK": _p("", "s", "e, es", "e, ee"),
    "NX": _p("", "", "e", "e, ee, s, es"),
    "XN": _p("", "", "e", "e, ee", "s, se"),
    "XK": _p("", "s", "e, es", "e, ee", "s, se"),
    "XX": _p("", "", "e", "e, ee, s, es", "s, se"),
    "KN": _p("s", "", "e", "e, ee, se"),
    "KK": _p("s", "s", "e, es, ss", "e, ee, se"),
    "KX": _p("s", "", "e", "e, ee, se, s, es"),
    "IN": _p("", "", "e, s", "e, ee, se"),
    "IK": _p("", "s", "e, es, s, ss", "e, ee, se"),
    "IX": _p("", "", "e, s", "e, ee, se, s, es"),
    # deferred
    "NK1": _p("", "s", "e", "e, ee, es"),
    "NX1": _p("", "", "e", "e, ee, s", "es"),
    "X1N": _p("", "", "e", "e, ee", "s", "se"),
    "X1K": _p("", "s", "e, es", "e, ee", "s", "se"),
    "XK1": _p("", "s", "e", "e, ee, es", "s, se"),
    "X1K1": _p("", "s", "e", "e, ee, es", "s", "se"),
    "X1X": _p("", "", "e", "e, ee, s, es", "s", "se"),
    "XX1": _p("", "", "e", "e, ee, s", "es, s, se"),
    "X1X1": _p("", "", "e", "e, ee, s", "es, s", "se"),
    "K1N": _p("s", "", "e", "e, ee", "se"),
    "K1K": _p("s", "s", "e, es", "e, ee", "se"),
    "KK1": _p("s", "s", "e", "e, ee, se, es"),
    "K1K1": _p("s", "s", "e", "e, ee, es", "se"),
    "K1X": _p("s", "", "e", "e, ee, s, es", "se"),
    "KX1": _p("s", "", "e", "e, ee, se, s", "es"),
    "K1X1": _p("s", "", "e", "e, ee, s", "se, es"),
    "I1N": _p("", "", "e, s", "e, ee", "se"),
    "I1K": _p("", "s", "e, es, s", "e, ee", "se"),
    "IK1": _p("", "s", "e, s", "e, ee, se, es"),
    "I1K1": _p("", "s", "e, s", "e, ee, es", "se"),
    "I1X": _p("", "", "e, s", "e, ee, s, es", "se"),
    "IX1": _p("", "", "e, s", "e, ee, se, s", "es"),
    "I1X1": _p("", "", "e, s", "e, ee, s", "se, es"),
}
ONE_WAY_PATTERNS: Final = frozenset({"N", "K", "X"})

_HASHES: Final[dict[str, Callable[[], hashes.HashAlgorithm]]] = {
    "BLAKE2s": lambda: hashes.BLAKE2s(HASHLEN),
    "SHA256": hashes.SHA256,
}


def parse_protocol_name(name: bytes) -> tuple[str, str]:
    """Return (pattern, hash name) of a Noise protocol name we implement.

    Raises :class:`HandshakeError` for anything else (PSK modifiers, other DH
    or cipher functions), so a caller never runs a protocol half-supported.
    """
    try:
        prefix, pattern, dh_name, cipher, hash_name = name.decode("ascii").split("_")
    except (UnicodeDecodeError, ValueError):
        raise HandshakeError(f"unsupported Noise protocol name {name!r}") from None
    if (
        prefix != "Noise"
        or pattern not in PATTERNS
        or dh_name != "25519"
        or cipher != "ChaChaPoly"
        or hash_name not in _HASHES
    ):
        raise HandshakeError(f"unsupported Noise protocol name {name!r}")
    return pattern, hash_name


class CipherState:
    """Spec section 5.1: a key and a 64-bit nonce counter.

    The AEAD object is built once per key, as the relay encrypts and decrypts
    many records per connection. Nonce 2^64-1 is never used: a sender or
    receiver that reaches it raises instead of wrapping around.
    """

    __slots__ = ("_aead", "_key", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise HandshakeError("Noise cipher key must be 32 bytes")
        self._key = key
        self._aead = ChaCha20Poly1305(key)
        self.n = 0

    def has_key(self) -> bool:
        return self._aead is not None

    def set_nonce(self, nonce: int) -> None:
        self.n = nonce

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes | memoryview) -> bytes:
        """Encrypt with the next nonce (identity before a key is set, as the spec says)."""
        if self._aead is None:
            return bytes(plaintext)
        n = self.n
        if n >= MAX_NONCE:
            raise ProtocolError("link nonce exhausted: reconnect to get fresh keys")
        out = self._aead.encrypt(_NONCE_PAD + n.to_bytes(8, "little"), plaintext, ad)
        self.n = n + 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes | memoryview) -> bytes:
        """Decrypt with the next nonce; any failure is one opaque AuthenticationError."""
        if self._aead is None:
            return bytes(ciphertext)
        n = self.n
        if n >= MAX_NONCE:
            raise AuthenticationError()
        try:
            out = self._aead.decrypt(_NONCE_PAD + n.to_bytes(8, "little"), ciphertext, ad)
        except InvalidTag:
            raise AuthenticationError() from None
        self.n = n + 1
        return out

    def rekey(self) -> None:
        """Spec section 4.2 REKEY: k = ENCRYPT(k, maxnonce, zerolen, zeros)[:32]."""
        if self._aead is None:
            raise HandshakeError("cannot rekey a cipher state without a key")
        nonce = _NONCE_PAD + MAX_NONCE.to_bytes(8, "little")
        new_key = self._aead.encrypt(nonce, bytes(KEY_SIZE), b"")[:KEY_SIZE]
        n = self.n
        self.initialize_key(new_key)
        self.n = n


_KeyPair = dh.KeyPair  # the name the tests use; see securechat.core.dh for why libsodium


@functools.lru_cache(maxsize=_STATIC_CACHE)
def _static_keypair(private: bytes) -> _KeyPair:
    """Load a static key once: the relay uses one key for every connection."""
    return _KeyPair(private)


class _SymmetricState:
    """Spec section 5.2: chaining key, handshake hash and the handshake cipher."""

    __slots__ = ("_algorithm", "cipher", "ck", "h")

    def __init__(self, protocol_name: bytes, hash_name: str) -> None:
        self._algorithm = _HASHES[hash_name]()
        if len(protocol_name) <= HASHLEN:
            self.h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self.h = self._digest(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def _digest(self, data: bytes) -> bytes:
        digest = hashes.Hash(self._algorithm)
        digest.update(data)
        return digest.finalize()

    def _hmac(self, key: bytes, data: bytes) -> bytes:
        """HMAC from ``cryptography`` (we use no hash or MAC code of our own).

        It costs ~6 us a call against ~2 us for an inlined stdlib version; a
        handshake makes a dozen, and we accept the price (docs/performance.md).
        """
        mac = hmac.HMAC(key, self._algorithm)
        mac.update(data)
        return mac.finalize()

    def _hkdf(self, ikm: bytes) -> tuple[bytes, bytes]:
        """Spec section 4.3 HKDF with two outputs."""
        temp = self._hmac(self.ck, ikm)
        out1 = self._hmac(temp, b"\x01")
        out2 = self._hmac(temp, out1 + b"\x02")
        return out1, out2

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = self._hkdf(ikm)
        self.cipher.initialize_key(key[:KEY_SIZE])

    def mix_hash(self, data: bytes) -> None:
        self.h = self._digest(self.h + data)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = self._hkdf(b"")
        return CipherState(k1[:KEY_SIZE]), CipherState(k2[:KEY_SIZE])


class HandshakeState:
    """Spec section 5.3 for one handshake; messages must be taken in turn.

    ``pattern`` names the handshake pattern (e.g. ``"XX"``); the full protocol
    name defaults to ``Noise_<pattern>_25519_ChaChaPoly_BLAKE2s``.
    ``ephemeral_private`` exists for known-answer tests; otherwise ``rng`` draws
    the ephemeral key. Any failure leaves the object unusable (Noise gives no
    way to resume a handshake after a bad message).
    """

    def __init__(
        self,
        pattern: str,
        initiator: bool,
        *,
        protocol_name: bytes | None = None,
        static_private: bytes | None = None,
        remote_static: bytes | None = None,
        prologue: bytes = b"",
        ephemeral_private: bytes | None = None,
        rng: Callable[[int], bytes] | None = None,
    ) -> None:
        if protocol_name is None:
            protocol_name = f"Noise_{pattern}_25519_ChaChaPoly_BLAKE2s".encode("ascii")
        named_pattern, hash_name = parse_protocol_name(protocol_name)
        if named_pattern != pattern:
            raise UsageError(f"pattern {pattern!r} does not match {protocol_name!r}")
        pre_i, pre_r, self._messages = PATTERNS[pattern]
        self._initiator = initiator
        self._one_way = pattern in ONE_WAY_PATTERNS
        self._rng = rng
        self._s = _static_keypair(bytes(static_private)) if static_private is not None else None
        self._e = _KeyPair(ephemeral_private) if ephemeral_private is not None else None
        self._rs = remote_static
        self._re: bytes | None = None
        self._index = 0
        self._failed = False
        self._ss = _SymmetricState(protocol_name, hash_name)
        self._ss.mix_hash(prologue)
        # Pre-message keys are hashed initiator's first, whichever side we are.
        self._mix_premessage(pre_i, ours=initiator)
        self._mix_premessage(pre_r, ours=not initiator)

    def _mix_premessage(self, tokens: tuple[str, ...], *, ours: bool) -> None:
        for step in tokens:
            if step != "s":
                raise UsageError(f"unsupported pre-message token {step!r}")
            key = (self._s.public if self._s else None) if ours else self._rs
            if key is None:
                who = "our static private key" if ours else "the peer's static public key"
                raise UsageError(f"this Noise pattern needs {who} in advance")
            if len(key) != DHLEN:
                raise InvalidPublicKeyError("X25519 public keys must be 32 bytes")
            self._ss.mix_hash(key)

    # --- public state -------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._index >= len(self._messages)

    @property
    def remote_static(self) -> bytes | None:
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        return self._ss.h

    @property
    def message_index(self) -> int:
        return self._index

    def _my_turn(self) -> bool:
        return (self._index % 2 == 0) == self._initiator or (self._one_way and self._initiator)

    def _check_turn(self, writing: bool) -> None:
        if self._failed:
            raise HandshakeError("the handshake already failed; start a new connection")
        if self.complete:
            raise HandshakeError("the handshake is already complete")
        if self._my_turn() != writing:
            raise HandshakeError("handshake message out of turn")

    # --- DH tokens --------------------------------------------------------------------
    def _dh(self, token: str) -> bytes:
        """Run the DH a token names from our side (spec section 5.3)."""
        local_e = token[0] == "e" if self._initiator else token[1] == "e"
        remote_e = token[1] == "e" if self._initiator else token[0] == "e"
        private = self._e if local_e else self._s
        public = self._re if remote_e else self._rs
        if private is None or public is None:
            raise HandshakeError(f"handshake token {token!r} needs a key we do not have")
        return private.dh(public)

    # --- messages ---------------------------------------------------------------------
    def write_message(self, payload: bytes = b"") -> bytes:
        """Produce the next handshake message carrying ``payload``.

        A DH with a low-order key the peer sent earlier fails here, as a
        :class:`HandshakeError` like every other fault of the peer's messages.
        """
        self._check_turn(writing=True)
        try:
            out = self._write_tokens(payload)
        except InvalidPublicKeyError as exc:
            self._failed = True
            raise HandshakeError(f"handshake refused: {exc}") from exc
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return out

    def _write_tokens(self, payload: bytes) -> bytes:
        ss = self._ss
        parts: list[bytes] = []
        for step in self._messages[self._index]:
            if step == "e":
                if self._e is None:
                    if self._rng is None:
                        raise UsageError("HandshakeState needs an rng to make ephemeral keys")
                    self._e = _KeyPair(self._rng(dh.KEY_SIZE))
                parts.append(self._e.public)
                ss.mix_hash(self._e.public)
            elif step == "s":
                if self._s is None:
                    raise UsageError("this Noise pattern needs our static private key")
                parts.append(ss.encrypt_and_hash(self._s.public))
            else:
                ss.mix_key(self._dh(step))
        parts.append(ss.encrypt_and_hash(payload))
        message = b"".join(parts)
        if len(message) > MAX_MESSAGE:
            raise UsageError("handshake payload too large for one Noise message")
        return message

    def read_message(self, message: bytes) -> bytes:
        """Consume the peer's next handshake message; return its payload.

        Every failure (short message, low-order key, failed decryption) is a
        :class:`HandshakeError`, and the handshake cannot continue.
        """
        self._check_turn(writing=False)
        try:
            payload = self._read_tokens(bytes(message))
        except AuthenticationError:
            self._failed = True
            raise HandshakeError(
                "handshake message failed authentication (wrong key or tampering)"
            ) from None
        except InvalidPublicKeyError as exc:
            self._failed = True
            raise HandshakeError(f"handshake refused: {exc}") from exc
        except BaseException:
            self._failed = True
            raise
        self._index += 1
        return payload

    def _read_tokens(self, message: bytes) -> bytes:
        ss = self._ss
        pos = 0
        for step in self._messages[self._index]:
            if step == "e":
                self._re = message[pos : pos + DHLEN]
                pos += DHLEN
                if len(self._re) != DHLEN:
                    raise HandshakeError("handshake message too short")
                ss.mix_hash(self._re)
            elif step == "s":
                size = DHLEN + TAG_SIZE if ss.cipher.has_key() else DHLEN
                encrypted = message[pos : pos + size]
                pos += size
                if len(encrypted) != size:
                    raise HandshakeError("handshake message too short")
                self._rs = ss.decrypt_and_hash(encrypted)
            else:
                ss.mix_key(self._dh(step))
        rest = message[pos:]
        if ss.cipher.has_key() and len(rest) < TAG_SIZE:
            raise HandshakeError("handshake message too short")
        return ss.decrypt_and_hash(rest)

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator->responder, responder->initiator) transport ciphers."""
        if not self.complete or self._failed:
            raise HandshakeError("the handshake is not complete")
        return self._ss.split()
