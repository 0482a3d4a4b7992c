"""Secret-free file helpers shared by the relay and the client (shell).

Private files (key files, the relay's key) are created with ``O_EXCL`` and their
final mode from the first byte, so there is no moment in which they are readable
by others, and a private file that group or others may read is refused, as
OpenSSH refuses ``id_ed25519`` with mode 0644.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import IO

from securechat.errors import (
    KeyExistsError,
    KeyNotFoundError,
    KeyPermissionError,
    SecureChatError,
    StorageError,
)


def write_new_file(path: Path, data: bytes, *, mode: int, force: bool = False) -> None:
    """Create ``path`` with ``mode``; never overwrite unless ``force``.

    With ``force`` the new content is written beside the old file and renamed
    over it, so a crash leaves either the old key or the new one, never half.
    """
    if path.exists() and not force:
        raise KeyExistsError(f"{path} already exists; use --force to overwrite it")
    target = path.with_name(path.name + ".tmp") if force else path
    if force:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as exc:
        raise KeyExistsError(f"{path} already exists; use --force to overwrite it") from exc
    except OSError as exc:
        raise StorageError(f"cannot create {target}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            os.replace(target, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


def check_private_permissions(path: Path) -> None:
    """Refuse a private file that group or others may read or write."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise KeyNotFoundError(f"cannot read {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise KeyPermissionError(
            f"permissions {mode:04o} for '{path}' are too open: it must not be readable by "
            f"others. Run: chmod 600 '{path}'"
        )


def lock_exclusive(path: Path, busy: SecureChatError) -> IO[str]:
    """Open ``path`` (0600) and hold an exclusive lock on it, or raise ``busy``.

    The lock lives as long as the returned file is open; the kernel drops it when
    the process dies, so a crash never leaves a stale lock behind.
    """
    try:
        handle = open(path, "a+")  # noqa: SIM115 (the caller holds it)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.close()
        raise busy from exc
    return handle
