"""Shared fixtures: an isolated key directory, keys in it, and a relay subprocess.

The process helpers themselves (``run_cli``, ``spawn``, ``RelayProcess``) live in
``relay_fixture.py``, so test modules import them from one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_fixture import RelayProcess, keygen


@pytest.fixture
def sc_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh SECURECHAT_HOME for this test (tests never touch ./keys)."""
    home = tmp_path / "home"
    monkeypatch.setenv("SECURECHAT_HOME", str(home))
    monkeypatch.delenv("SECURECHAT_PASSPHRASE", raising=False)
    yield home


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A key directory with alice, bob and carol (unencrypted keys), for client tests."""
    home = tmp_path / "home"
    keygen(home, "alice", "bob", "carol")
    return home


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    """``securechat relay`` as a subprocess on a free loopback port."""
    server = RelayProcess.start(tmp_path / "relay-data")
    yield server
    server.stop()
