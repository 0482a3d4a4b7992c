"""A small blocking relay client (socket + Noise initiator + frame decoder), and a reader
that drains a child's pipe. For tests and the benchmark (the relay process itself is
``relay_fixture.RelayProcess``).

    relay = RelayProcess.start(tmp_path)
    with RelayClient.connect("127.0.0.1", relay.port, alice_private, relay.public) as c:
        c.send_frame(wire.Send(msg_id, wire.mailbox_address(bob_public), b"hi"))
        frame = c.recv_frame(timeout=5)
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import IO

from securechat.core import dh, wire
from securechat.core.noise import NoiseConnection
from securechat.errors import ConnectionClosedError, RelayKeyChangedError

LISTEN_RE = re.compile(r"listening on ([0-9.]+):(\d+) key (\S+)")


def new_identity() -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 pair."""
    private = os.urandom(32)
    return private, dh.public_key(private)


class RelayClient:
    """One authenticated connection to the relay; every call is bounded in time."""

    def __init__(self, sock: socket.socket, noise: NoiseConnection, relay_key: bytes) -> None:
        self.sock = sock
        self.noise = noise
        self.relay_key = relay_key
        self.decoder = wire.FrameDecoder()
        self.frames: deque[wire.Frame] = deque()
        self.closed = False

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        static_private: bytes,
        expected_relay_key: bytes | None = None,
        timeout: float = 5.0,
        source: str | None = None,
        payload: bytes = b"",
    ) -> RelayClient:
        """``source``: a local address to connect from (any 127.x.y.z works on Linux
        loopback, so tests can play clients from different networks); ``payload``: the
        Noise message-3 payload (a client's Ed25519 public key, or nothing)."""

        def verify(remote: bytes) -> None:
            if expected_relay_key is not None and remote != expected_relay_key:
                raise RelayKeyChangedError("the relay presented a different key than pinned")

        sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        noise = NoiseConnection(
            initiator=True,
            static_private=static_private,
            rng=os.urandom,
            verify_remote=verify,
            payload=payload,
        )
        try:
            sock.sendall(noise.initiate())
            deadline = time.monotonic() + timeout
            leftover = b""
            while not noise.complete:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = sock.recv(65536)
                if not data:
                    raise ConnectionClosedError("relay closed the connection during the handshake")
                _, plain, reply = noise.receive_data(data)
                leftover += plain
                if reply:
                    sock.sendall(reply)
        except BaseException:
            sock.close()
            raise
        assert noise.remote_static is not None
        client = cls(sock, noise, noise.remote_static)
        if leftover:
            client.frames.extend(client.decoder.feed(leftover))
        return client

    def __enter__(self) -> RelayClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()

    # --- sending ---------------------------------------------------------------------------
    def send_frames(self, frames: list[wire.Frame]) -> None:
        self.send_plain(b"".join(wire.encode(f) for f in frames))

    def send_frame(self, frame: wire.Frame) -> None:
        self.send_plain(wire.encode(frame))

    def send_plain(self, plaintext: bytes) -> None:
        """Raw application bytes inside the Noise channel (for hostile-input tests)."""
        self.sock.sendall(self.noise.send(plaintext))

    # --- receiving -------------------------------------------------------------------------
    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the relay in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except TimeoutError as exc:
            raise TimeoutError("no frame from the relay in time") from exc
        except ConnectionResetError as exc:
            raise ConnectionClosedError("relay reset the connection") from exc
        if not data:
            raise ConnectionClosedError("relay closed the connection")
        _, plain, _ = self.noise.receive_data(data)
        if plain:
            self.frames.extend(self.decoder.feed(plain))

    def recv_frame(self, timeout: float = 5.0) -> wire.Frame:
        deadline = time.monotonic() + timeout
        while not self.frames:
            self._fill(deadline)
        return self.frames.popleft()

    def recv_until(
        self, predicate: Callable[[wire.Frame], bool], timeout: float = 5.0
    ) -> tuple[wire.Frame, list[wire.Frame]]:
        """The first frame matching ``predicate`` and the frames skipped before it."""
        deadline = time.monotonic() + timeout
        skipped: list[wire.Frame] = []
        while True:
            while not self.frames:
                self._fill(deadline)
            frame = self.frames.popleft()
            if predicate(frame):
                return frame, skipped
            skipped.append(frame)

    def expect_closed(self, timeout: float = 5.0) -> list[wire.Frame]:
        """Read until the relay closes; return the frames seen (e.g. a final Error)."""
        deadline = time.monotonic() + timeout
        seen: list[wire.Frame] = []
        try:
            while True:
                while self.frames:
                    seen.append(self.frames.popleft())
                self._fill(deadline)
        except ConnectionClosedError:
            return seen + list(self.frames)


class PipeDrain:
    """Reads a child's pipe continuously so the child never blocks on a full pipe.

    A relay that logs a line per connection fills a 64 KiB pipe within a few
    hundred connections; if nobody reads it, its worker threads block in the
    logging call and look exactly like a relay that lost a message.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._chunks: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                with self._changed:
                    self._chunks.append(line)
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._eof = True
                self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """The first line matching ``pattern``, waiting up to ``timeout`` seconds; None if
        the child closed the pipe or the time ran out first.

        (A selector on the pipe cannot do this: a text stream reads ahead, so a second
        line may sit in its buffer while select() waits for more bytes that never come.)"""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self._chunks[seen:]:
                    match = pattern.search(line)
                    if match is not None:
                        return match
                seen = len(self._chunks)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def text(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        return "".join(self._chunks)

    def snapshot(self) -> str:
        """What was read so far (the child may still be writing)."""
        return "".join(list(self._chunks))
