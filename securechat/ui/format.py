"""Pure text formatting for ``talk``: message lines, marks, JSON lines, commands.

Kept free of terminals and threads so it is tested directly. Everything that
comes from the network (message text, and the *name* an unverified sender
claims) is attacker-controlled, so it passes through :func:`safe` before it
reaches a terminal: control characters and bidirectional overrides could
otherwise move the cursor, rewrite earlier lines or disguise a name.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Final

from securechat.client.events import (
    STATUS_ACCEPTED,
    STATUS_DELIVERED,
    STATUS_PENDING,
    STATUS_RECEIVED,
    MessageEvent,
)
from securechat.errors import UsageError

MARK_PENDING: Final = "…"
MARK_ACCEPTED: Final = "✓"
MARK_DELIVERED: Final = "✓✓"
MARK_REFUSED: Final = "✗ not sent"
MARKS: Final[dict[int, str]] = {
    STATUS_PENDING: MARK_PENDING,
    STATUS_ACCEPTED: MARK_ACCEPTED,
    STATUS_DELIVERED: MARK_DELIVERED,
}

STATUS_NAMES: Final[dict[int, str]] = {
    STATUS_PENDING: "pending",
    STATUS_ACCEPTED: "accepted",
    STATUS_DELIVERED: "delivered",
    STATUS_RECEIVED: "received",
}

DEFAULT_HISTORY: Final = 20  # /history without N
MAX_HISTORY: Final = 1000  # /history N is clamped to this
STARTUP_HISTORY: Final = 10  # lines of history shown when talk starts

# Bidirectional embedding/override/isolate controls (Trojan Source, CVE-2021-42574).
_BIDI: Final = frozenset(
    chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)
)

# Characters a terminal may draw joined with their neighbours into one glyph (emoji
# ZWJ sequences, variation selectors, skin-tone modifiers, tag sequences) while
# prompt_toolkit counts each one's own width: the screen then believes text sits
# in other cells than it does, and redrawing a mark or scrolling leaves stale
# characters (a stale "…" before "✓✓"). The talk screen draws messages without
# them; the text itself (history, JSON, pipe output) is never changed.
_JOINERS: Final = frozenset(
    [0x200C, 0x200D, *range(0xFE00, 0xFE10), *range(0x1F3FB, 0x1F400), *range(0xE0000, 0xE0080)]
)
MAX_MESSAGE_ROWS: Final = 40  # lines of one message drawn on the talk screen

QUIT_WORDS: Final = frozenset({"/quit", "/exit", "exit", "/q"})
COMMANDS: Final = ("help", "quit", "exit", "peers", "fingerprint", "verify", "history", "trust")

HELP_TEXT: Final = (
    "commands:",
    "  /help              this list",
    "  /peers             members, their fingerprints and whether they are online",
    "  /fingerprint       your own fingerprint (read it to a peer to verify)",
    "  /verify            the 60-digit safety number with each peer; compare it out of band",
    "  /history [N]       the last N messages of this conversation (default 20)",
    "  /trust NAME        accept NAME's new key after verifying it (if it changed)",
    "  /quit, /exit, exit, Ctrl-D, Ctrl-C   leave (unsent messages stay in the outbox)",
    "marks on your messages: … pending, ✓ accepted by the relay, ✓✓ delivered to the device",
)


def safe(text: str) -> str:
    """Make untrusted text printable on one terminal line without side effects."""
    out = []
    for ch in text:
        if ch == "\t":
            out.append(" ")
        elif ch == "\n":
            out.append("\\n")
        elif ch in _BIDI or unicodedata.category(ch) in ("Cc", "Cs"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def text_lines(text: str) -> list[str]:
    """A message's lines, each safe: a newline in a message is a line break wherever a
    person reads it (talk screen, history); one-line outputs escape it instead."""
    return [safe(line) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


def screen_lines(text: str) -> list[str]:
    """:func:`text_lines` for the talk screen: without joiners, at most MAX_MESSAGE_ROWS."""
    lines = ["".join(ch for ch in line if ord(ch) not in _JOINERS) for line in text_lines(text)]
    if len(lines) > MAX_MESSAGE_ROWS:
        hidden = len(lines) - MAX_MESSAGE_ROWS + 1
        lines = [
            *lines[: MAX_MESSAGE_ROWS - 1],
            f"[{hidden} more lines: see /history or 'securechat history']",
        ]
    return lines


def indent_continuation(lines: list[str], width: int) -> str:
    """Lines after the first, aligned under the first line's text."""
    return ("\n" + " " * width).join(lines)


def sender_label(name: str, fingerprint: str, verified: bool) -> str:
    """A known peer by name; anyone else with the fingerprint and a warning."""
    if verified:
        return safe(name)
    return f"{safe(name)} [{fingerprint}] (unverified)"


def mark(status: int) -> str:
    return MARKS.get(status, "")


def clock(sent_ms: int) -> str:
    """``HH:MM`` in local time."""
    return datetime.fromtimestamp(sent_ms / 1000).strftime("%H:%M")


def iso_time(sent_ms: int) -> str:
    """ISO 8601 in local time with its UTC offset and milliseconds (machine-readable)."""
    moment = datetime.fromtimestamp(sent_ms / 1000, tz=timezone.utc).astimezone()
    return moment.isoformat(timespec="milliseconds")


def history_text(record: dict[str, object]) -> str:
    """One history record for people: ``[date time] NAME: text`` (lines aligned), with marks."""
    stamp = datetime.fromtimestamp(int(str(record.get("sent_ms", 0))) / 1000).strftime(
        "%Y-%m-%d %H:%M"
    )
    if record.get("out"):
        sender = safe(str(record.get("sender", "")))
    else:
        sender = sender_label(
            str(record.get("sender", "")), str(record.get("fp", "")), bool(record.get("verified"))
        )
    prefix = f"[{stamp}] {sender}: "
    text = indent_continuation(text_lines(str(record.get("text", ""))), len(prefix))
    status = int(str(record.get("status", STATUS_RECEIVED)))
    suffix = f"  {mark(status)}" if record.get("out") else ""
    return f"{prefix}{text}{suffix}"


def history_json(record: dict[str, object]) -> dict[str, object]:
    """One history record for programs (``history --json``): exact text, named status."""
    status = int(str(record.get("status", STATUS_RECEIVED)))
    return {
        "sender": record.get("sender"),
        "fingerprint": record.get("fp"),
        "verified": True if record.get("out") else bool(record.get("verified")),
        "id": record.get("msg_id"),
        "time": iso_time(int(str(record.get("sent_ms", 0)))),
        "text": record.get("text"),
        "outgoing": bool(record.get("out")),
        "status": STATUS_NAMES.get(status, str(status)),
    }


def pipe_line(event: MessageEvent) -> str:
    """One received message for pipe mode: ``NAME: text``."""
    label = sender_label(event.sender_name, event.sender_fingerprint, event.verified)
    return f"{label}: {safe(event.text)}"


def json_line(event: MessageEvent) -> str:
    """One received message as a JSON object on one line (``--json``)."""
    record = {
        "sender": event.sender_name,
        "fingerprint": event.sender_fingerprint,
        "verified": event.verified,
        "id": event.msg_id.hex(),
        "time": iso_time(event.sent_ms),
        "text": event.text,
        "group": event.conv if event.group else None,  # the group's id, null for a DM
    }
    return json.dumps(record, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed input line that is a command rather than a message."""

    name: str  # one of COMMANDS
    arg: str = ""


def parse_command(line: str) -> Command | None:
    """``None`` for a message to send; a :class:`Command` otherwise.

    ``//text`` sends ``/text`` literally. An unknown ``/word`` is a command
    named ``unknown`` so the user is told, instead of it being sent by mistake.
    """
    stripped = line.strip()
    if stripped.lower() in QUIT_WORDS:
        return Command("quit")
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    word, _, arg = stripped[1:].partition(" ")
    word = word.lower()
    if word in COMMANDS:
        return Command("quit" if word == "exit" else word, arg.strip())
    return Command("unknown", word)


def unescape_message(line: str) -> str:
    """The text to send for a non-command line (``//x`` -> ``/x``)."""
    stripped = line.strip()
    return stripped[1:] if stripped.startswith("//") else stripped


def history_count(arg: str) -> int:
    """N for ``/history N``: the default when absent, at most MAX_HISTORY; UsageError for junk."""
    if not arg:
        return DEFAULT_HISTORY
    if not (arg.isascii() and arg.isdigit()) or int(arg) <= 0:
        raise UsageError("usage: /history [N] with N a positive number")
    return min(int(arg), MAX_HISTORY)


def members_text(names: list[str], online: dict[str, bool]) -> str:
    """``bob (online), carol (offline)`` for the status line."""
    parts = []
    for name in names:
        state = online.get(name)
        suffix = "" if state is None else (" (online)" if state else " (offline)")
        parts.append(f"{safe(name)}{suffix}")
    return ", ".join(parts)
