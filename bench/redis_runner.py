"""Find (or install) Debian's ``redis-server`` and run it on a free loopback port.

Why these options: ``--save "" --appendonly no`` turns persistence off
(pub/sub never touches disk anyway), and ``client-output-buffer-limit pubsub
0 0 0`` stops Redis from disconnecting a subscriber that falls behind, so
Redis delivers everything, as the relays must, and its memory under a burst
shows what buffering everything costs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from bench.servers import Server, free_port, wait_for_line

APT_TIMEOUT_S = 600


def find_or_install(log: list[str]) -> str | None:
    """Path of redis-server, installing it with apt-get when we are root; None if impossible."""
    path = shutil.which("redis-server")
    if path:
        return path
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        log.append("redis-server not found and cannot install it (needs root and apt-get)")
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for attempt in ("install", "update+install"):
        if attempt == "update+install":
            subprocess.run([apt, "update"], env=env, capture_output=True, timeout=APT_TIMEOUT_S)
        done = subprocess.run(
            [apt, "install", "-y", "redis-server"],
            env=env,
            capture_output=True,
            timeout=APT_TIMEOUT_S,
        )
        path = shutil.which("redis-server")
        if done.returncode == 0 and path:
            log.append(f"installed redis-server with apt-get ({attempt})")
            return path
    log.append("apt-get install redis-server failed: Redis figures unavailable")
    return None


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start(workdir: Path, log: list[str]) -> Server | None:
    """Start redis-server; None (and a reason in ``log``) if Redis cannot be had."""
    binary = find_or_install(log)
    if binary is None:
        return None
    port = free_port()
    logfile = workdir / "redis.log"
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(workdir),
        "--maxclients",
        "19000",
        "--client-output-buffer-limit",
        "pubsub 0 0 0",
        "--logfile",
        str(logfile),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = Server("redis", proc, "127.0.0.1", port, logfile)
    try:
        wait_for_line(proc, logfile, "Ready to accept connections", 20.0)
        deadline = time.monotonic() + 10
        while not _ping(port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server does not answer PING")
            time.sleep(0.05)
    except Exception as exc:
        server.stop()
        log.append(f"redis-server did not start: {exc}")
        return None
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    server.version = version.split()[2] if version else "?"
    return server
