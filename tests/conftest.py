"""Shared fixtures: an isolated key directory and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_VECTORS = REPO.parent / "shared" / "vectors"


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
