"""Delivery marks of what we sent, and the end-to-end receipts we owe (shell rules, no I/O).

Part of the client session (:mod:`securechat.client.session`): it changes the
store and appends to the session's :class:`~securechat.client.events.Output`,
never touches a socket, a thread or the clock (``now_ms`` is passed in).

Marks only move forward (``Status``): ✓ ``ACCEPTED`` when the relay's
``Accepted`` names the id, ✓✓ ``DELIVERED`` once every recipient's device sent a
RECEIPT for it, end to end (the relay cannot forge one). The recipients of a
message are remembered for the last :data:`MAX_TRACKED` messages and otherwise
read back from the history record.

What we owe: every message we stored gets a RECEIPT, every message that did not
open (from a peer we have a session with) a REJECTED, at most one per peer per
:data:`REJECT_INTERVAL`, so a forger cannot make us an amplifier. Both are
written as *due* in the transaction that stores the message, and sealed after
each batch of frames (:meth:`Receipts.flush`): one control message per peer and
kind, queued in the outbox, so a crash before sending leaves them due, not lost.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final, TypeVar

from securechat.client.e2e_store import E2EStore
from securechat.client.events import NoticeEvent, Output, Status, StatusEvent
from securechat.client.store import ClientStore
from securechat.core import e2e, envelope, keys, wire

K = TypeVar("K")
V = TypeVar("V")
Rng = Callable[[int], bytes]
Tap = Callable[[str, wire.Frame], None]

MAX_TRACKED: Final = 10_000  # sent messages whose recipients and mark are remembered
REJECT_INTERVAL: Final = 60.0  # seconds: at most one REJECTED per peer per minute


def remember(table: OrderedDict[K, V], key: K, value: V, limit: int = MAX_TRACKED) -> None:
    """Put ``key`` last in a table bounded to ``limit`` entries (the oldest go first)."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def due(last_ms: int, interval_s: float, now_ms: int) -> bool:
    """Whether ``interval_s`` passed since ``last_ms``; a clock that went back counts as due."""
    return now_ms - last_ms >= interval_s * 1000 or now_ms < last_ms


class Receipts:
    """See the module docstring."""

    def __init__(self, store: ClientStore, e2e_store: E2EStore, rng: Rng, tap: Tap | None) -> None:
        self._store = store
        self._e2e = e2e_store
        self._rng = rng
        self._tap = tap
        self._statuses: OrderedDict[bytes, Status] = OrderedDict()  # newest mark shown
        self._recipients: OrderedDict[bytes, frozenset[bytes]] = OrderedDict()
        self._rejected_at: OrderedDict[bytes, int] = OrderedDict()

    # --- marks of what we sent -----------------------------------------------------------

    def sent(self, msg_id: bytes, peers: frozenset[bytes]) -> None:
        """Remember who a message went to (their X25519 keys), for counting receipts."""
        remember(self._recipients, msg_id, peers)

    def accepted(self, msg_id: bytes, out: Output) -> None:
        """The relay's ``Accepted``: the outbox entry goes, the mark becomes ✓."""
        with self._store.transaction():
            self._store.outbox_remove(msg_id)
            self._set_status(msg_id, Status.ACCEPTED, out)

    def on_control(self, received: e2e.Received, name_of: Callable[[], str], out: Output) -> None:
        """A RECEIPT or REJECTED from a peer about messages we sent (inside a transaction).

        ``name_of`` gives the sender's display name, looked up only for a REJECTED.
        """
        sender = received.sender
        if received.content.kind == envelope.CONTENT_RECEIPT:
            for msg_id in received.content.ids:
                if self._count_receipt(msg_id, sender.dh):
                    self._set_status(msg_id, Status.DELIVERED, out)
            return
        name = name_of()
        for msg_id in received.content.ids:
            if sender.dh not in self._recipients_of(msg_id):
                continue
            entry = self._store.history_of(msg_id)
            what = f"'{entry.record['text'][:40]}'" if entry is not None else msg_id.hex()[:8]
            out.events.append(
                NoticeEvent(
                    f"{name}'s device could not open your message {what}; send it again "
                    "if it matters (their client may have lost its session)",
                    error=True,
                )
            )

    def _recipients_of(self, msg_id: bytes) -> frozenset[bytes]:
        known = self._recipients.get(msg_id)
        if known is not None:
            return known
        entry = self._store.history_of(msg_id)
        if entry is None or not entry.record.get("out"):
            return frozenset()
        return frozenset(bytes.fromhex(h) for h in entry.record.get("to", ()))

    def _count_receipt(self, msg_id: bytes, peer_dh: bytes) -> bool:
        """Count one recipient's end-to-end receipt; True once every recipient's is in."""
        expected = self._recipients_of(msg_id)
        if peer_dh not in expected:
            return False  # not a message we sent to them: ignore
        return self._store.delivered_add(msg_id, peer_dh) >= len(expected)

    def _set_status(self, msg_id: bytes, status: Status, out: Output) -> None:
        """Raise a sent message's mark (never lower it), and report it when it moved."""
        self._store.history_set_status(msg_id, status)
        shown = self._statuses.get(msg_id, Status.PENDING)
        if status <= shown:
            return
        remember(self._statuses, msg_id, status)
        out.events.append(StatusEvent(msg_id, status))

    # --- receipts we owe -----------------------------------------------------------------

    def owe_rejected(self, frame: wire.Deliver, now_ms: int) -> None:
        """A REJECTED for a message that did not open, if we can and it is not too soon."""
        if self._e2e.state.peer_identity(frame.sender_key) is None:
            return  # no session to tell them through
        last = self._rejected_at.get(frame.sender_key)
        if last is not None and not due(last, REJECT_INTERVAL, now_ms):
            return
        remember(self._rejected_at, frame.sender_key, now_ms)
        with self._e2e.transaction():
            self._store.receipt_due(frame.sender_key, envelope.CONTENT_REJECTED, frame.msg_id)

    def flush(self, now_ms: int, out: Output) -> None:
        """Seal the receipts due, one per peer and kind, queue them in the outbox, send."""
        while owed := self._store.receipts_due(limit=envelope.MAX_CONTROL_IDS):
            groups: dict[tuple[bytes, int], list[bytes]] = {}
            for item in owed:
                groups.setdefault((item.peer, item.kind), []).append(item.msg_id)
            frames: list[wire.Frame] = []
            for (peer_dh, kind), ids in groups.items():
                peer = self._e2e.state.peer_identity(peer_dh)
                if peer is not None:  # else the session is gone (evicted): nothing to say
                    frames.append(self._seal(peer, kind, ids, now_ms))
            with self._e2e.transaction():
                for frame in frames:
                    assert isinstance(frame, wire.Send)
                    self._store.outbox_add(frame.msg_id, wire.encode(frame), control=True)
                self._store.receipts_done(item.seq for item in owed)
            if self._tap is not None:
                for frame in frames:
                    self._tap("receipt", frame)
            out.frames += frames

    def _seal(self, peer: keys.PublicIdentity, kind: int, ids: list[bytes], now: int) -> wire.Send:
        content = envelope.control(kind, self._rng(wire.ID_SIZE), now, ids)
        payload = self._e2e.state.encrypt(peer, content, self._rng, now, pin=False)
        return wire.Send(content.msg_id, wire.mailbox_address(peer.dh), payload)
