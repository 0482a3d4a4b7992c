"""The daemon's events and messages as JSON values: the names here are the API contract.

``docs/api.md`` documents every field. Logged events (``message``, ``receipt``,
``keyChanged``) carry the ``cursor`` of their row in the event log
(:meth:`~securechat.client.store.ClientStore.events_since`); the others
(``presence``, ``connection``, ``notice``, ``error``) are live only and carry
``cursor: null``. Add fields, never rename them.
"""

from __future__ import annotations

from typing import Any, Final

from securechat.client.events import (
    ConnectionEvent,
    Event,
    NoticeEvent,
    PresenceEvent,
    Status,
)
from securechat.client.store import HistoryEntry

API_VERSION: Final = 1
STATUS_WORDS: Final[dict[Status, str]] = {
    Status.PENDING: "pending",
    Status.ACCEPTED: "accepted",
    Status.DELIVERED: "delivered",
    Status.RECEIVED: "received",
}
WORD_STATUS: Final = {word: status for status, word in STATUS_WORDS.items()}

Names = dict[str, str]  # identity X25519 key (hex) -> the name the user knows it by


def conversation(conv: str, record: dict[str, Any], me_hex: str, names: Names) -> dict[str, Any]:
    """``{"id", "group", "members"}``: the other members, by the names the user knows them
    by (a stranger by the name it claims; a key without either by its first hex digits)."""
    if record.get("out"):
        others = [str(k) for k in record.get("to", [])]
    elif record.get("members"):
        others = [str(k) for k in record["members"] if k != me_hex]
    else:
        others = [str(record.get("from", ""))]
    sender = (str(record.get("from", "")), str(record.get("sender", "")))
    members = [
        names.get(k) or (sender[1] if k == sender[0] and sender[1] else k[:16]) for k in others
    ]
    return {"id": conv, "group": conv.startswith("group-"), "members": members}


def message(
    entry: HistoryEntry, account: str, me_hex: str, names: Names, cursor: int | None
) -> dict[str, Any]:
    """A history line as a ``message`` event (also the items of ``history``)."""
    record = entry.record
    out = bool(record.get("out"))
    return {
        "type": "message",
        "cursor": cursor,
        "account": account,
        "conversation": conversation(entry.conv, record, me_hex, names),
        "id": entry.msg_id.hex(),
        "outgoing": out,
        "sender": {
            "name": str(record.get("sender", "")),
            "fingerprint": str(record.get("fp", "")),
            "verified": True if out else bool(record.get("verified")),
        },
        "text": str(record.get("text", "")),
        "status": STATUS_WORDS.get(Status(entry.status), "pending"),
        "sentMs": _int_or_none(record.get("sent_ms")),
        "relayMs": _int_or_none(record.get("relay_ms")),
        "receivedMs": _int_or_none(record.get("received_ms")),
    }


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def receipt(
    entry: HistoryEntry | None,
    logged: dict[str, Any],
    account: str,
    me_hex: str,
    names: Names,
    cursor: int,
) -> dict[str, Any]:
    status = int(logged.get("status", 0))
    conv = (
        conversation(entry.conv, entry.record, me_hex, names)
        if entry is not None
        else {"id": None, "group": False, "members": []}
    )
    return {
        "type": "receipt",
        "cursor": cursor,
        "account": account,
        "conversation": conv,
        "id": str(logged.get("msg_id", "")),
        "status": STATUS_WORDS.get(Status(status), "pending"),
        "atMs": _int_or_none(logged.get("at_ms")),
    }


def key_changed(logged: dict[str, Any], account: str, cursor: int) -> dict[str, Any]:
    return {
        "type": "keyChanged",
        "cursor": cursor,
        "account": account,
        "peer": str(logged.get("peer", "")),
        "oldFingerprint": str(logged.get("old", "")),
        "newFingerprint": str(logged.get("new", "")),
        "atMs": _int_or_none(logged.get("at_ms")),
    }


def live(event: Event, account: str) -> dict[str, Any] | None:
    """An event that is not logged, as JSON; None for those the log carries."""
    if isinstance(event, PresenceEvent):
        return {
            "type": "presence",
            "cursor": None,
            "account": account,
            "peer": event.name,
            "online": event.online,
        }
    if isinstance(event, ConnectionEvent):
        return {
            "type": "connection",
            "cursor": None,
            "account": account,
            "connected": event.connected,
            "detail": event.detail,
        }
    if isinstance(event, NoticeEvent):
        return {
            "type": "error" if event.error else "notice",
            "cursor": None,
            "account": account,
            "message": event.text,
        }
    return None
