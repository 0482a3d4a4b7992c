"""``python -m bench.idle_clients [--clients N] [--seconds S] [--repo PATH]``.

What N real, idle ``securechat talk`` processes cost: the relay's CPU and
memory, each client's CPU, and what each client writes to its own disk, over
a window in which nobody types. "Idle is free" is a promise about the real
client (prekey publishing, pings, state writes), so this starts the real CLI
(pipe mode, stdin held open and never written) against a real relay
subprocess on loopback, not the benchmark's lightweight clients.

``--repo`` runs another checkout's code (``PYTHONPATH``, and every process
starts outside any checkout, since ``python -m`` puts the working directory
first on the path), so a before/after pair is two runs of this script.
Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench import procfs

LISTEN_RE = re.compile(rb"listening on ([0-9.]+):(\d+)")
AUTH_RE = re.compile(rb"authenticated ")
START_TIMEOUT_S = 60.0
SETTLE_S = 3.0


def _keygen(repo: Path, home: Path, names: list[str]) -> None:
    """Through the public CLI, so any checkout (``--repo``) can make its own keys."""
    for name in names:
        subprocess.run(
            [sys.executable, "-m", "securechat", "keygen", name, "--no-passphrase"],
            check=True,
            env=_env(repo, home),
            cwd=home.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _env(repo: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURECHAT_")}
    env.update(PYTHONPATH=str(repo), SECURECHAT_HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def _wait_for(stream: IO[bytes], pattern: re.Pattern[bytes], count: int, timeout: float) -> bytes:
    """Read lines until ``pattern`` matched ``count`` times; return the last match's line."""
    deadline, seen, line = time.monotonic() + timeout, 0, b""
    os.set_blocking(stream.fileno(), True)
    while seen < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"saw {seen} of {count} lines matching {pattern.pattern!r}")
        line = stream.readline()
        if not line:
            raise RuntimeError("the relay exited")
        if pattern.search(line):
            seen += 1
    return line


def _disk(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("*.state.db*"))


def _disk_writes(pid: int) -> int:
    """Bytes the process asked the kernel to write (``/proc/PID/io`` wchar)."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def run(repo: Path, clients: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        names = [f"idle{i}" for i in range(clients)]
        _keygen(repo, home, names)
        relay = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "securechat",
                "relay",
                "--port",
                "0",
                "--data",
                str(Path(tmp) / "relay"),
                "--log-level",
                "INFO",
                "--max-per-ip",
                "100000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(repo, home),
            cwd=tmp,
        )
        procs: list[subprocess.Popen[bytes]] = []
        try:
            assert relay.stdout is not None and relay.stderr is not None
            match = LISTEN_RE.search(_wait_for(relay.stdout, LISTEN_RE, 1, START_TIMEOUT_S))
            assert match is not None
            address = f"{match.group(1).decode()}:{match.group(2).decode()}"
            for i, name in enumerate(names):
                peer = names[(i + 1) % clients] if clients > 1 else name
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "securechat",
                            "talk",
                            "--key",
                            name,
                            "--peer",
                            peer,
                            "--relay",
                            address,
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        env=_env(repo, home),
                        cwd=tmp,
                    )
                )
            _wait_for(relay.stderr, AUTH_RE, clients, START_TIMEOUT_S)
            time.sleep(SETTLE_S)  # first publish, presence, Synced: not idle yet
            relay_cpu0, disk0 = procfs.cpu_seconds(relay.pid), _disk(home)
            client_cpu0 = sum(procfs.cpu_seconds(p.pid) for p in procs)
            writes0 = sum(_disk_writes(p.pid) for p in procs)
            time.sleep(seconds)
            relay_cpu = procfs.cpu_seconds(relay.pid) - relay_cpu0
            client_cpu = sum(procfs.cpu_seconds(p.pid) for p in procs) - client_cpu0
            writes = sum(_disk_writes(p.pid) for p in procs) - writes0
            alive = sum(p.poll() is None for p in procs)
            return {
                "repo": str(repo),
                "clients": clients,
                "alive": alive,
                "seconds": seconds,
                "relay_cpu_share": relay_cpu / seconds,
                "relay_cpu_ms_per_client_s": relay_cpu * 1000 / seconds / clients,
                "relay_rss_mib": procfs.rss_kib(relay.pid) / 1024,
                "client_cpu_ms_per_client_s": client_cpu * 1000 / seconds / clients,
                "client_writes_bytes_per_client_s": writes / seconds / clients,
                "state_growth_bytes_per_client_s": (_disk(home) - disk0) / seconds / clients,
            }
        finally:
            for p in procs:
                if p.stdin is not None:
                    p.stdin.close()
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            relay.terminate()
            try:
                relay.wait(timeout=10)
            except subprocess.TimeoutExpired:
                relay.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_clients", description=__doc__)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 200 or not 1 <= args.seconds <= 600:
        parser.error("--clients 1..200 and --seconds 1..600")
    print(json.dumps(run(args.repo.resolve(), args.clients, args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
