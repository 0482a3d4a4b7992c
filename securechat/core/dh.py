"""X25519 with the checks every protocol layer of ours needs (core: no I/O).

Why a module of its own: the Noise handshake, X3DH and the Double Ratchet all
run Diffie-Hellman on keys that came from the network. RFC 7748 X25519 accepts
any 32 bytes as a public key, including the low-order points (and their
non-canonical encodings) that force the shared secret to a known value. For a
clamped scalar every such point yields the all-zero output, so rejecting an
all-zero result, compared in constant time, rejects exactly the points that
would let a peer fix our secret (see Wycheproof's x25519 "low order" cases and
wireguard-go ``noise-helpers.go``). libsodium's ``crypto_scalarmult`` refuses
them too; we check again rather than rely on a build option.

libsodium (via PyNaCl) rather than ``cryptography`` for the scalar
multiplication: it takes raw bytes, whereas loading a private key into
``cryptography`` recomputes its public key (a second scalar multiplication)
on every call, which doubled the cost of a relay handshake.
"""

from __future__ import annotations

import hmac
from typing import Final

from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import RuntimeError as NaclRuntimeError

from securechat.errors import InvalidPublicKeyError

KEY_SIZE: Final = 32
_ZERO: Final = bytes(KEY_SIZE)


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key of a 32-byte private key."""
    if len(private) != KEY_SIZE:
        raise InvalidPublicKeyError("X25519 private key must be 32 bytes")
    return bytes(crypto_scalarmult_base(bytes(private)))


def x25519(private: bytes, peer_public: bytes) -> bytes:
    """Diffie-Hellman of our private key with a peer's public key.

    Raises :class:`InvalidPublicKeyError` for a key of the wrong size and for a
    low-order point (all-zero shared secret); never returns a weak secret.
    """
    if len(private) != KEY_SIZE or len(peer_public) != KEY_SIZE:
        raise InvalidPublicKeyError("X25519 keys must be 32 bytes")
    try:
        shared = bytes(crypto_scalarmult(bytes(private), bytes(peer_public)))
    except NaclRuntimeError:  # libsodium refuses low-order points itself
        raise InvalidPublicKeyError("peer sent a low-order X25519 key") from None
    if hmac.compare_digest(shared, _ZERO):
        raise InvalidPublicKeyError("peer sent a low-order X25519 key")
    return shared


class KeyPair:
    """An X25519 private key with its public key, computed once."""

    __slots__ = ("_private", "public")

    def __init__(self, private: bytes) -> None:
        self.public: bytes = public_key(private)
        self._private = bytes(private)

    def dh(self, peer_public: bytes) -> bytes:
        return x25519(self._private, peer_public)
