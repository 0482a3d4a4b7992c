"""Real processes for the client tests: a relay subprocess and the securechat CLI."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relayclient import PipeDrain

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
START_TIMEOUT = 15.0


def cli_cmd() -> list[str]:
    """The real command line, as ``python -m securechat``."""
    return [sys.executable, "-m", "securechat"]


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURECHAT_")}
    env["SECURECHAT_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run(
    home: Path, *args: str, input: str = "", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``securechat ARGS`` with stdin a pipe (so talk is in pipe mode)."""
    return subprocess.run(
        [*cli_cmd(), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_for(home),
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
        env=env_for(home),
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


@dataclass
class Relay:
    """``securechat relay`` on a free loopback port, stoppable and restartable."""

    data: Path
    proc: subprocess.Popen[str]
    address: str
    log: PipeDrain | None = None  # the relay's stderr, read continuously (see PipeDrain)
    extra: tuple[str, ...] = ()  # more relay flags (limits), kept across restarts

    @classmethod
    def start(cls, data: Path, port: int = 0, extra: Sequence[str] = ()) -> Relay:
        proc = subprocess.Popen(
            [
                *cli_cmd(),
                "relay",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data",
                str(data),
                "--log-level",
                "WARNING",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(data.parent / "relay-home"),
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=deadline - time.monotonic()):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if "listening on " in line:
                    address = line.split("listening on ", 1)[1].split()[0]
                    assert proc.stderr is not None
                    return cls(data, proc, address, PipeDrain(proc.stderr), tuple(extra))
        proc.kill()
        _, err = proc.communicate(timeout=5)
        raise RuntimeError(f"relay did not start: {err}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.log is not None:
            self.log.text()  # the pipe reached EOF: the reader thread is done with it
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode

    def restart(self) -> Relay:
        """Stop and start again on the same port with the same data (and key)."""
        self.stop()
        return Relay.start(self.data, self.port, self.extra)

    @property
    def public_key_file(self) -> Path:
        """The relay's ``relay.pub`` (what an operator hands to users for --relay-key)."""
        return self.data / "relay.pub"


def talk(
    home: Path,
    key: str,
    peers: Sequence[str],
    relay: Relay,
    lines: Sequence[str] = (),
    extra: Sequence[str] = (),
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """One pipe-mode talk run: send ``lines``, print what arrives, wait for acks."""
    args = ["talk", "--key", key, "--relay", relay.address]
    for peer in peers:
        args += ["--peer", peer]
    text = "".join(line + "\n" for line in lines)
    return run(home, *args, *extra, input=text, timeout=timeout)
