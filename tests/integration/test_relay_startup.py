"""Issue 12.1 and the relay's command line: a taken port or data folder is one clear line.

``securechat relay --port 5050`` while another relay runs used to print three chained
tracebacks, exit 1, and create the data folder and a new relay key first.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay_fixture import RelayProcess

pytestmark = pytest.mark.timeout(60)
from paths import REPO  # noqa: E402


def relay_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "securechat", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_port_in_use_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    first = RelayProcess.start(tmp_path / "first")
    try:
        data = tmp_path / "second"
        result = relay_cli("--port", str(first.port), "--data", str(data))
        assert result.returncode == 12  # InUseError: its own exit code
        assert result.stderr == (
            f"securechat: port {first.port} on 127.0.0.1 is in use (another relay?); "
            "pick another with --port\n"
        )
        assert result.stdout == ""
        assert not data.exists()  # no folder, no key, no store
    finally:
        assert first.stop()[0] == 0


def test_two_relays_cannot_share_a_data_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = RelayProcess.start(data)
    key_before = (data / "relay.key").read_text()
    try:
        result = relay_cli("--port", "0", "--data", str(data))
        assert result.returncode == 12
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert f"another relay is using the data folder {data}" in result.stderr
        assert "--data" in result.stderr
    finally:
        assert first.stop()[0] == 0
    assert (data / "relay.key").read_text() == key_before
    again = RelayProcess.start(data)  # the lock went with the first relay
    assert again.stop()[0] == 0


def test_unusable_address_is_one_line(tmp_path: Path) -> None:
    result = relay_cli("--host", "192.0.2.1", "--port", "0", "--data", str(tmp_path / "d"))
    assert result.returncode == 7
    assert result.stderr.startswith("securechat: cannot listen on 192.0.2.1:0: ")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_help_shows_every_default() -> None:
    from securechat.relay.server import _LIMIT_FLAGS

    result = relay_cli("--help")
    assert result.returncode == 0
    text = re.sub(r"\s+", " ", result.stdout)
    options = re.findall(r"(--[a-z-]+) [A-Z_{]", result.stdout)
    assert len(options) >= len(_LIMIT_FLAGS) + 5
    for flag, _field, _kind, _text in _LIMIT_FLAGS:
        # "--flag FLAG ... (default N)": the default follows the flag's own help
        match = re.search(re.escape(flag) + r" [A-Z_]+ (.*?)\(default ([^)]+)\)", text)
        assert match is not None, flag
    for flag in ("--host", "--port", "--data", "--sync", "--log-level"):
        assert re.search(re.escape(flag) + r" \S+ .*?\(default ", text), flag
