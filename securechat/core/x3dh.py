"""X3DH: start a session with a peer who may be offline (core: no I/O).

Follows Signal's "The X3DH Key Agreement Protocol" (rev. 1, 2016-11-04) with
curve X25519, hash SHA-256 and info :data:`X3DH_INFO`, except for the
signature scheme: the signed prekey is signed with the identity's Ed25519 key
(``keys.Identity.sign``) instead of XEdDSA, because XEdDSA needs curve
arithmetic that our primitive libraries do not expose. The Ed25519 public key
travels with the X25519 identity key everywhere (``.pub`` line, initial
message header, associated data), so a peer always verifies against the key
they already trust.

Initiator (Alice) with Bob's bundle::

    DH1 = DH(IK_A, SPK_B)  DH2 = DH(EK_A, IK_B)  DH3 = DH(EK_A, SPK_B)
    DH4 = DH(EK_A, OPK_B)  (only when a one-time prekey was handed out)
    SK  = HKDF-SHA256(salt = 32 zero bytes, IKM = F || DH1 || DH2 || DH3 [|| DH4],
                      info = "securechat/v1/x3dh", L = 32),  F = 32 bytes 0xFF
    AD  = IK_A.dh || IK_A.sign || IK_B.dh || IK_B.sign

Fallback when Bob never published a bundle (documented weaker property: no
forward secrecy against a later compromise of Bob's identity key for the
messages sent before Bob replies, and the first message is replayable, which
the session layer stops with its cache of seen ephemeral keys)::

    SK = HKDF(F || DH(IK_A, IK_B) || DH(EK_A, IK_B), info = "securechat/v1/x3dh-fallback")

and Bob's identity key plays the signed prekey's role as his first ratchet key.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securechat.core import dh
from securechat.core.keys import Identity, PublicIdentity, verify_signature
from securechat.errors import SessionError

Rng = Callable[[int], bytes]

# --- fixed by the spec / primitives -----------------------------------------------------------
KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
SHARED_KEY_SIZE: Final = 32
F_BYTES: Final = b"\xff" * 32  # X25519's F: 32 0xFF bytes before the DH outputs

# --- our labels and formats -------------------------------------------------------------------
X3DH_INFO: Final = b"securechat/v1/x3dh"
FALLBACK_INFO: Final = b"securechat/v1/x3dh-fallback"
SIGNED_PREKEY_LABEL: Final = b"securechat/v1/signed-prekey\x00"
SIGNED_PREKEY_VERSION: Final = 1
_SPK_BODY: Final = struct.Struct(">BI32sQ")  # version, prekey id, public key, created (ms)
SIGNED_PREKEY_SIZE: Final = _SPK_BODY.size + SIGNATURE_SIZE  # 109, relay limit is 1024
_OPK: Final = struct.Struct(">I32s")
ONE_TIME_PREKEY_SIZE: Final = _OPK.size  # 36, matches wire.ONE_TIME_PREKEY_SIZE
MAX_PREKEY_ID: Final = 2**32 - 1


def _check_key(public: bytes, what: str) -> bytes:
    if len(public) != KEY_SIZE:
        raise SessionError(f"{what} must be {KEY_SIZE} bytes")
    return public


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    """The public, signed half of a signed prekey, as published."""

    prekey_id: int
    public: bytes
    created_ms: int
    signature: bytes

    def body(self) -> bytes:
        return _SPK_BODY.pack(SIGNED_PREKEY_VERSION, self.prekey_id, self.public, self.created_ms)

    def encode(self) -> bytes:
        return self.body() + self.signature

    @classmethod
    def decode(cls, blob: bytes) -> SignedPrekey:
        if len(blob) != SIGNED_PREKEY_SIZE:
            raise SessionError("peer's signed prekey has the wrong size")
        version, prekey_id, public, created = _SPK_BODY.unpack_from(blob)
        if version != SIGNED_PREKEY_VERSION:
            raise SessionError("peer's signed prekey has an unsupported version; upgrade")
        return cls(prekey_id, public, created, blob[_SPK_BODY.size :])

    def verify(self, owner: PublicIdentity) -> None:
        """Raise AuthenticationError unless ``owner`` signed this prekey."""
        verify_signature(owner.sign, signed_message(owner, self.body()), self.signature)


def signed_message(owner: PublicIdentity, body: bytes) -> bytes:
    """What the Ed25519 signature covers: a label, both identity keys, the body."""
    return SIGNED_PREKEY_LABEL + owner.dh + owner.sign + body


@dataclass(frozen=True, slots=True)
class SignedPrekeySecret:
    """Our signed prekey with its private key (kept in the E2E state)."""

    signed: SignedPrekey
    private: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    prekey_id: int
    public: bytes

    def encode(self) -> bytes:
        return _OPK.pack(self.prekey_id, self.public)

    @classmethod
    def decode(cls, blob: bytes) -> OneTimePrekey:
        if len(blob) != ONE_TIME_PREKEY_SIZE:
            raise SessionError("peer's one-time prekey has the wrong size")
        prekey_id, public = _OPK.unpack(blob)
        return cls(prekey_id, public)


@dataclass(frozen=True, slots=True)
class OneTimePrekeySecret:
    prekey: OneTimePrekey
    private: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A peer's prekeys as the relay handed them out (signature not yet checked)."""

    signed_prekey: SignedPrekey | None
    one_time_prekey: OneTimePrekey | None = None


def parse_bundle(signed_prekey: bytes, one_time_prekey: bytes | None) -> Bundle:
    """Parse the relay's ``Prekeys`` fields; empty means "none published"."""
    spk = SignedPrekey.decode(signed_prekey) if signed_prekey else None
    opk = OneTimePrekey.decode(one_time_prekey) if one_time_prekey else None
    if spk is None and opk is not None:
        raise SessionError("peer's bundle has a one-time prekey but no signed prekey")
    return Bundle(spk, opk)


def _private(rng: Rng) -> tuple[bytes, bytes]:
    private = rng(KEY_SIZE)
    if len(private) != KEY_SIZE:
        raise SessionError("random source returned the wrong number of bytes")
    return private, dh.public_key(private)


def generate_signed_prekey(
    identity: Identity, prekey_id: int, rng: Rng, now_ms: int
) -> SignedPrekeySecret:
    """A new signed prekey, signed by ``identity``'s Ed25519 key."""
    if not 0 < prekey_id <= MAX_PREKEY_ID:
        raise SessionError("prekey id out of range")
    private, public = _private(rng)
    unsigned = SignedPrekey(prekey_id, public, now_ms, b"")
    signature = identity.sign(signed_message(identity.public, unsigned.body()))
    return SignedPrekeySecret(SignedPrekey(prekey_id, public, now_ms, signature), private)


def generate_one_time_prekey(prekey_id: int, rng: Rng) -> OneTimePrekeySecret:
    if not 0 < prekey_id <= MAX_PREKEY_ID:
        raise SessionError("prekey id out of range")
    private, public = _private(rng)
    return OneTimePrekeySecret(OneTimePrekey(prekey_id, public), private)


@dataclass(frozen=True, slots=True)
class InitialHeader:
    """What the initiator sends in clear so the responder can repeat the agreement.

    ``signed_prekey_id`` and ``one_time_prekey_id`` are 0 / None in fallback mode.
    """

    sender: PublicIdentity
    ephemeral: bytes
    fallback: bool
    signed_prekey_id: int
    one_time_prekey_id: int | None


@dataclass(frozen=True, slots=True)
class Agreement:
    """The X3DH result: SK, AD, and the key the initiator's first ratchet step uses."""

    shared_key: bytes = field(repr=False)
    associated_data: bytes
    responder_ratchet_key: bytes


def associated_data(initiator: PublicIdentity, responder: PublicIdentity) -> bytes:
    return initiator.key_bytes + responder.key_bytes


def _kdf(info: bytes, dh_outputs: list[bytes]) -> bytes:
    kdf = HKDF(hashes.SHA256(), SHARED_KEY_SIZE, salt=bytes(32), info=info)
    return kdf.derive(F_BYTES + b"".join(dh_outputs))


def initiate(
    identity: Identity, peer: PublicIdentity, bundle: Bundle | None, rng: Rng
) -> tuple[InitialHeader, Agreement]:
    """Alice's side. Verifies the signed prekey (AuthenticationError if forged)."""
    ek_private, ek_public = _private(rng)
    ad = associated_data(identity.public, peer)
    spk = bundle.signed_prekey if bundle is not None else None
    if bundle is None or spk is None:
        sk = _kdf(
            FALLBACK_INFO,
            [dh.x25519(identity.dh_private, peer.dh), dh.x25519(ek_private, peer.dh)],
        )
        header = InitialHeader(identity.public, ek_public, True, 0, None)
        return header, Agreement(sk, ad, peer.dh)
    spk.verify(peer)
    outputs = [
        dh.x25519(identity.dh_private, spk.public),
        dh.x25519(ek_private, peer.dh),
        dh.x25519(ek_private, spk.public),
    ]
    opk = bundle.one_time_prekey
    if opk is not None:
        outputs.append(dh.x25519(ek_private, opk.public))
    header = InitialHeader(
        identity.public, ek_public, False, spk.prekey_id, opk.prekey_id if opk else None
    )
    return header, Agreement(_kdf(X3DH_INFO, outputs), ad, spk.public)


def respond(
    identity: Identity,
    header: InitialHeader,
    signed_prekey_private: bytes | None,
    one_time_prekey_private: bytes | None,
) -> Agreement:
    """Bob's side, given the private keys the header names (the caller looks them up).

    ``signed_prekey_private`` is ignored in fallback mode. Raises
    InvalidPublicKeyError for a low-order ephemeral or identity key.
    """
    sender = header.sender
    ad = associated_data(sender, identity.public)
    if header.fallback:
        sk = _kdf(
            FALLBACK_INFO,
            [
                dh.x25519(identity.dh_private, sender.dh),
                dh.x25519(identity.dh_private, header.ephemeral),
            ],
        )
        return Agreement(sk, ad, identity.public.dh)
    if signed_prekey_private is None:
        raise SessionError("initial message names no signed prekey")
    outputs = [
        dh.x25519(signed_prekey_private, sender.dh),
        dh.x25519(identity.dh_private, header.ephemeral),
        dh.x25519(signed_prekey_private, header.ephemeral),
    ]
    if one_time_prekey_private is not None:
        outputs.append(dh.x25519(one_time_prekey_private, header.ephemeral))
    return Agreement(_kdf(X3DH_INFO, outputs), ad, dh.public_key(signed_prekey_private))
