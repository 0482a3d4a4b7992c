"""What the client engine reports to a user interface, and the delivery marks (shell).

Every user-visible change is one of these events, handed to the ``on_event``
callback from whichever thread noticed it. Kept apart from the engine so that
formatting code can import the types without the threaded engine.

Delivery marks of a message we sent only ever move forward:

* ``STATUS_PENDING``: on this device only (outbox, or waiting for prekeys);
* ``STATUS_ACCEPTED``: the relay says it holds it (stored, or handed to the
  device). This is the relay's word and all the relay can vouch for;
* ``STATUS_DELIVERED``: every recipient's device said so end to end (a
  RECEIPT sealed in the pairwise session after it decrypted and stored the
  message), which the relay cannot forge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

STATUS_PENDING: Final = 0
STATUS_ACCEPTED: Final = 1  # the relay holds it durably (or handed it over): its word only
STATUS_DELIVERED: Final = 2  # every recipient's device confirmed it end to end
STATUS_RECEIVED: Final = 3  # an incoming message


@dataclass(frozen=True, slots=True)
class MessageEvent:
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
    msg_id: bytes
    status: int


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    connected: bool
    detail: str


@dataclass(frozen=True, slots=True)
class NoticeEvent:
    text: str
    error: bool = False


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    name: str
    online: bool


Event = MessageEvent | StatusEvent | ConnectionEvent | NoticeEvent | PresenceEvent
