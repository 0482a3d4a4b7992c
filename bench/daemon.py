"""``python -m bench.daemon [--subscribers N] [--idle S] [--messages M]``.

What the identity daemon (``securechat daemon``) costs and how fast it answers,
with real processes on loopback (a relay subprocess, the daemon subprocess, and
JSON-RPC clients on its Unix socket):

* idle: the daemon's CPU and the bytes it writes while N subscribers are
  connected and nothing happens (the promise: idle is free);
* ``version`` round trips through the socket (p50, p99);
* ``send`` of M messages to an offline peer (it connected once), one connection, until the relay
  accepted every one (the ``receipt`` events), and the events' replay rate
  (``subscribe`` from cursor 0).

Prints one JSON object on stdout. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procfs
from bench.idle_clients import LISTEN_RE, START_TIMEOUT_S, _disk_writes, _env, _keygen, _wait_for

SETTLE_S = 3.0
DAEMON_RE = re.compile(rb"daemon for \S+ listening on ")
WAIT_S = 120.0


class Line:
    """A blocking JSON-RPC line client (the benchmark's own, not the package's)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(WAIT_S)
        self.reader = self.sock.makefile("rb")
        self.next = 0

    def send(self, method: str, params: dict[str, Any]) -> int:
        self.next += 1
        line = {"jsonrpc": "2.0", "id": self.next, "method": method, "params": params}
        self.sock.sendall(json.dumps(line).encode() + b"\n")
        return self.next

    def read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise RuntimeError("the daemon closed the connection")
        value: dict[str, Any] = json.loads(line)
        return value

    def call(self, method: str, params: dict[str, Any]) -> Any:
        req = self.send(method, params)
        while True:
            message = self.read()
            if message.get("id") == req:
                return message.get("result", message.get("error"))

    def close(self) -> None:
        self.sock.close()


def _start(cmd: list[str], env: dict[str, str], cwd: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run(repo: Path, subscribers: int, idle_s: float, messages: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        _keygen(repo, home, ["alice", "bob"])
        env = _env(repo, home)
        sc = [sys.executable, "-m", "securechat"]
        relay = _start([*sc, "relay", "--port", "0", "--data", f"{tmp}/relay"], env, tmp)
        daemon = None
        clients: list[Line] = []
        try:
            assert relay.stdout is not None
            match = LISTEN_RE.search(_wait_for(relay.stdout, LISTEN_RE, 1, START_TIMEOUT_S))
            assert match is not None
            address = f"{match.group(1).decode()}:{match.group(2).decode()}"
            # bob connects once (publishes prekeys): a mailbox that never connected is
            # limited to 200 frames by the relay, which would be what we measure.
            subprocess.run(
                [*sc, "receive", "--key", "bob", "--relay", address, "--timeout", "1"],
                env=env, cwd=tmp, check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            daemon = _start([*sc, "daemon", "--key", "alice", "--relay", address], env, tmp)
            assert daemon.stderr is not None
            _wait_for(daemon.stderr, DAEMON_RE, 1, START_TIMEOUT_S)
            sock = home / "alice.sock"
            clients = [Line(sock) for _ in range(subscribers)]
            for c in clients:
                c.call("subscribe", {})
            time.sleep(SETTLE_S)
            cpu0, writes0 = procfs.cpu_seconds(daemon.pid), _disk_writes(daemon.pid)
            time.sleep(idle_s)
            idle_cpu = procfs.cpu_seconds(daemon.pid) - cpu0
            idle_writes = _disk_writes(daemon.pid) - writes0

            rpc = Line(sock)
            trips = []
            for _ in range(500):
                start = time.perf_counter()
                rpc.call("version", {})
                trips.append(time.perf_counter() - start)
            trips.sort()

            rpc.call("subscribe", {})
            start = time.perf_counter()
            for i in range(messages):
                rpc.send("send", {"to": ["bob"], "text": f"message {i}"})
            accepted = answered = 0
            deadline = time.monotonic() + WAIT_S
            while (accepted < messages or answered < messages) and time.monotonic() < deadline:
                m = rpc.read()
                params = m.get("params", {})
                if "id" in m and "result" in m:
                    answered += 1
                elif params.get("type") == "receipt" and params.get("status") == "accepted":
                    accepted += 1
            send_s = time.perf_counter() - start

            replay = Line(sock)
            cursor = replay.call("version", {})["cursor"]
            start = time.perf_counter()
            replay.send("subscribe", {"since": 0})
            seen = 0
            while seen < cursor and time.monotonic() < deadline:
                params = replay.read().get("params", {})
                if isinstance(params.get("cursor"), int):
                    seen = params["cursor"]
            replay_s = time.perf_counter() - start
            return {
                "subscribers": subscribers,
                "idle_seconds": idle_s,
                "idle_daemon_cpu_ms_per_s": idle_cpu * 1000 / idle_s,
                "idle_daemon_write_bytes_per_s": idle_writes / idle_s,
                "daemon_rss_mib": procfs.rss_kib(daemon.pid) / 1024,
                "version_rtt_ms_p50": statistics.median(trips) * 1000,
                "version_rtt_ms_p99": trips[int(len(trips) * 0.99)] * 1000,
                "messages": messages,
                "accepted": accepted,
                "send_until_accepted_msgs_per_s": messages / send_s,
                "replayed_events": seen,
                "replay_events_per_s": seen / replay_s if replay_s else 0.0,
            }
        finally:
            for c in clients:
                c.close()
            if daemon is not None:
                _stop(daemon)
            _stop(relay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=8)
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    if not 1 <= args.subscribers <= 16 or not 1 <= args.idle <= 600:
        parser.error("--subscribers 1..16 and --idle 1..600")
    if not 1 <= args.messages <= 5000:
        parser.error("--messages 1..5000")
    print(
        json.dumps(run(args.repo.resolve(), args.subscribers, args.idle, args.messages), indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
