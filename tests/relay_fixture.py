"""Real processes for the integration tests: the one relay subprocess and the one CLI runner.

    relay = RelayProcess.start(tmp_path / "relay", "--quota-frames", "1")
    result = run_cli(home, "send", "--key", "alice", "--peer", "bob", "--relay", relay.address)

Every child gets a clean environment (no ``SECURECHAT_*`` variable of the test run leaks
in), runs this checkout's code, and has its pipes read continuously (``PipeDrain``), so a
chatty child never blocks on a full pipe.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securechat.core.encoding import decode_token

from relayclient import PipeDrain, RelayClient

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
START_TIMEOUT = 15.0
LISTEN_RE = re.compile(r"listening on ([0-9.]+):(\d+) key (\S+)")


def cli_cmd() -> list[str]:
    """The real command line, as ``python -m securechat``."""
    return [sys.executable, "-m", "securechat"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a child: ours without SECURECHAT_*, this key directory and code."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURECHAT_")}
    env["SECURECHAT_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_cli(
    home: Path, *args: str, input: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """``securechat ARGS`` as a user runs it, stdin a pipe (so talk is in pipe mode)."""
    return subprocess.run(
        [*cli_cmd(), *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(home, **env),
        cwd=home.parent,
    )


def spawn(home: Path, *args: str, stdin: int = subprocess.PIPE) -> subprocess.Popen[str]:
    """``securechat ARGS`` running in the background, its output in pipes (text)."""
    return subprocess.Popen(
        [*cli_cmd(), *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(home),
        cwd=home.parent,
    )


def keygen(home: Path, *names: str, force: bool = False) -> None:
    """What ``securechat keygen NAME --no-passphrase`` does, in-process (it is faster)."""
    from securechat import files
    from securechat.core import keys

    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in names:
        identity = keys.generate_identity(name, os.urandom(keys.SEED_SIZE))
        private = keys.encode_private_key(identity, None, None).encode()
        public = (identity.public.to_line() + "\n").encode()
        files.write_new_file(home / f"{name}.key", private, mode=0o600, force=force)
        files.write_new_file(home / f"{name}.pub", public, mode=0o644, force=force)


def stop_process(
    proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Signal a child by its PID, wait ``timeout`` seconds, then kill it; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    return proc.returncode


class RelayProcess:
    """``securechat relay`` as a subprocess on a loopback port: start, connect, stop, restart.

    ``args`` are more relay flags (limits, ``--log-level``); they are kept across restarts.
    """

    def __init__(
        self, proc: subprocess.Popen[str], stdout: PipeDrain, match: re.Match[str],
        data_dir: Path, args: Sequence[str],
    ) -> None:  # fmt: skip
        self.proc = proc
        assert proc.stderr is not None
        self._stderr = PipeDrain(proc.stderr)
        self._stdout = stdout
        self.host = match.group(1)
        self.port = int(match.group(2))
        self.fingerprint = match.group(3)
        self.data_dir = data_dir
        self.args = tuple(args)
        self.public = decode_token(self.public_key_file.read_text().strip(), "screlay1", 32)

    @classmethod
    def start(
        cls, data_dir: Path, *args: str, port: int = 0, timeout: float = START_TIMEOUT
    ) -> RelayProcess:
        cmd = [*cli_cmd(), "relay", "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.Popen(
            [*cmd, "--data", str(data_dir), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(data_dir.parent / "relay-home"),
            cwd=REPO,
        )
        assert proc.stdout is not None
        stdout = PipeDrain(proc.stdout)
        match = stdout.wait_for(LISTEN_RE, timeout)
        if match is None:
            proc.kill()
            _, err = proc.communicate(timeout=5)
            raise RuntimeError(f"relay did not start: {stdout.snapshot()!r} {err[-2000:]}")
        return cls(proc, stdout, match, data_dir, args)

    @property
    def address(self) -> str:
        """HOST:PORT, as a client's ``--relay`` takes it."""
        return f"{self.host}:{self.port}"

    @property
    def public_key_file(self) -> Path:
        """The relay's ``relay.pub`` (what an operator hands to users for --relay-key)."""
        return self.data_dir / "relay.pub"

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
        """Signal the relay (by its PID), wait, return (exit code, stderr)."""
        stop_process(self.proc, sig, timeout)
        log = self._stderr.text()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode, log

    def kill(self) -> str:
        return self.stop(signal.SIGKILL)[1]

    def restart(self) -> RelayProcess:
        """Start again on the same port and data directory (after stop or kill)."""
        self.stop()
        return RelayProcess.start(self.data_dir, *self.args, port=self.port)


def talk(
    home: Path,
    key: str,
    peers: Sequence[str],
    relay: RelayProcess,
    lines: Sequence[str] = (),
    extra: Sequence[str] = (),
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """One pipe-mode talk run: send ``lines``, print what arrives, wait for acks."""
    args = ["talk", "--key", key, "--relay", relay.address]
    for peer in peers:
        args += ["--peer", peer]
    text = "".join(line + "\n" for line in lines)
    return run_cli(home, *args, *extra, input=text, timeout=timeout)
