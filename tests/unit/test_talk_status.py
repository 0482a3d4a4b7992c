"""The talk screen's pure parts: the status line, message rows, the transcript left at exit."""

from __future__ import annotations

import pytest
from prompt_toolkit.utils import get_cwidth
from securechat.errors import RelayKeyChangedError, RelayUnreachableError
from securechat.ui import format as fmt
from securechat.ui import lines, status


def _status(**changes: object) -> status.Status:
    base: dict[str, object] = dict(
        connected=False,
        relay="127.0.0.1:5999",
        detail="connecting to 127.0.0.1:5999…",
        failure=None,
        retrying=True,
        members="bob",
        pending=0,
        blocked=False,
    )
    base.update(changes)
    return status.Status(**base)  # type: ignore[arg-type]


def _text(state: status.Status, columns: int) -> str:
    return "".join(text for _style, text, *_ in status.fragments(state, columns))


def test_offline_reason_is_the_brief_cause_once() -> None:
    refused = RelayUnreachableError("the relay at 127.0.0.1:5999 refused the connection: long")
    refused.brief = "connection refused"
    line = _text(_status(failure=refused), 110)
    assert line.startswith(" ○ offline connection refused, retrying │ with bob │ 0 pending")
    assert "offline offline" not in line
    changed = RelayKeyChangedError("the relay at x presented key A but B is pinned (in f)")
    assert "presented key A but B is pinned, not retrying" in _text(
        _status(failure=changed, retrying=False), 200
    )


@pytest.mark.parametrize("columns", [40, 60, 80, 110])
def test_status_line_fits_and_cuts_at_a_word(columns: int) -> None:
    failure = RelayUnreachableError("x")
    failure.brief = "cannot find the relay's host 'relay.example.org' anywhere at all"
    line = _text(_status(failure=failure), columns)
    reason = line.split(" ○ offline ", 1)[1].split(" │ ", 1)[0]
    if get_cwidth(line) > columns:  # only the fixed parts may not fit a very narrow terminal
        assert reason in ("", "…")
    else:
        assert reason.endswith("…") or reason.endswith("retrying")
        assert not reason.rstrip("…").endswith((" ", ","))


def test_fit() -> None:
    assert status.fit("short", 10) == "short"
    assert status.fit("one two three four", 12) == "one two…"
    assert status.fit("abcdefghij", 5) == "abcd…"
    assert status.fit("anything", 1) == "…" and status.fit("anything", 0) == ""
    assert get_cwidth(status.fit("表示" * 20, 9)) <= 9


def test_multi_line_message_rows_align_and_are_bounded() -> None:
    line = lines.Line(
        "msg", lines.message_text("one\ntwo\r\nthree"), "12:00", "alice", "own", status=1
    )
    assert lines.plain(line).split("\n") == [
        "12:00 alice: one",
        "             two",
        "             three  ✓",
    ]
    flood = lines.message_text("\n" * 5000)
    assert flood.count("\n") == fmt.MAX_MESSAGE_ROWS - 1 and "more lines" in flood


def test_screen_text_drops_joiners_only_on_the_screen() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f \U0001f44d\U0001f3fd"
    shown = lines.message_text(family)
    assert "\u200d" not in shown and "\ufe0f" not in shown and "\U0001f3fd" not in shown
    assert fmt.text_lines(family) == [family]  # history keeps the exact text


def test_transcript_is_the_last_rows() -> None:
    rows = [lines.Line("info", f"row {i}") for i in range(10)]
    rows.append(lines.Line("msg", "a\nb", "12:00", "bob"))
    assert lines.transcript(rows, 3) == ["row 9", "12:00 bob: a", "           b"]
    assert lines.transcript(rows, 0) == []
