"""One authenticated connection from a client to the relay (shell).

A small pump around the sans-I/O cores: socket bytes go into
:class:`~securechat.noise.NoiseConnection`, the plaintext it yields goes into
:class:`~securechat.wire.FrameDecoder`, and frames to send are encoded,
coalesced and encrypted in one call. ``OSError`` becomes our transport errors
here and nowhere else.

The relay's key is pinned like an SSH host key: the first connection to a
``host:port`` records the key in ``known_relays`` under the key directory, a
later different key is refused *before* our identity is revealed (XX
message 3), and ``--relay-key FILE`` pins explicitly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from securechat import encoding, noise, wire
from securechat.errors import (
    ConnectionClosedError,
    CorruptKeyError,
    HandshakeError,
    RelayKeyChangedError,
    RelayUnreachableError,
    StorageError,
)

RELAY_PREFIX: Final = "screlay1"
KNOWN_RELAYS: Final = "known_relays"
READ_SIZE: Final = 256 * 1024
CONNECT_TIMEOUT: Final = 10.0


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RelayUnreachableError(f"bad relay address {text!r}: expected HOST:PORT")
    return host, int(port)


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
    """``host:port screlay1:...`` lines, like OpenSSH's known_hosts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _entries(self) -> dict[str, str]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from exc
        entries = {}
        for line in lines:
            address, _, token = line.strip().partition(" ")
            if address and token:
                entries[address] = token
        return entries

    def lookup(self, address: str) -> bytes | None:
        token = self._entries().get(address)
        if token is None:
            return None
        try:
            return encoding.decode_token(token, RELAY_PREFIX, wire.KEY_SIZE)
        except CorruptKeyError as exc:
            raise CorruptKeyError(f"{self.path}: entry for {address}: {exc}") from exc

    def remember(self, address: str, key: bytes) -> None:
        entries = self._entries()
        entries[address] = encoding.encode_token(RELAY_PREFIX, key)
        text = "".join(f"{a} {t}\n" for a, t in sorted(entries.items()))
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from exc


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
        sign_public: bytes = b"",
    ) -> RelayLink:
        """Connect and run the Noise XX handshake; check the relay key against the pin.

        ``sign_public``: our 32-byte Ed25519 public key, sent as the message-3 payload
        (encrypted, after the relay proved its key) so the relay's logs show the
        identity fingerprint users see (protocol 2); empty sends nothing, as before.
        """
        host, port = parse_address(address)
        expected = pinned_key if pinned_key is not None else known.lookup(address)

        def verify(remote: bytes) -> None:
            if expected is not None and remote != expected:
                raise RelayKeyChangedError(
                    f"the relay at {address} presented key {encoding.fingerprint(remote)} but "
                    f"{encoding.fingerprint(expected)} is pinned; this may be an attack. If the "
                    f"relay's key really changed, remove its line from {known.path}"
                )

        conn = noise.NoiseConnection(
            initiator=True, static_private=static_private, rng=os.urandom, verify_remote=verify,
            payload=sign_public,
        )
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise RelayUnreachableError(
                f"cannot reach the relay at {address}: {exc.strerror or exc}"
            ) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cls._handshake(sock, conn)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        if expected is None and conn.remote_static is not None:
            known.remember(address, conn.remote_static)
        return cls(sock, conn, address)

    @staticmethod
    def _handshake(sock: socket.socket, conn: noise.NoiseConnection) -> None:
        try:
            sock.sendall(conn.initiate())
            while not conn.complete:
                data = sock.recv(READ_SIZE)
                if not data:
                    raise HandshakeError("the relay closed the connection during the handshake")
                _events, _plain, reply = conn.receive_data(data)
                if reply:
                    sock.sendall(reply)
        except TimeoutError as exc:
            raise RelayUnreachableError("the relay did not complete the handshake in time") from exc
        except OSError as exc:
            raise RelayUnreachableError(f"connection to the relay failed: {exc}") from exc

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

