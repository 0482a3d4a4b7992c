"""What a sender is told: one answer per submission, whatever became of its copies.

A Send or SendMulti is a :class:`~securechat.relay.conn.Submission` with one copy
per recipient. Each copy ends in an :class:`Outcome` (stored, delivered and
acknowledged, or refused, with the reason the sender reads), reported on the
sender's loop; the submission is answered once: ``Error`` at the first refused
copy (the sender retries the whole frame: retries are idempotent), otherwise
``Accepted`` with the lowest status of its copies when the last one is safe.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from securechat.core import wire
from securechat.relay.conn import Submission
from securechat.relay.mailboxes import InsertResult


class Outcome(IntEnum):
    """What became of one copy: an ``Accepted`` status, or why it was refused."""

    STORED = wire.STATUS_STORED
    DELIVERED = wire.STATUS_DELIVERED
    MAILBOX_FULL = 11
    UNKNOWN_FULL = 12
    SENDER_QUOTA = 13
    PREFIX_QUOTA = 14
    STORE_FAILED = 15
    STORE_FULL = 16


DELIVERED: Final = Outcome.DELIVERED
# A refused copy: the wire error code and the reason the sender reads.
REFUSALS: Final[dict[Outcome, tuple[int, str]]] = {
    Outcome.MAILBOX_FULL: (wire.QUOTA_EXCEEDED, "the recipient's mailbox is full"),
    Outcome.UNKNOWN_FULL: (
        wire.QUOTA_EXCEEDED,
        "the recipient has never connected to this relay and its mailbox holds little",
    ),
    Outcome.SENDER_QUOTA: (
        wire.QUOTA_EXCEEDED,
        "you have stored your share of this relay (waiting for recipients)",
    ),
    Outcome.PREFIX_QUOTA: (wire.QUOTA_EXCEEDED, "your network has stored its share of this relay"),
    Outcome.STORE_FAILED: (wire.STORE_FAILED, "relay store failed"),
    Outcome.STORE_FULL: (wire.STORE_FAILED, "relay storage is full; retry later"),
}
INSERT_OUTCOMES: Final[dict[InsertResult, Outcome]] = {
    InsertResult.INSERTED: Outcome.STORED,
    InsertResult.DUPLICATE: Outcome.STORED,
    InsertResult.OVER_QUOTA: Outcome.MAILBOX_FULL,
    InsertResult.UNKNOWN_OVER_QUOTA: Outcome.UNKNOWN_FULL,
    InsertResult.SENDER_OVER_QUOTA: Outcome.SENDER_QUOTA,
    InsertResult.PREFIX_OVER_QUOTA: Outcome.PREFIX_QUOTA,
    InsertResult.LOW_SPACE: Outcome.STORE_FAILED,
    InsertResult.STORE_FULL: Outcome.STORE_FULL,
}


def insert_outcome(result: InsertResult | None) -> Outcome:
    """A store insert's result (None: the store failed) as a copy's outcome."""
    if result is None:
        return Outcome.STORE_FAILED
    return INSERT_OUTCOMES.get(result, Outcome.STORE_FAILED)


def resolve(sub: Submission, outcome: Outcome) -> None:
    """Report one copy's outcome to its submission, on the sender's loop (at once when
    that is this thread: the common case with one worker)."""
    loop = sub.conn.loop
    if loop.on_own_thread():
        settle(sub, outcome)
    else:
        loop.call_soon(settle, sub, outcome)


def settle(sub: Submission, outcome: Outcome) -> None:
    """Count one copy's outcome; answer the sender once: Error at the first refusal,
    else Accepted with the lowest status when the last copy is safe."""
    if sub.done:
        return
    conn = sub.conn
    refusal = REFUSALS.get(outcome)
    if refusal is not None:
        sub.done = True
        code, reason = refusal
        conn.loop.queue_frame(conn, wire.encode(wire.Error(code, sub.msg_id, reason)))
        return
    sub.remaining -= 1
    if outcome < sub.status:
        sub.status = outcome
    if sub.remaining == 0:
        sub.done = True
        conn.loop.queue_frame(conn, wire.encode_accepted(sub.msg_id, sub.status))
