"""The mailbox address of an identity (core): a keyed hash, not framing.

Kept apart from the frames: it is cryptography (libsodium BLAKE2b) that both the
relay and the clients compute.
"""

from __future__ import annotations

import functools

import nacl.bindings

from securechat.core.wire.frames import KEY_SIZE, MAILBOX_CACHE, MAILBOX_LABEL, MAILBOX_SIZE
from securechat.errors import FrameError

# --- mailbox address ---


def mailbox_address(identity_key: bytes) -> bytes:
    """The mailbox of an identity: keyed BLAKE2b-256 of its X25519 public key.

    Why hashed: the relay's tables and the store index on an address that is
    not itself the key, and the label separates it from every other hash use.
    libsodium's ``generichash`` costs ~7 us through PyNaCl, so the relay's hot
    path looks addresses up in a bounded cache instead of hashing again.
    """
    if len(identity_key) != KEY_SIZE:
        raise FrameError("identity key must be 32 bytes")
    return _mailbox_cached(bytes(identity_key))


@functools.lru_cache(maxsize=MAILBOX_CACHE)
def _mailbox_cached(identity_key: bytes) -> bytes:
    digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        identity_key, digest_size=MAILBOX_SIZE, key=MAILBOX_LABEL
    )
    return bytes(digest)
