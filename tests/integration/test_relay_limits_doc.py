"""One source of truth for the relay's limits (issue 13.11): every number that
``docs/protocol.md`` (sections 2, 3.1 and 3.6) and ``docs/operations.md`` state for a limit or
a size equals the code's constant, and every flag is in both tables with its default.

It was: ``--workers`` 2 in the spec and 1 in ``relay --help``; ``--max-per-ip`` 12,000 in the
spec and 256 in operations.md; a handshake record limit of 1,104 that the code never had.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from securechat.core import noise, wire
from securechat.relay import delivery, limits
from securechat.relay.limits import RelayConfig
from securechat.relay.server import _LIMIT_FLAGS

from paths import DOCS

ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+) \|", re.M)
FLAG_FIELDS = {flag: field for flag, field, _kind, _text in _LIMIT_FLAGS}


def number(cell: str) -> float:
    match = re.match(r"\s*([0-9][0-9,]*(?:\.[0-9]+)?)", cell)
    assert match is not None, f"no number in {cell!r}"
    return float(match.group(1).replace(",", ""))


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + 1)
    nxt = text.find("\n### ", start + 1)
    ends = [e for e in (end, nxt) if e != -1]
    return text[start : min(ends) if ends else len(text)]


def flag_rows(text: str) -> dict[str, float]:
    return {name: number(cell) for name, cell in ROW.findall(text) if name.startswith("--")}


@pytest.mark.parametrize(
    ("doc", "heading"),
    [("protocol.md", "### 3.6 Limits and defaults"), ("operations.md", "### Limits (all flags")],
)
def test_every_flag_and_default_in_the_docs_table(doc: str, heading: str) -> None:
    rows = flag_rows(section((DOCS / doc).read_text(), heading))
    defaults = RelayConfig()
    assert set(rows) == set(FLAG_FIELDS), set(rows) ^ set(FLAG_FIELDS)
    for flag, value in rows.items():
        assert value == float(getattr(defaults, FLAG_FIELDS[flag])), (doc, flag, value)


def test_fixed_relay_constants_in_protocol_3_6() -> None:
    text = section((DOCS / "protocol.md").read_text(), "### 3.6 Limits and defaults")
    rows = {name: number(cell) for name, cell in ROW.findall(text) if name.isupper()}
    assert len(rows) >= 15
    for name, value in rows.items():
        code = getattr(limits, name, None)
        if code is None:
            code = getattr(delivery, name)
        assert float(code) == value, (name, value, code)


def test_wire_sizes_and_limits_in_protocol_3_1() -> None:
    text = section((DOCS / "protocol.md").read_text(), "### 3.1 Frames")
    rows = {name: number(cell) for name, cell in ROW.findall(text) if name.isupper()}
    assert set(rows) >= {"ID_SIZE", "KEY_SIZE", "MAX_FRAME", "MAX_PAYLOAD", "MAX_ACKS"}
    for name, value in rows.items():
        assert float(getattr(wire, name)) == value, name
    assert "MAX_FRAME (1 MiB)" in text and wire.MAX_FRAME == 1 << 20


def test_link_limits_in_protocol_2() -> None:
    text = section((DOCS / "protocol.md").read_text(), "## 2. The link")
    record = re.search(r"during the handshake at most \*\*([0-9,]+)\*\*", text)
    payload = re.search(r"at most \*\*([0-9,]+) bytes\*\* each", text)
    assert record is not None and payload is not None
    assert number(record.group(1)) == noise.MAX_HANDSHAKE_RECORD
    assert number(payload.group(1)) == noise.MAX_HANDSHAKE_PAYLOAD
    assert "1,104" not in text
    timeout = re.search(r"`--handshake-timeout` \((\d+) s\)", text)
    frame = re.search(r"`--frame-timeout` \((\d+) s\)", text)
    assert timeout is not None and frame is not None
    assert float(timeout.group(1)) == RelayConfig().handshake_timeout
    assert float(frame.group(1)) == RelayConfig().frame_timeout


def test_help_defaults_are_the_code_defaults() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "securechat", "relay", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    text = re.sub(r"\s+", " ", result.stdout)
    defaults = RelayConfig()
    for flag, field in FLAG_FIELDS.items():
        match = re.search(re.escape(flag) + r" [A-Z_]+ .*?\(default ([0-9.]+)\)", text)
        assert match is not None, flag
        assert float(match.group(1)) == float(getattr(defaults, field)), flag
