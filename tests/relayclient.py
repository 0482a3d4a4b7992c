"""A small blocking relay client (socket + Noise initiator + frame decoder) and a
helper that runs the relay as a real subprocess. For tests and the benchmark.

    relay = RelayProcess.start(tmp_path)
    with RelayClient.connect("127.0.0.1", relay.port, alice_private, relay.public) as c:
        c.send_frame(wire.Send(msg_id, wire.mailbox_address(bob_public), b"hi"))
        frame = c.recv_frame(timeout=5)
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from securechat.core import dh, wire
from securechat.core.encoding import decode_token
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
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._chunks.append(line)

    def text(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        return "".join(self._chunks)

    def snapshot(self) -> str:
        """What was read so far (the child may still be writing)."""
        return "".join(list(self._chunks))


class RelayProcess:
    """``securechat relay`` as a subprocess on a free loopback port."""

    def __init__(self, proc: subprocess.Popen[str], host: str, port: int, fp: str,
                 data_dir: Path, args: list[str]) -> None:  # fmt: skip
        self.proc = proc
        assert proc.stderr is not None and proc.stdout is not None
        self._stderr = PipeDrain(proc.stderr)
        self._stdout = PipeDrain(proc.stdout)
        self.host = host
        self.port = port
        self.fingerprint = fp
        self.data_dir = data_dir
        self.args = args
        pub_line = (data_dir / "relay.pub").read_text().strip()
        self.public = decode_token(pub_line, "screlay1", 32)

    @classmethod
    def start(
        cls, data_dir: Path, *args: str, port: int = 0, timeout: float = 15.0
    ) -> RelayProcess:
        argv = ["--port", str(port), "--data", str(data_dir), *args]
        cmd = [sys.executable, "-m", "securechat", "relay", *argv]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line or proc.poll() is not None:
                break
        match = LISTEN_RE.search(line)
        if match is None:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"relay did not start: {line!r} {err[-2000:]}")
        return cls(proc, match.group(1), int(match.group(2)), match.group(3), data_dir, list(args))

    def connect(self, private: bytes, **kw: Any) -> RelayClient:
        return RelayClient.connect(self.host, self.port, private, self.public, **kw)

    def rss_kib(self) -> int:
        """The relay process's resident memory (KiB), from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def log_text(self) -> str:
        """What the relay wrote to stderr so far."""
        return self._stderr.snapshot()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> tuple[int, str]:
        """Signal the relay, wait, return (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        return self.proc.returncode, self._stderr.text()

    def kill(self) -> str:
        return self.stop(signal.SIGKILL)[1]

    def restart(self) -> RelayProcess:
        """Start again on the same port and data directory (after stop or kill)."""
        return RelayProcess.start(self.data_dir, *self.args, port=self.port)
