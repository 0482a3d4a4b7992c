"""What the client session reports to a user interface, and the delivery marks (shell).

Every user-visible change is one of these events. The session
(:mod:`securechat.client.session`) returns them with the frames to send in an
:class:`Output`; the network pump hands them to the ``on_event`` callback from
whichever thread produced them. Kept apart from the engine so that formatting
code imports the types without the threaded engine.

The events are frozen and plain (strings, ints, bools, bytes) and each has a
stable ``TYPE`` name, so a long-lived process driving one session for several
front-ends (a daemon, a web page) can send them on as JSON with
:func:`event_dict`; the names and fields are a contract: add, never rename.

Delivery marks of a message we sent only ever move forward:

* :attr:`Status.PENDING`: on this device only (outbox, or waiting for prekeys);
* :attr:`Status.ACCEPTED`: the relay says it holds it (stored, or handed to the
  device). This is the relay's word and all the relay can vouch for;
* :attr:`Status.DELIVERED`: every recipient's device said so end to end (a
  RECEIPT sealed in the pairwise session after it decrypted and stored the
  message), which the relay cannot forge.

:attr:`Status.RECEIVED` marks an incoming message in the history. The values are
stored in the client's history table: they never change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Final

from securechat.core import wire


class Status(IntEnum):
    """A message's delivery mark (stored as its value; see the module docstring)."""

    PENDING = 0
    ACCEPTED = 1  # the relay holds it durably (or handed it over): its word only
    DELIVERED = 2  # every recipient's device confirmed it end to end
    RECEIVED = 3  # an incoming message


# The names the rest of the client has always used.
STATUS_PENDING: Final = Status.PENDING
STATUS_ACCEPTED: Final = Status.ACCEPTED
STATUS_DELIVERED: Final = Status.DELIVERED
STATUS_RECEIVED: Final = Status.RECEIVED


@dataclass(frozen=True, slots=True)
class MessageEvent:
    """A message from a peer, opened and stored (shown once: duplicates are not reported)."""

    TYPE: ClassVar[str] = "message"
    conv: str
    msg_id: bytes
    sender_name: str
    sender_fingerprint: str
    verified: bool  # the sender is a known peer whose key matches
    sent_ms: int
    text: str
    group: bool


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """A message we sent reached a higher mark."""

    TYPE: ClassVar[str] = "status"
    msg_id: bytes
    status: Status


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """The link to the relay came up or went down (``detail`` says why, for people)."""

    TYPE: ClassVar[str] = "connection"
    connected: bool
    detail: str


@dataclass(frozen=True, slots=True)
class NoticeEvent:
    """Something the user should read; ``error``: it went wrong or needs their attention."""

    TYPE: ClassVar[str] = "notice"
    text: str
    error: bool = False


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """A watched peer came online or left."""

    TYPE: ClassVar[str] = "presence"
    name: str
    online: bool


Event = MessageEvent | StatusEvent | ConnectionEvent | NoticeEvent | PresenceEvent
EVENT_TYPES: Final = (MessageEvent, StatusEvent, ConnectionEvent, NoticeEvent, PresenceEvent)


def event_dict(event: Event) -> dict[str, object]:
    """The event as JSON-ready values: ``type`` first, bytes as hex, a status by its name."""
    out: dict[str, object] = {"type": event.TYPE}
    for item in dataclasses.fields(event):
        value = getattr(event, item.name)
        if isinstance(value, Status):
            value = value.name.lower()
        elif isinstance(value, bytes):
            value = value.hex()
        out[item.name] = value
    return out


@dataclass(slots=True)
class Output:
    """What one call into the session produced: frames for the relay, in order, and events.

    The pump writes ``frames`` (only while connected: everything that must survive
    a lost link is in the outbox already) and hands ``events`` to the interface.
    """

    frames: list[wire.Frame] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.frames += other.frames
        self.events += other.events
