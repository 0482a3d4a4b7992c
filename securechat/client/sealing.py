"""How the client store seals its rows: the keys, the row-key MACs, the AEAD (shell).

Every value in the client's SQLite file is sealed with XChaCha20-Poly1305 under
the ``state`` or ``history`` key with ``table/row key`` as associated data, so a
row moved to another place fails to open; every row key is a keyed BLAKE2b MAC
of the raw id (``index`` key), so the file never names a peer, a message or a
conversation (docs/protocol.md, section 5, "Local state at rest").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nacl.bindings
import nacl.exceptions

from securechat.core.keys import Identity
from securechat.errors import StorageError

MAC_SIZE: Final = 16
NONCE_SIZE: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES


@dataclass(frozen=True, slots=True)
class StoreKeys:
    """The three keys of one identity's store, derived from its private key."""

    state: bytes
    history: bytes
    index: bytes  # MACs row keys, so raw ids never reach the file

    @classmethod
    def of(cls, identity: Identity) -> StoreKeys:
        return cls(
            identity.storage_key("state"),
            identity.storage_key("history"),
            identity.storage_key("index"),
        )


class Sealer:
    """Row keys and sealed values of one store file (``path`` names it in errors)."""

    def __init__(self, keys: StoreKeys, path: Path) -> None:
        self.keys = keys
        self._path = path

    def mac(self, label: bytes, value: bytes) -> bytes:
        digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
            label + b"\x00" + value, digest_size=MAC_SIZE, key=self.keys.index
        )
        return bytes(digest)

    def peer_key(self, peer_dh: bytes) -> bytes:
        """The row key of a peer (its identity X25519 key never reaches the file)."""
        return self.mac(b"peer", peer_dh)

    def msg_key(self, msg_id: bytes) -> bytes:
        return self.mac(b"msg", msg_id)

    def conv_key(self, conv: str) -> bytes:
        return self.mac(b"conv", conv.encode())

    @staticmethod
    def seal(key: bytes, ad: str, data: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            data, ad.encode(), nonce, key
        )

    def open(self, key: bytes, ad: str, blob: bytes) -> bytes:
        try:
            return bytes(
                nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    blob[NONCE_SIZE:], ad.encode(), blob[:NONCE_SIZE], key
                )
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise StorageError(
                f"{self._path} is corrupt or belongs to another identity ({ad.split('/')[0]})",
                hint=f"move {self._path} away to start fresh",
            ) from exc
