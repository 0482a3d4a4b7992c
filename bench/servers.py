"""Start and stop the servers under test: the securechat relay and the naive relay.

Each server is a subprocess whose output goes to a log file (never a pipe
that could fill up and stall it); we wait for its ``listening on HOST:PORT``
line. :meth:`Server.stop` sends SIGTERM, then SIGKILL after a grace period:
callers use it in ``finally`` so nothing outlives the benchmark.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTEN_RE = re.compile(r"listening on ([0-9.]+):(\d+)")
STOP_GRACE_S = 5.0
BENCH_MAX_PER_IP = 20_000
# The per-network (/24) admission limits, lifted like --max-per-ip (relays before issue 11
# do not have these flags: bench.ab gives them to a baseline only if its relay knows them).
BENCH_NETWORK_ARGS = [
    "--max-per-prefix",
    str(BENCH_MAX_PER_IP),
    "--max-handshakes",
    "4096",
    "--max-handshakes-per-prefix",
    "4096",
    "--accept-rate",
    "1000000",
    "--accept-burst",
    "1000000",
]


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    logfile: Path
    version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_GRACE_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_line(proc: subprocess.Popen[bytes], logfile: Path, needle: str, timeout: float) -> str:
    """Poll ``logfile`` until a line containing ``needle`` appears; return that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if logfile.exists():
            for line in logfile.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else ""
            raise RuntimeError(f"exited with code {proc.returncode}: {tail}")
        time.sleep(0.05)
    raise RuntimeError(f"no '{needle}' line within {timeout:.0f} s")


def _start(name: str, argv: list[str], workdir: Path, timeout: float = 30.0) -> Server:
    logfile = workdir / f"{name}.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    server = Server(name, proc, "127.0.0.1", 0, logfile)
    try:
        line = wait_for_line(proc, logfile, "listening on", timeout)
    except BaseException:
        server.stop()
        raise
    match = LISTEN_RE.search(line)
    if match is None:
        server.stop()
        raise RuntimeError(f"cannot parse {line!r}")
    server.host, server.port = match.group(1), int(match.group(2))
    return server


def start_naive(workdir: Path) -> Server:
    return _start("naive", [sys.executable, "-m", "bench.naive_relay", "--port", "0"], workdir)


_RELAY_FALLBACK = """
import argparse, sys
from securechat.relay.server import add_arguments, run_relay
p = argparse.ArgumentParser()
add_arguments(p)
sys.exit(run_relay(p.parse_args(sys.argv[1:])))
"""


_CLI_HAS_RELAY: list[bool] = []


def _cli_has_relay() -> bool:
    """Whether ``securechat relay`` exists yet (asked once per benchmark run)."""
    if not _CLI_HAS_RELAY:
        probe = subprocess.run(
            [sys.executable, "-m", "securechat", "relay", "--help"],
            capture_output=True,
            cwd=REPO,
            timeout=60,
        )
        _CLI_HAS_RELAY.append(probe.returncode == 0)
    return _CLI_HAS_RELAY[0]


def start_securechat(workdir: Path, extra: list[str] | None = None) -> Server:
    """``python -m securechat relay --port 0 --data DIR``; the relay module directly if
    the CLI does not have the relay command yet."""
    data = workdir / "relay-data"
    data.mkdir(exist_ok=True)
    # Every load client comes from 127.0.0.1: lift the per-address and per-network caps (a
    # household behind one NAT, one /24, by default), nothing else; the relay otherwise runs
    # with its shipped defaults.
    args = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data",
        str(data),
        "--max-per-ip",
        str(BENCH_MAX_PER_IP),
        *BENCH_NETWORK_ARGS,
        *(extra or []),
    ]
    if _cli_has_relay():
        argv = [sys.executable, "-m", "securechat", "relay", *args]
    else:
        argv = [sys.executable, "-c", _RELAY_FALLBACK, *args]
    return _start("securechat", argv, workdir)
