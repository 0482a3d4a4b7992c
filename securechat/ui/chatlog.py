"""What the talk screen shows, without a terminal: the message area's lines and the link state.

:class:`ChatLog` turns the engine's events into :class:`~securechat.ui.lines.Line`
objects and keeps the marks of our own messages moving forward. Only the UI
thread touches it (the screen queues events from other threads and applies
them on its loop), and it draws nothing itself, so it is tested directly.

An acknowledgement can overtake the return of ``send_text`` (the relay answers
before the UI thread learns the message id): such marks wait in ``early``,
bounded by :data:`MAX_EARLY_STATUS`, until the line is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from securechat.client.events import (
    ConnectionEvent,
    Event,
    MessageEvent,
    NoticeEvent,
    PresenceEvent,
    StatusEvent,
)
from securechat.ui import format as fmt
from securechat.ui.lines import Line, history_line, message_text, transcript

MAX_LINES: Final = 2000  # message-area lines kept in memory; older ones scroll away
MAX_EARLY_STATUS: Final = 1000  # acknowledgements that overtook send_text's return
MAX_REASONS: Final = 100  # distinct connection failures told in full


@dataclass(frozen=True, slots=True)
class Sent:
    """``send_text`` returned: the line of that message now has an id."""

    line: Line
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class SendFailed:
    line: Line
    reason: str


ScreenEvent = Event | Sent | SendFailed


class ChatLog:
    """See the module docstring. ``conv_id``: the conversation on screen (others are marked)."""

    def __init__(self, relay: str, conv_id: str | None = None) -> None:
        self.conv_id = conv_id
        self.lines: list[Line] = []
        self.by_id: dict[bytes, Line] = {}
        self._early: dict[bytes, int] = {}
        self.connected = False
        self.conn_detail = f"connecting to {relay}…"
        self.online: dict[str, bool] = {}
        self._reasons: set[str] = set()  # connection failures already told in full

    def apply(self, event: ScreenEvent, failure: str | None) -> None:
        """One event; ``failure``: why the last connection attempt failed, if known."""
        if isinstance(event, MessageEvent):
            self._on_message(event)
        elif isinstance(event, StatusEvent):
            self.set_status(event.msg_id, event.status)
        elif isinstance(event, Sent):
            self.by_id[event.msg_id] = event.line
            early = self._early.pop(event.msg_id, None)
            if early is not None:
                self.set_status(event.msg_id, early)
        elif isinstance(event, SendFailed):
            event.line.refused = True
            self.add(Line("error", f"not sent: {event.reason}"))
        elif isinstance(event, ConnectionEvent):
            self._on_connection(event, failure)
        elif isinstance(event, NoticeEvent):
            self.add(Line("error" if event.error else "notice", fmt.safe(event.text)))
        elif isinstance(event, PresenceEvent):
            self._on_presence(event)

    def _on_connection(self, event: ConnectionEvent, failure: str | None) -> None:
        if event.connected != self.connected:
            self.add(
                Line(
                    "notice",
                    "connected to the relay"
                    if event.connected
                    else "relay connection lost; messages wait in the outbox",
                )
            )
        self.connected = event.connected
        self.conn_detail = event.detail
        # Each distinct cause once in full (the status line is short).
        told = failure is None or failure in self._reasons or len(self._reasons) >= MAX_REASONS
        if not event.connected and not told:
            assert failure is not None
            self._reasons.add(failure)
            self.add(Line("error", f"cannot connect: {fmt.safe(failure)}"))

    def _on_presence(self, event: PresenceEvent) -> None:
        before = self.online.get(event.name)
        if before != event.online:
            # The first report is a state, later ones are joins and leaves.
            state = (
                "is online"
                if event.online
                else ("is offline" if before is None else "went offline")
            )
            self.add(Line("notice", f"{fmt.safe(event.name)} {state}"))
        self.online[event.name] = event.online

    def _on_message(self, event: MessageEvent) -> None:
        label = fmt.sender_label(event.sender_name, event.sender_fingerprint, event.verified)
        self.add(
            Line(
                "msg",
                message_text(event.text),
                fmt.clock(event.sent_ms),
                label,
                "peer" if event.verified else "unverified",
                other_conv=self.conv_id is not None and event.conv != self.conv_id,
            )
        )

    def set_status(self, msg_id: bytes, status: int) -> None:
        line = self.by_id.get(msg_id)
        if line is None:
            if len(self._early) < MAX_EARLY_STATUS:
                self._early[msg_id] = max(status, self._early.get(msg_id, status))
            return
        line.status = max(status, line.status if line.status is not None else status)

    def add(self, line: Line) -> None:
        self.lines.append(line)
        if len(self.lines) > MAX_LINES:
            del self.lines[: len(self.lines) - MAX_LINES]

    def info(self, text: str) -> None:
        self.add(Line("info", text))

    def show_history(self, records: list[dict[str, object]], header: str) -> None:
        if not records:
            return
        self.add(Line("notice", f"── {header} ──"))
        for record in records:
            self.add(history_line(record, self.by_id))
        self.add(Line("notice", "──"))

    def transcript(self, max_rows: int) -> list[str]:
        """The last ``max_rows`` rows of the conversation as plain text."""
        return transcript(self.lines, max_rows)
