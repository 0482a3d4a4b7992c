"""The key directory on disk: where keys live, how they are written and read (shell).

Everything a client writes lives under one directory, ``$SECURECHAT_HOME``
or ``./keys``: identities (``NAME.key``/``NAME.pub``), peers' public keys, and
each identity's client state (``NAME.state.db``). Private files are created
with ``O_EXCL`` and mode 0600 from the first byte (no window in which they are
readable), and a private file that group or others can read is refused, as
OpenSSH refuses ``id_ed25519`` with mode 0644.

How a key argument is found (``--key``, ``--peer``, ``fingerprint``): anything
with a slash is a path, taken as given; a bare name (``bob``) or file name
(``bob.pub``) is looked up in the key directory only, so the folder a command
runs in (with, say, a directory called ``bob``) cannot change what it means.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from securechat.client.oserrors import map_exceptions
from securechat.core import keys
from securechat.errors import (
    CorruptKeyError,
    KeyFileError,
    KeyNotFoundError,
    PassphraseRequiredError,
    StorageError,
    UsageError,
    WrongPassphraseError,
)
from securechat.files import check_private_permissions, lock_exclusive

ENV_HOME: Final = "SECURECHAT_HOME"
ENV_PASSPHRASE: Final = "SECURECHAT_PASSPHRASE"  # noqa: S105 (a variable name)
DEFAULT_HOME: Final = "keys"
PRIVATE_SUFFIX: Final = ".key"
PUBLIC_SUFFIX: Final = ".pub"
MAX_KEY_FILE: Final = 16 * 1024  # a real key file is < 1 KiB; refuse to slurp huge files
STATE_SUFFIX: Final = ".state.db"  # NAME.state.db: the client state of identity NAME
LOCK_SUFFIX: Final = ".state.lock"  # held while a client for NAME runs (client/store.py)
# SQLite's companions of a database file, archived with it so the copy stays whole.
_SQLITE_COMPANIONS: Final = ("-wal", "-shm", "-journal")
PASSPHRASE_TRIES: Final = 3  # on a terminal, as ssh gives


def home() -> Path:
    """The key directory (not created)."""
    return Path(os.environ.get(ENV_HOME) or DEFAULT_HOME)


def ensure_home() -> Path:
    """The key directory, created 0700 if missing."""
    path = home()
    with map_exceptions(
        {OSError: StorageError},
        f"cannot create key directory {path}",
        hint=f"create it yourself (mode 0700), or point {ENV_HOME} at a writable directory",
    ):
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


# --- reading ----------------------------------------------------------------------------


def read_private_file(path: Path, *, limit: int = MAX_KEY_FILE) -> bytes:
    """Read a private file after the permission check."""
    check_private_permissions(path)
    return _read(path, limit)


def _read(path: Path, limit: int) -> bytes:
    with (
        map_exceptions(
            {FileNotFoundError: KeyNotFoundError, OSError: KeyFileError}, f"cannot read {path}"
        ),
        path.open("rb") as handle,
    ):
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise KeyFileError(
            f"{path} is too large to be a securechat file",
            hint="give the NAME.key or NAME.pub file that securechat keygen wrote",
        )
    return data


def _decode_text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptKeyError(
            f"{path} is not a securechat key file (not text)",
            hint="give the NAME.key or NAME.pub file that 'securechat keygen' wrote",
        ) from exc


def resolve(arg: str, suffix: str, *, peer: bool = False) -> Path:
    """A path (``arg`` has a slash) as given, else ``NAME`` or ``NAME.pub`` in the key directory.

    ``peer`` words the error for someone else's key, which only they can give.
    """
    if "/" in arg or os.sep in arg:
        given = Path(arg).expanduser()
        if given.is_dir():
            raise KeyNotFoundError(
                f"{arg} is a directory, not a key file", hint="give the .key or .pub file in it"
            )
        if not given.is_file():
            raise KeyNotFoundError(
                f"no such key file: {arg} (looked at {os.path.abspath(given)})",
                hint=f"check the path, or give a NAME from the key directory {home()}",
            )
        return given
    file_name = arg if arg.endswith((PRIVATE_SUFFIX, PUBLIC_SUFFIX)) else f"{arg}{suffix}"
    candidate = home() / file_name
    if candidate.is_file():
        return candidate
    raise _not_found(arg, file_name, candidate, peer=peer)


def _not_found(arg: str, file_name: str, candidate: Path, *, peer: bool) -> KeyNotFoundError:
    """Where we looked (the message) and what to do (the hint): who can give the key."""
    name = file_name.rsplit(".", 1)[0]
    where = f"no key {arg!r}: looked for {os.path.abspath(candidate)}"
    if peer:
        advice = f"ask {name} for their {name}{PUBLIC_SUFFIX} and save it in {home()}/"
    elif file_name.endswith(PRIVATE_SUFFIX):
        advice = f"create it with 'securechat keygen {name}', or give a path"
    else:
        advice = f"save the {name}{PUBLIC_SUFFIX} file in {home()}/, or give a path"
    here = Path(file_name)
    if here.is_file():
        advice += f" (or, to use the one in this folder, give it as ./{file_name})"
    elif peer and Path(arg).is_dir():
        advice += f" ('{arg}' in this folder is a directory, not a key)"
    return KeyNotFoundError(
        f"{where} ({ENV_HOME} or ./{DEFAULT_HOME} is the key directory)", hint=advice
    )


def default_private_path() -> Path:
    """With exactly one private key in the key directory, that is the identity."""
    found = sorted(home().glob(f"*{PRIVATE_SUFFIX}")) if home().is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(
            f"no private key in {home()}", hint="create one with 'securechat keygen NAME'"
        )
    names = ", ".join(p.stem for p in found)
    raise UsageError(f"several keys in {home()} ({names})", hint="choose one with --key NAME")


def passphrase_from_env_or_tty(prompt: str, *, confirm: bool) -> bytes:
    """The passphrase from ``$SECURECHAT_PASSPHRASE``, else asked on the terminal.

    An empty passphrase is refused from either source: it would encrypt the key
    under nothing while looking as if it were protected.
    """
    value = os.environ.get(ENV_PASSPHRASE)
    if value is not None:
        if not value:
            raise UsageError(
                f"{ENV_PASSPHRASE} is set but empty",
                hint="set it to the passphrase, unset it to be asked on the terminal (or use "
                "--no-passphrase with keygen for an unencrypted key)",
            )
        return value.encode()
    if not sys.stdin.isatty():
        raise PassphraseRequiredError(
            "a passphrase is needed and there is no terminal to ask on",
            hint=f"set {ENV_PASSPHRASE} (or use --no-passphrase for keygen)",
        )
    try:
        first = getpass.getpass(prompt)
        again = getpass.getpass("Repeat passphrase: ") if confirm else first
    except EOFError:  # Ctrl-D at the prompt: the user gave none
        print(file=sys.stderr)  # end the prompt's line
        raise PassphraseRequiredError(
            "no passphrase given (end of input); nothing was written or unlocked",
            hint="type the passphrase and press Enter (Ctrl-C cancels)",
        ) from None
    if again != first:
        raise UsageError("the two passphrases differ; nothing was written", hint="run it again")
    if confirm and not first:
        raise UsageError(
            "empty passphrase", hint="use --no-passphrase to store the key unencrypted"
        )
    return first.encode()


def load_identity(arg: str | None) -> keys.Identity:
    """Load our identity from ``--key`` (path or name) or the default key."""
    path = resolve(arg, PRIVATE_SUFFIX) if arg else default_private_path()
    if path.suffix == PUBLIC_SUFFIX:
        raise CorruptKeyError(
            f"{path} is a public key", hint="--key needs your private NAME.key (or just NAME)"
        )
    with _naming(path):
        parsed = keys.parse_private_key(_decode_text(read_private_file(path), path))
    if not parsed.encrypted:
        with _naming(path):
            return keys.decrypt_private_key(parsed, None)
    # On a terminal a mistyped passphrase gets more tries (as ssh gives); from the
    # environment a wrong one stays wrong, so one try.
    asked = os.environ.get(ENV_PASSPHRASE) is None and sys.stdin.isatty()
    tries = PASSPHRASE_TRIES if asked else 1
    for attempt in range(1, tries + 1):
        passphrase = passphrase_from_env_or_tty(f"Passphrase for {path}: ", confirm=False)
        try:
            with _naming(path):
                return keys.decrypt_private_key(parsed, passphrase)
        except WrongPassphraseError as exc:
            if attempt == tries:
                message = f"{exc}: {tries} tries for {path}" if tries > 1 else str(exc)
                source = "the passphrase you set in keygen" if asked else f"${ENV_PASSPHRASE}"
                raise WrongPassphraseError(message, hint=f"check {source}") from exc
            print("Wrong passphrase, try again.", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")  # pragma: no cover


def load_public(arg: str, *, peer: bool = False) -> keys.PublicIdentity:
    """A public identity from a ``.pub`` path or a name in the key directory.

    A private ``.key`` file is accepted too (its public line is used), so
    commands can name our own identity either way. ``peer``: the key is someone
    else's, which shapes the advice when it is missing.
    """
    path = resolve(arg, PUBLIC_SUFFIX, peer=peer)
    with _naming(path):
        if path.suffix == PRIVATE_SUFFIX:
            text = _decode_text(read_private_file(path), path)
            return keys.parse_private_key(text).public
        text = _decode_text(_read(path, MAX_KEY_FILE), path)
        if text.startswith(keys.PRIVATE_HEADER):
            raise CorruptKeyError("this is a private key", hint="give the .pub file")
        return keys.PublicIdentity.from_line(text, default_name=path.stem)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Prefix format errors with the file they concern, which the core cannot know."""
    try:
        yield
    except CorruptKeyError as exc:
        if str(path) in str(exc):
            raise
        raise CorruptKeyError(f"{path}: {exc}", hint=exc.hint) from exc


# --- replacing an identity ----------------------------------------------------------------


@contextlib.contextmanager
def identity_lock(name: str) -> Iterator[None]:
    """Hold NAME's client lock (the one a running talk/send/receive holds), or refuse."""
    busy = UsageError(
        f"a securechat process (talk, send or receive) is using {name}",
        hint="stop it first, then run this again",
    )
    handle = lock_exclusive(home() / f"{name}{LOCK_SUFFIX}", busy)
    try:
        yield
    finally:
        handle.close()


def archive_state(name: str, now: float | None = None) -> Path | None:
    """Move NAME's client state aside under a dated name; return the new database path.

    Called when NAME gets a new key: the old state is sealed under the old key,
    so the new identity could not open it (and must not reuse its sessions). The
    database moves with its SQLite companions so the archive stays consistent;
    the lock file holds nothing and is removed. The caller holds
    :func:`identity_lock`.
    """
    directory = home()
    state = directory / f"{name}{STATE_SUFFIX}"
    companions = [state.with_name(state.name + c) for c in _SQLITE_COMPANIONS]
    if not state.exists() and not any(c.exists() for c in companions):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    target = directory / f"{name}.replaced-{stamp}{STATE_SUFFIX}"
    serial = 1
    while target.exists():
        serial += 1
        target = directory / f"{name}.replaced-{stamp}-{serial}{STATE_SUFFIX}"
    with map_exceptions({OSError: StorageError}, f"cannot move {state} aside"):
        if state.exists():
            os.replace(state, target)
        for companion, suffix in zip(companions, _SQLITE_COMPANIONS, strict=True):
            if companion.exists():
                os.replace(companion, target.with_name(target.name + suffix))
    with contextlib.suppress(OSError):
        (directory / f"{name}{LOCK_SUFFIX}").unlink()
    return target
