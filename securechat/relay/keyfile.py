"""The relay's own Noise static key on disk (shell: touches files).

Format (text, versioned, one field per line)::

    SECURECHAT RELAY KEY v1
    secret screlaysecret1:<base32 of the 32-byte X25519 private key + checksum>
    public screlay1:<base32 of the public key + checksum>

The file is created with ``O_EXCL`` and mode 0600 inside a 0700 directory,
and refused when group or others may read it (as OpenSSH refuses), when a
line is missing or extra, or when the public line does not match the secret.
``relay.pub`` next to it holds the public line alone, for clients to pin.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Final

from securechat.core import dh
from securechat.core.encoding import decode_token, encode_token
from securechat.errors import CorruptKeyError, KeyPermissionError, StorageError

KEY_FILE: Final = "relay.key"
PUB_FILE: Final = "relay.pub"
HEADER: Final = "SECURECHAT RELAY KEY v1"
SECRET_PREFIX: Final = "screlaysecret1"  # noqa: S105 - a type prefix, not a secret
PUBLIC_PREFIX: Final = "screlay1"


def ensure_dir(directory: Path) -> None:
    """Create the relay's data directory (0700) if it does not exist."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the relay data directory {directory}: {exc}") from exc


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
    try:
        if not path.exists():
            private = rng(dh.KEY_SIZE)
            public = dh.public_key(private)
            text = (
                f"{HEADER}\nsecret {encode_token(SECRET_PREFIX, private)}\n"
                f"public {encode_token(PUBLIC_PREFIX, public)}\n"
            )
            _write_new(path, text, 0o600)
            pub_path = directory / PUB_FILE
            pub_path.unlink(missing_ok=True)
            _write_new(pub_path, encode_token(PUBLIC_PREFIX, public) + "\n", 0o644)
            return private
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyPermissionError(
                f"{path} is readable by others (mode {mode:o}); run 'chmod 600 {path}'"
            )
        return _parse(path.read_text(encoding="ascii"), path)
    except UnicodeDecodeError as exc:
        raise CorruptKeyError(f"{path} is not a text key file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read or write the relay key {path}: {exc}") from exc
