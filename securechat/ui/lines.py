"""Lines of the talk screen's message area and how they are drawn (prompt_toolkit styles).

A :class:`Line` is mutable on purpose: the delivery mark of one of our own
messages changes as the relay and then the peer acknowledge it. Only the UI
thread touches lines. A message's text may span several rows (a newline in the
message); rows after the first are aligned under the first row's text, and the
mark follows the last row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.styles import Style
from prompt_toolkit.utils import get_cwidth

from securechat.client.events import STATUS_ACCEPTED, STATUS_PENDING
from securechat.ui import format as fmt

STYLE: Final = Style.from_dict(
    {
        "time": "#888888",
        "own": "bold #5fafff",
        "peer": "bold #87d75f",
        "unverified": "bold #ffaf00",
        "mark": "#888888",
        "mark.delivered": "#5fafff",
        "refused": "bold #ff5f5f",
        "info": "#aaaaaa",
        "notice": "italic #aaaaaa",
        "error": "bold #ff5f5f",
        "warn": "bold reverse #ff5f5f",
        "other": "#af87ff",
        "status": "reverse",
        "status.online": "reverse bold #87d75f",
        "status.offline": "reverse bold #ff5f5f",
        "prompt": "bold",
    }
)


@dataclass(slots=True)
class Line:
    """One line of the message area; ``status`` changes as acknowledgements arrive."""

    style: str  # "msg" or a style class for notices
    text: str  # already safe for the terminal; rows separated by "\n"
    when: str = ""
    sender: str = ""
    sender_style: str = "peer"
    status: int | None = None
    refused: bool = False
    other_conv: bool = False


def message_text(text: str) -> str:
    """A message's text as the screen draws it (see :func:`format.screen_lines`)."""
    return "\n".join(fmt.screen_lines(text))


def rows(line: Line) -> int:
    return line.text.count("\n") + 1


def render(line: Line) -> StyleAndTextTuples:
    if line.style != "msg":
        return [(f"class:{line.style}", line.text)]
    out: StyleAndTextTuples = [("class:time", f"{line.when} ")]
    if line.other_conv:
        out.append(("class:other", "[other chat] "))
    out += [(f"class:{line.sender_style}", line.sender), ("", ": ")]
    indent = sum(get_cwidth(text) for _style, text, *_ in out)
    out.append(("", fmt.indent_continuation(line.text.split("\n"), indent)))
    if line.refused:
        out.append(("class:refused", f"  {fmt.MARK_REFUSED}"))
    elif line.status is not None:
        style = "class:mark.delivered" if line.status > STATUS_ACCEPTED else "class:mark"
        out.append((style, f"  {fmt.mark(line.status)}"))
    return out


def plain(line: Line) -> str:
    """The line as text without styles (what stays on the terminal after talk exits)."""
    return "".join(text for _style, text, *_ in render(line))


def transcript(lines: list[Line], max_rows: int) -> list[str]:
    """The last ``max_rows`` rows of ``lines`` as plain text (left on the terminal at exit)."""
    out: list[str] = []
    for line in reversed(lines):
        out[:0] = plain(line).split("\n")
        if len(out) >= max_rows:
            break
    return out[-max_rows:] if max_rows > 0 else []


def history_line(record: dict[str, object], by_id: dict[bytes, Line]) -> Line:
    """A line for a stored history record; our own ones keep tracking their status."""
    sent_ms = int(str(record.get("sent_ms", 0)))
    text = message_text(str(record.get("text", "")))
    if record.get("out"):
        status = int(str(record.get("status", STATUS_PENDING)))
        sender = fmt.safe(str(record.get("sender", "")))
        line = Line("msg", text, fmt.clock(sent_ms), sender, "own", status=status)
        by_id[bytes.fromhex(str(record.get("msg_id", "")))] = line
        return line
    verified = bool(record.get("verified"))
    label = fmt.sender_label(str(record.get("sender", "")), str(record.get("fp", "")), verified)
    return Line("msg", text, fmt.clock(sent_ms), label, "peer" if verified else "unverified")
