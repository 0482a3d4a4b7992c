"""Shared fixtures: an isolated key directory and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_fixture import Relay, keygen

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def sc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh SECURECHAT_HOME for this test (tests never touch ./keys)."""
    home = tmp_path / "home"
    monkeypatch.setenv("SECURECHAT_HOME", str(home))
    monkeypatch.delenv("SECURECHAT_PASSPHRASE", raising=False)
    yield home


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURECHAT_")}
    env["SECURECHAT_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    home: Path, *args: str, input: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m securechat ARGS`` as a user would, stdin not a TTY."""
    return subprocess.run(
        [sys.executable, "-m", "securechat", *args],
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(home, **env),
        cwd=home.parent,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A key directory with alice, bob and carol (unencrypted keys), for client tests."""
    home = tmp_path / "home"
    keygen(home, "alice", "bob", "carol")
    return home


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Relay]:
    """``securechat relay`` as a subprocess on a free loopback port."""
    server = Relay.start(tmp_path / "relay-data")
    yield server
    server.stop()
