"""The talk screen's status line: connection, members, outbox, fitted to the terminal (shell).

Pure functions of the screen's state so they are tested without a terminal. The
line says in a few words why we are offline (``connection refused, retrying``);
the full sentence goes once to the message area. Whatever does not fit is cut
at a word with an ellipsis, never mid-word and never doubled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.utils import get_cwidth

from securechat.errors import SecureChatError
from securechat.ui import format as fmt

STATUS_RESERVE: Final = 2  # columns the status line keeps free at its right edge
ELLIPSIS: Final = "…"


@dataclass(frozen=True, slots=True)
class Status:
    """What the status line shows; built by the screen on each redraw."""

    connected: bool
    relay: str
    detail: str  # the messenger's last connection report, when no failure is known
    failure: SecureChatError | None  # why the last connection attempt failed, or fatal
    retrying: bool  # False once a failure is fatal (a changed relay key)
    members: str
    pending: int
    blocked: bool  # a peer's key changed: nothing is sent


def fragments(status: Status, columns: int) -> StyleAndTextTuples:
    tail: StyleAndTextTuples = [
        ("class:status", f" │ with {status.members}"),
        ("class:status", f" │ {status.pending} pending"),
    ]
    if status.blocked:
        tail.append(("class:status.offline", " KEY CHANGED: not sending "))
    tail.append(("class:status", " │ /help"))
    if status.connected:
        return [("class:status.online", " ● connected "), ("class:status", status.relay), *tail]
    label = " ○ offline "
    room = (
        columns
        - STATUS_RESERVE
        - get_cwidth(label)
        - sum(get_cwidth(text) for _style, text, *_ in tail)
    )
    return [
        ("class:status.offline", label),
        ("class:status", fit(offline_reason(status), room)),
        *tail,
    ]


def offline_reason(status: Status) -> str:
    """Why we are offline in a few words, and whether it retries."""
    error = status.failure
    if error is None:
        return fmt.safe(status.detail)
    short = error.brief or str(error).split(": ", 1)[0].split(" (", 1)[0]
    return fmt.safe(short) + (", retrying" if status.retrying else ", not retrying")


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` terminal columns, at a word if it can, with an ellipsis."""
    if get_cwidth(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS if width == 1 else ""
    out = ""
    for ch in text:
        if get_cwidth(out + ch) > width - 1:
            break
        out += ch
    cut = out.rsplit(" ", 1)[0] if " " in out[width // 2 :] else out
    return cut.rstrip(" ,;:") + ELLIPSIS
