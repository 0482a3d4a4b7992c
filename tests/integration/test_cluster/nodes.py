"""A Redis server and relay nodes sharing it, as real processes on loopback (issue 16).

``redis-server`` (Debian's package; ``.ci/run`` installs it) runs on a free
loopback port with the persistence the relay requires (AOF, fsync on every
write) in the test's own folder, and is stopped by its PID. Locally a machine
without it skips these tests with the reason; with ``SECURECHAT_REQUIRE_REDIS=1``
(CI) a missing ``redis-server`` fails them instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from securechat.relay import keyfile

from relay_fixture import RelayProcess

REQUIRE_ENV = "SECURECHAT_REQUIRE_REDIS"
START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` in a folder of its own; ``restart`` keeps the port and the data."""

    def __init__(self, folder: Path, *extra: str, port: int = 0) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.folder = folder
        self.port = port or free_port()
        self.extra = extra
        folder.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(folder),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--logfile", str(folder / "redis.log"),
            *extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start: {log}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> str:
        """One command through redis-cli (for assertions on what Redis holds)."""
        cli = shutil.which("redis-cli")
        assert cli is not None
        done = subprocess.run(
            [cli, "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def restart(self, sig: int = signal.SIGKILL) -> RedisServer:
        self.stop(sig)
        return RedisServer(self.folder, *self.extra, port=self.port)


def redis_available() -> bool:
    if shutil.which("redis-server") and shutil.which("redis-cli"):
        return True
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail("redis-server is required here (SECURECHAT_REQUIRE_REDIS=1): not installed")
    pytest.skip("redis-server not installed (apt-get install redis-server; CI installs it)")
    return False


class Cluster:
    """Relay nodes sharing one Redis and one relay key (``--key``), each its own --data."""

    def __init__(self, base: Path, redis: RedisServer, *extra: str) -> None:
        self.base = base
        self.redis = redis
        self.extra = extra
        self.key = base / "relaykey" / keyfile.KEY_FILE
        keyfile.load_or_create(self.key.parent)
        self.nodes: list[RelayProcess] = []

    def start_node(self, *extra: str, port: int = 0) -> RelayProcess:
        index = len(self.nodes) + 1
        node = RelayProcess.start(
            self.base / f"node{index}",
            "--cluster", self.redis.url,
            "--key", str(self.key),
            "--log-level", "INFO",
            *self.extra,
            *extra,
            port=port,
        )  # fmt: skip
        self.nodes.append(node)
        return node

    def addresses(self) -> str:
        return ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def stop(self) -> list[str]:
        """Stop every node still running; their logs."""
        return [node.stop()[1] for node in self.nodes]
