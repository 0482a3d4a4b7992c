"""Which relay, and which key it must have (shell: reads and writes ``known_relays``).

Addresses are compared in one canonical form (:func:`canonical_address`), so
``localhost:5050`` and ``127.0.0.1:5050`` are one relay with one pin. The
relay's key is pinned like an SSH host key in ``known_relays`` under the key
directory (:class:`KnownRelays`); :mod:`securechat.client.link` checks it during
the handshake. Kept apart from the link so that commands that only name a relay
(``trust``, ``send --relay-key``) need no socket code.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final

from securechat.client.oserrors import map_exceptions
from securechat.core import encoding, wire
from securechat.errors import (
    CorruptKeyError,
    KeyFileError,
    KeyNotFoundError,
    StorageError,
    UsageError,
)

RELAY_PREFIX: Final = "screlay1"
KNOWN_RELAYS: Final = "known_relays"
# The relay's default port (``securechat relay`` listens there unless told otherwise;
# the client must not import the relay package, a test checks that the two agree).
DEFAULT_PORT: Final = 5050
# Names that mean this machine's IPv4 loopback: one relay, one pin.
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})


# --- addresses -----------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``, ``HOST``, ``[V6]:PORT`` or a bare IPv6 address.

    A missing port is the default relay port. A malformed address is a usage
    error (a typo on the command line), not a network failure.
    """
    raw = text.strip()
    host, port_text = raw, ""
    if raw.startswith("["):
        inner, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")) or rest == ":":
            raise _bad_address(text)
        host, port_text = inner, rest[1:]
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        if not port_text:
            raise _bad_address(text)
    if not host or any(ch.isspace() or ch in "/[]" for ch in host):
        raise _bad_address(text)
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad_address(text)
    return host, int(port_text)


def _bad_address(text: str) -> UsageError:
    return UsageError(
        f"bad relay address {text!r}: expected HOST:PORT (or HOST for port {DEFAULT_PORT})"
    )


def with_port(text: str) -> str:
    """The address as the user wrote it, with the default port when it had none."""
    host, port = parse_address(text)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_address(text: str) -> str:
    """One spelling per relay, for ``known_relays`` and for messages about pins.

    Host names are compared case-insensitively without a trailing dot, IP
    addresses in their normal form, and ``localhost`` is ``127.0.0.1`` (where
    the relay listens by default). Other names are not resolved: a pin belongs
    to the name the user gave, as in ``known_hosts``.
    """
    host, port = parse_address(text)
    host = host.lower().rstrip(".")
    if host in _LOOPBACK_NAMES:
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"{host}:{port}"
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        return f"{mapped}:{port}" if mapped is not None else f"[{ip.compressed}]:{port}"
    return f"{ip}:{port}"


# --- relay keys ----------------------------------------------------------------------------


def read_relay_key_file(path: Path) -> bytes:
    """A relay's public key from its ``relay.pub`` line (``screlay1:...``).

    A file that cannot be read is a key-file problem (missing: KeyNotFoundError),
    not a corrupt key: the advice differs.
    """
    ask = "get relay.pub from the relay's operator (the relay writes it in its --data folder)"
    with map_exceptions(
        {FileNotFoundError: KeyNotFoundError, OSError: KeyFileError},
        f"cannot read relay key {path}",
        hint=ask,
    ):
        data = path.read_bytes()
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise CorruptKeyError(f"{path} is not a relay key file", hint=ask) from exc
    token = text.strip().split(" ")[0] if text.strip() else ""
    try:
        return encoding.decode_token(token, RELAY_PREFIX, wire.KEY_SIZE)
    except CorruptKeyError as exc:
        raise CorruptKeyError(f"{path}: {exc}", hint=ask) from exc


class KnownRelays:
    """``host:port screlay1:...`` lines, like OpenSSH's known_hosts.

    Addresses are stored and looked up in :func:`canonical_address` form; a
    line written by an older version under another spelling of the same relay
    still counts (the last such line wins). ``announce`` receives one line for
    the user whenever a pin is recorded or replaced.
    """

    def __init__(self, path: Path, announce: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._announce = announce

    def _entries(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        with map_exceptions(
            {UnicodeDecodeError: StorageError, OSError: StorageError},
            f"cannot read {self.path}",
            hint=f"fix or remove {self.path} (relays are pinned again on first use)",
        ):
            lines = self.path.read_text().splitlines()
        entries = {}
        for line in lines:
            address, _, token = line.strip().partition(" ")
            if not address or not token:
                continue
            try:
                entries[canonical_address(address)] = token.strip()
            except UsageError:
                continue  # no address we could ever look up; dropped on the next write
        return entries

    def lookup(self, address: str) -> bytes | None:
        where = canonical_address(address)
        token = self._entries().get(where)
        if token is None:
            return None
        try:
            return encoding.decode_token(token, RELAY_PREFIX, wire.KEY_SIZE)
        except CorruptKeyError as exc:
            raise CorruptKeyError(
                f"{self.path}: entry for {where}: {exc}",
                hint=f"remove that line: the relay's key is pinned again on first use, or "
                f"with securechat trust --relay {where} --relay-key relay.pub",
            ) from exc

    def pin(self, address: str, key: bytes, *, source: str) -> bytes | None:
        """Record ``key`` for ``address``, announce it, return the key it replaced."""
        old = self.lookup(address)
        if old == key:
            return old
        self.remember(address, key)
        where = canonical_address(address)
        new_fp = encoding.fingerprint(key)
        if old is None:
            text = f"pinned the key of the relay at {where}: {new_fp} ({source})"
        else:
            text = (
                f"the relay at {where}: pinned key {encoding.fingerprint(old)} replaced by "
                f"{new_fp} ({source})"
            )
        if self._announce is not None:
            self._announce(text)
        return old

    def remember(self, address: str, key: bytes) -> None:
        entries = self._entries()
        entries[canonical_address(address)] = encoding.encode_token(RELAY_PREFIX, key)
        text = "".join(f"{a} {t}\n" for a, t in sorted(entries.items()))
        with map_exceptions({OSError: StorageError}, f"cannot write {self.path}"):
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            # 0600 like every client file: which relays you use is nobody else's business.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
