"""The relay's own Noise static key on disk (shell: touches files).

Format (text, versioned, one field per line)::

    SECURECHAT RELAY KEY v1
    secret screlaysecret1:<base32 of the 32-byte X25519 private key + checksum>
    public screlay1:<base32 of the public key + checksum>

The file is created with ``O_EXCL`` and mode 0600 inside a 0700 directory,
and refused when group or others may read it (as OpenSSH refuses), when a
line is missing or extra, or when the public line does not match the secret.
``relay.pub`` next to it holds the public line alone, for clients to pin.
Writing and the permission check are the client's too (``securechat.files``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from securechat import files
from securechat.core import dh
from securechat.core.encoding import decode_token, encode_token
from securechat.errors import CorruptKeyError, StorageError
from securechat.relay.oserrors import map_exceptions

KEY_FILE: Final = "relay.key"
PUB_FILE: Final = "relay.pub"
HEADER: Final = "SECURECHAT RELAY KEY v1"
SECRET_PREFIX: Final = "screlaysecret1"  # noqa: S105 - a type prefix, not a secret
PUBLIC_PREFIX: Final = "screlay1"


def ensure_dir(directory: Path) -> None:
    """Create the relay's data directory (0700) if it does not exist."""
    with map_exceptions(
        {OSError: StorageError}, f"cannot create the relay data directory {directory}"
    ):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _parse(text: str, path: Path) -> bytes:
    lines = text.splitlines()
    if len(lines) != 3 or lines[0] != HEADER:
        raise CorruptKeyError(f"{path} is not a '{HEADER}' file")
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    if set(fields) != {"secret", "public"}:
        raise CorruptKeyError(f"{path} must have exactly a 'secret' and a 'public' line")
    try:
        private = decode_token(fields["secret"], SECRET_PREFIX, dh.KEY_SIZE)
        public = decode_token(fields["public"], PUBLIC_PREFIX, dh.KEY_SIZE)
    except CorruptKeyError as exc:
        raise CorruptKeyError(f"{path}: {exc}") from exc
    if dh.public_key(private) != public:
        raise CorruptKeyError(f"{path}: the public line does not match the secret key")
    return private


def load_or_create(directory: Path, rng: Callable[[int], bytes] = os.urandom) -> bytes:
    """Return the relay's private key, generating and saving it on first start."""
    ensure_dir(directory)
    path = directory / KEY_FILE
    with map_exceptions({OSError: StorageError}, f"cannot read or write the relay key {path}"):
        if not path.exists():
            return _create(directory, rng(dh.KEY_SIZE))
        return _read(path)


def _create(directory: Path, private: bytes) -> bytes:
    """Write ``relay.key`` (0600, never over an existing one) and ``relay.pub`` (0644)."""
    public = dh.public_key(private)
    text = (
        f"{HEADER}\nsecret {encode_token(SECRET_PREFIX, private)}\n"
        f"public {encode_token(PUBLIC_PREFIX, public)}\n"
    )
    files.write_new_file(directory / KEY_FILE, text.encode("ascii"), mode=0o600)
    line = encode_token(PUBLIC_PREFIX, public) + "\n"
    files.write_new_file(directory / PUB_FILE, line.encode("ascii"), mode=0o644, force=True)
    return private


def load_file(path: Path) -> bytes:
    """An existing relay key (``--key FILE``: every node of a cluster shares one key).

    Never created here: a typo must not give one node a key of its own, which
    every client would then refuse as a changed relay key.
    """
    with map_exceptions({OSError: StorageError}, f"cannot read the relay key {path}"):
        if not path.exists():
            raise StorageError(
                f"no relay key at {path}; create one with `securechat relay --data DIR` once"
                " (DIR/relay.key) and give every node that file"
            )
        return _read(path)


def _read(path: Path) -> bytes:
    """An existing key file: refused if others may read it, then parsed."""
    files.check_private_permissions(path)
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise CorruptKeyError(f"{path} is not a text key file") from exc
    return _parse(text, path)


def write_public(directory: Path, private: bytes) -> None:
    """``relay.pub`` in the data folder, for clients to pin (also with ``--key``)."""
    line = encode_token(PUBLIC_PREFIX, dh.public_key(private)) + "\n"
    with map_exceptions({OSError: StorageError}, f"cannot write {directory / PUB_FILE}"):
        files.write_new_file(directory / PUB_FILE, line.encode("ascii"), mode=0o644, force=True)
