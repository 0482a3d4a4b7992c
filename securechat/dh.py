"""X25519 with the checks every protocol layer of ours needs (core: no I/O).

Why a module of its own: the Noise handshake, X3DH and the Double Ratchet all
run Diffie-Hellman on keys that came from the network. RFC 7748 X25519 accepts
any 32 bytes as a public key, including the low-order points (and their
non-canonical encodings) that force the shared secret to a known value. For a
clamped scalar every such point yields the all-zero output, so rejecting an
all-zero result, compared in constant time, rejects exactly the points that
would let a peer fix our secret (see Wycheproof's x25519 "low order" cases and
wireguard-go ``noise-helpers.go``). Everything else goes to ``cryptography``.
"""

from __future__ import annotations

import hmac
from typing import Final

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from securechat.errors import InvalidPublicKeyError

KEY_SIZE: Final = 32
_ZERO: Final = bytes(KEY_SIZE)


def public_key(private: bytes) -> bytes:
    """Return the X25519 public key of a 32-byte private key."""
    if len(private) != KEY_SIZE:
        raise InvalidPublicKeyError("X25519 private key must be 32 bytes")
    pub = X25519PrivateKey.from_private_bytes(private).public_key()
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519(private: bytes, peer_public: bytes) -> bytes:
    """Diffie-Hellman of our private key with a peer's public key.

    Raises :class:`InvalidPublicKeyError` for a key of the wrong size and for a
    low-order point (all-zero shared secret); never returns a weak secret.
    """
    if len(private) != KEY_SIZE or len(peer_public) != KEY_SIZE:
        raise InvalidPublicKeyError("X25519 keys must be 32 bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # cryptography refuses the all-zero result itself
        raise InvalidPublicKeyError("peer sent a low-order X25519 key") from exc
    if hmac.compare_digest(shared, _ZERO):
        raise InvalidPublicKeyError("peer sent a low-order X25519 key")
    return shared
