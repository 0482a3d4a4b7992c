"""One authenticated connection from a client to the relay (shell).

A small pump around the sans-I/O cores: socket bytes go into
:class:`~securechat.core.noise.NoiseConnection`, the plaintext it yields goes into
:class:`~securechat.core.wire.FrameDecoder`, and frames to send are encoded,
coalesced and encrypted in one call. ``OSError`` becomes our transport errors
here and nowhere else.

The relay's key is pinned like an SSH host key: the first connection to a
``host:port`` records the key in ``known_relays`` under the key directory, a
later different key is refused *before* our identity is revealed (XX
message 3), and ``--relay-key FILE`` pins explicitly (recorded once the relay
has proven it holds that key). Addresses are compared in one canonical form
(:func:`canonical_address`), so ``localhost:5050`` and ``127.0.0.1:5050`` are
one relay with one pin.

A failed connection says why, because "it did not work" after a long silence
is what a newcomer cannot act on: refused (nothing listens on that port),
unreachable (no route, no answer), or something that is not a securechat relay
(it answers the handshake with other bytes, e.g. an HTTP server, or not at
all within :data:`HANDSHAKE_TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, TypeVar

from securechat.core import encoding, noise, wire
from securechat.errors import (
    ConnectionClosedError,
    CorruptKeyError,
    NotARelayError,
    ProtocolError,
    RelayKeyChangedError,
    RelayUnreachableError,
    SecureChatError,
    StorageError,
    UsageError,
)

E = TypeVar("E", bound=SecureChatError)

RELAY_PREFIX: Final = "screlay1"
KNOWN_RELAYS: Final = "known_relays"
READ_SIZE: Final = 256 * 1024
# The relay's default port (``securechat relay`` listens there unless told otherwise;
# the client must not import the relay package, a test checks that the two agree).
DEFAULT_PORT: Final = 5050
# Chosen: TCP connect. A host that exists answers a SYN in one round trip; longer than
# this is a host that is down or a firewall that drops, and the messenger retries anyway.
CONNECT_TIMEOUT: Final = 5.0
# Chosen: from message 1 to the relay's message 2. A relay answers with one DH and one
# write, so a live relay is far under this even on a busy machine over a slow path; a
# peer silent for this long is not a securechat relay (an HTTP server waits for a
# request line that never comes) or is overloaded, and the messenger retries.
HANDSHAKE_TIMEOUT: Final = 2.0
_PREVIEW: Final = 40  # bytes of a non-relay's answer kept to show the user
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


def split_relays(text: str) -> list[str]:
    """``a:5050,b:5050``: the nodes of one relay cluster (issue 16), each with its port.

    The client tries them in turn (the next after a failure, with backoff) and
    expects one relay key from all of them: a cluster's nodes share one key.
    """
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise UsageError(f"bad relay address list {text!r}: expected HOST:PORT[,HOST:PORT...]")
    return [with_port(part) for part in parts]


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
    """A relay's public key from its ``relay.pub`` line (``screlay1:...``)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CorruptKeyError(f"cannot read relay key {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise CorruptKeyError(f"{path} is not a relay key file") from exc
    token = text.strip().split(" ")[0] if text.strip() else ""
    try:
        return encoding.decode_token(token, RELAY_PREFIX, wire.KEY_SIZE)
    except CorruptKeyError as exc:
        raise CorruptKeyError(f"{path}: {exc}") from exc


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
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise StorageError(f"{self.path} is not a known_relays file (not text)") from exc
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
            raise CorruptKeyError(f"{self.path}: entry for {where}: {exc}") from exc

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
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            # 0600 like every client file: which relays you use is nobody else's business.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc


# --- the link ------------------------------------------------------------------------------


class RelayLink:
    """A connected, authenticated link; thread-safe for one reader and many writers."""

    def __init__(self, sock: socket.socket, conn: noise.NoiseConnection, address: str) -> None:
        self._sock = sock
        self._conn = conn
        self._decoder = wire.FrameDecoder()
        self._write_lock = threading.Lock()
        self.address = address
        self.relay_key = conn.remote_static or b""

    @classmethod
    def connect(
        cls,
        address: str,
        static_private: bytes,
        known: KnownRelays,
        *,
        pinned_key: bytes | None = None,
        timeout: float = CONNECT_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        sign_public: bytes = b"",
    ) -> RelayLink:
        """Connect and run the Noise XX handshake; check the relay key against the pin.

        ``pinned_key`` (``--relay-key``) wins over ``known_relays`` and, once the
        relay has proven it holds it, is recorded there, as the docs promise.
        ``sign_public``: our 32-byte Ed25519 public key, sent as the message-3 payload
        (encrypted, after the relay proved its key) so the relay's logs show the
        identity fingerprint users see (protocol 2); empty sends nothing, as before.
        """
        host, port = parse_address(address)
        recorded = known.lookup(address)
        expected = pinned_key if pinned_key is not None else recorded

        def verify(remote: bytes) -> None:
            if expected is not None and remote != expected:
                raise _key_mismatch(address, remote, expected, known, explicit=pinned_key)

        conn = noise.NoiseConnection(
            initiator=True,
            static_private=static_private,
            rng=os.urandom,
            verify_remote=verify,
            payload=sign_public,
        )
        sock = _open_socket(address, host, port, timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(handshake_timeout)
            _handshake(sock, conn, address, handshake_timeout)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        remote = conn.remote_static
        if remote is not None and remote != recorded:
            source = (
                "from --relay-key"
                if pinned_key is not None
                else (f"first use; checked on every later connection, see {known.path}")
            )
            known.pin(address, remote, source=source)
        return cls(sock, conn, address)

    def send(self, frames: Iterable[wire.Frame]) -> None:
        """Encode, coalesce, encrypt and write frames (one syscall for the batch)."""
        plaintext = b"".join(wire.encode(frame) for frame in frames)
        if not plaintext:
            return
        with self._write_lock:
            try:
                self._sock.sendall(self._conn.send(plaintext))
            except OSError as exc:
                raise ConnectionClosedError(f"lost the connection to the relay: {exc}") from exc

    def receive(self, timeout: float | None) -> list[wire.Frame]:
        """Frames available within ``timeout`` (``[]`` on timeout); raise when closed."""
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(READ_SIZE)
        except TimeoutError:
            return []
        except OSError as exc:
            raise ConnectionClosedError(f"lost the connection to the relay: {exc}") from exc
        if not data:
            raise ConnectionClosedError("the relay closed the connection")
        _events, plaintext, _reply = self._conn.receive_data(data)
        return self._decoder.feed(plaintext) if plaintext else []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


# --- connecting, and saying why it failed ----------------------------------------------------


def _failure(cls: type[E], message: str, *, brief: str) -> E:
    """``cls(message)`` with its few-word form for a status line."""
    error = cls(message)
    error.brief = brief
    return error


def _open_socket(address: str, host: str, port: int, timeout: float) -> socket.socket:
    """TCP connect; each failure becomes a RelayUnreachableError that names its cause."""
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as exc:
        message = (
            f"the relay at {address} refused the connection: nothing listens on port "
            f"{port} there (is the relay running, and is the port right?)"
        )
        raise _failure(RelayUnreachableError, message, brief="connection refused") from exc
    except socket.gaierror as exc:
        message = f"cannot find the relay's host {host!r}: {exc.strerror or exc}"
        raise _failure(RelayUnreachableError, message, brief="unknown host") from exc
    except TimeoutError as exc:
        message = (
            f"no answer from {address} within {timeout:g}s (is the host up? a firewall "
            "may drop the connection)"
        )
        raise _failure(RelayUnreachableError, message, brief="no answer") from exc
    except OSError as exc:
        message = f"cannot reach the relay at {address}: {exc.strerror or exc}"
        brief = (exc.strerror or "unreachable").lower()
        raise _failure(RelayUnreachableError, message, brief=brief) from exc


def _handshake(
    sock: socket.socket, conn: noise.NoiseConnection, address: str, timeout: float
) -> None:
    """Send message 1, read until message 2 is processed (message 3 goes back at once)."""
    first = b""
    try:
        sock.sendall(conn.initiate())
        while not conn.complete:
            data = sock.recv(READ_SIZE)
            if not data:
                message = (
                    f"{address} closed the connection during the handshake (not a "
                    "securechat relay, or a relay at its connection limit)"
                )
                raise _failure(RelayUnreachableError, message, brief="closed in the handshake")
            first = first or data[:_PREVIEW]
            try:
                _events, _plain, reply = conn.receive_data(data)
            except ProtocolError as exc:  # a changed key (TrustError) propagates as it is
                message = _not_a_relay(address, first)
                raise _failure(NotARelayError, message, brief="not a securechat relay") from exc
            if reply:
                sock.sendall(reply)
    except TimeoutError as exc:
        message = (
            f"{address} accepted the connection but gave no securechat handshake answer "
            f"within {timeout:g}s: is a securechat relay listening there (or is it "
            "overloaded)?"
        )
        raise _failure(NotARelayError, message, brief="no securechat handshake answer") from exc
    except OSError as exc:
        message = f"the connection to {address} failed during the handshake: {exc.strerror or exc}"
        raise _failure(RelayUnreachableError, message, brief="failed in the handshake") from exc


def _not_a_relay(address: str, first: bytes) -> str:
    """Say what answered instead when it is text (``HTTP/1.1 400 Bad Request``)."""
    text = first.split(b"\n", 1)[0].rstrip(b"\r")
    if text and all(32 <= b < 127 for b in text):
        return f"{address} is not a securechat relay: it answered {text.decode('ascii')!r}"
    return (
        f"{address} is not a securechat relay (or runs an incompatible version): its "
        "answer is not a securechat handshake"
    )


def _key_mismatch(
    address: str, remote: bytes, expected: bytes, known: KnownRelays, *, explicit: bytes | None
) -> RelayKeyChangedError:
    where = canonical_address(address)
    got, want = encoding.fingerprint(remote), encoding.fingerprint(expected)
    if explicit is not None:
        message = (
            f"the relay at {where} presented key {got}, not {want} from --relay-key: "
            "this may be an attack (or the wrong relay.pub)"
        )
        return _failure(RelayKeyChangedError, message, brief="WRONG RELAY KEY")
    message = (
        f"the relay at {where} presented key {got} but {want} is pinned (in "
        f"{known.path}); this may be an attack. If the relay's key really changed, get "
        "its new relay.pub from the operator and run: securechat trust --relay "
        f"{where} --relay-key relay.pub"
    )
    return _failure(RelayKeyChangedError, message, brief="RELAY KEY CHANGED")
