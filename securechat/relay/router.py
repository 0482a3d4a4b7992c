"""Who is online where, what a sender waits for, what was acknowledged lately.

Ownership rules (the relay's concurrency design in four lines):

* a connection and everything hanging off it (its inflight deliveries, its
  store cursor, its output buffer) is touched only by the worker thread that
  owns it; other threads *post* work to that worker (``Worker.call_soon``);
* a :class:`Submission` (one Send or SendMulti) belongs to the sender's
  worker: each copy's outcome is posted there and counted there;
* the routing table ``online`` (mailbox -> connection) is read without a lock
  (a dict lookup is atomic in CPython) and changed under ``lock``;
* "recipient offline, so store" is decided under ``lock`` too, and a
  connection's first store fetch is queued under the same lock when it
  registers. The store queue is FIFO, so a frame stored for an offline
  recipient is always either in that first fetch or routed to the new
  connection: nothing falls between the two.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from securechat.core import wire
from securechat.relay.limits import RECENTLY_ACKED
from securechat.relay.mailboxes import InsertResult

if TYPE_CHECKING:
    from securechat.relay.worker import Conn

# Connection states (see worker.py)
HANDSHAKE: Final = 0
OPEN: Final = 1
CLOSED: Final = 2

# A copy's outcome, as posted to the sender's worker: positive = Accepted status,
# negative = a refusal (REFUSALS: the wire error code and the reason the sender reads).
Outcome = int
REFUSED_MAILBOX_FULL: Final = -1
REFUSED_UNKNOWN_FULL: Final = -2
REFUSED_SENDER_QUOTA: Final = -3
REFUSED_PREFIX_QUOTA: Final = -4
REFUSED_STORE_FAILED: Final = -5
REFUSED_STORE_FULL: Final = -6
REFUSALS: Final[dict[int, tuple[int, str]]] = {
    REFUSED_MAILBOX_FULL: (wire.QUOTA_EXCEEDED, "the recipient's mailbox is full"),
    REFUSED_UNKNOWN_FULL: (
        wire.QUOTA_EXCEEDED,
        "the recipient has never connected to this relay and its mailbox holds little",
    ),
    REFUSED_SENDER_QUOTA: (
        wire.QUOTA_EXCEEDED,
        "you have stored your share of this relay (waiting for recipients)",
    ),
    REFUSED_PREFIX_QUOTA: (wire.QUOTA_EXCEEDED, "your network has stored its share of this relay"),
    REFUSED_STORE_FAILED: (wire.STORE_FAILED, "relay store failed"),
    REFUSED_STORE_FULL: (wire.STORE_FAILED, "relay storage is full; retry later"),
}
_INSERT_OUTCOMES: Final[dict[int, Outcome]] = {
    InsertResult.INSERTED: wire.STATUS_STORED,
    InsertResult.DUPLICATE: wire.STATUS_STORED,
    InsertResult.OVER_QUOTA: REFUSED_MAILBOX_FULL,
    InsertResult.UNKNOWN_OVER_QUOTA: REFUSED_UNKNOWN_FULL,
    InsertResult.SENDER_OVER_QUOTA: REFUSED_SENDER_QUOTA,
    InsertResult.PREFIX_OVER_QUOTA: REFUSED_PREFIX_QUOTA,
    InsertResult.LOW_SPACE: REFUSED_STORE_FAILED,
    InsertResult.STORE_FULL: REFUSED_STORE_FULL,
}


class Submission:
    """One Send/SendMulti: Accepted once every copy is safe, Error if one is refused."""

    __slots__ = ("conn", "copies", "done", "msg_id", "remaining", "status")

    def __init__(self, conn: Conn, msg_id: bytes, copies: int) -> None:
        self.conn = conn
        self.msg_id = msg_id
        self.copies = copies
        self.remaining = copies
        self.status = 2
        self.done = False


class Copy:
    """One recipient's copy of a submitted payload, on its way.

    The sender's address prefix (for the store's per-prefix quota) is read from
    the submission's connection when the copy is stored.
    """

    __slots__ = ("mailbox", "msg_id", "payload", "sender", "sub", "ts")

    def __init__(
        self, sub: Submission, mailbox: bytes, sender: bytes, msg_id: bytes, ts: int, payload: bytes
    ) -> None:
        self.sub = sub
        self.mailbox = mailbox
        self.sender = sender
        self.msg_id = msg_id
        self.ts = ts
        self.payload = payload


class Inflight:
    """A copy delivered live, waiting for the recipient's Ack (or its timeout)."""

    __slots__ = ("copy", "deadline", "sent", "subs", "turn")

    def __init__(self, copy: Copy, sent: float, turn: int, ack_timeout: float) -> None:
        self.copy = copy
        self.sent = sent  # worker clock and loop turn when queued (stall detection)
        self.turn = turn
        self.deadline = sent + ack_timeout
        self.subs: list[Submission] = [copy.sub]


class Router:
    """The shared routing state; see the module docstring for the locking rules."""

    def __init__(self, recently_acked: int = RECENTLY_ACKED) -> None:
        self.lock = threading.Lock()
        self.online: dict[bytes, Conn] = {}
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self._recent_max = recently_acked
        self._recent_lock = threading.Lock()
        # presence: identity key -> connections subscribed to it
        self.watchers: dict[bytes, set[Conn]] = {}

    # --- registration --------------------------------------------------------------------------
    def register(self, conn: Conn, first_fetch: Callable[[], None]) -> Conn | None:
        """Make ``conn`` the owner of its mailbox; return the connection it replaces."""
        assert conn.mailbox is not None
        with self.lock:
            old = self.online.get(conn.mailbox)
            self.online[conn.mailbox] = conn
            first_fetch()
        return old

    def unregister(self, conn: Conn) -> bool:
        assert conn.mailbox is not None
        with self.lock:
            if self.online.get(conn.mailbox) is conn:
                del self.online[conn.mailbox]
                return True
        return False

    def route(self, mailbox: bytes, store_offline: Callable[[], None]) -> Conn | None:
        """The owner of ``mailbox``, or None after ``store_offline()`` ran under the lock."""
        target = self.online.get(mailbox)
        if target is not None:
            return target
        with self.lock:
            target = self.online.get(mailbox)
            if target is None:
                store_offline()
            return target

    # --- idempotency ---------------------------------------------------------------------------
    def remember_acked_many(self, keys: Iterable[bytes]) -> None:
        """Remember every entry of one Ack frame: one lock round for the whole frame."""
        with self._recent_lock:
            recent = self._recent
            for key in keys:
                recent[key] = None
            excess = len(recent) - self._recent_max
            for _ in range(max(excess, 0)):
                recent.popitem(last=False)

    def was_acked(self, key: bytes) -> bool:
        return key in self._recent

    # --- presence ------------------------------------------------------------------------------
    def watch(self, conn: Conn, old: frozenset[bytes], new: frozenset[bytes]) -> None:
        with self.lock:
            for key in old - new:
                subs = self.watchers.get(key)
                if subs is not None:
                    subs.discard(conn)
                    if not subs:
                        del self.watchers[key]
            for key in new:
                self.watchers.setdefault(key, set()).add(conn)

    def watchers_of(self, identity: bytes) -> list[Conn]:
        with self.lock:
            return list(self.watchers.get(identity, ()))


RECENT_KEY_SIZE: Final = 80  # mailbox + sender key + msg id


def recent_key(mailbox: bytes, sender: bytes, msg_id: bytes) -> bytes:
    return mailbox + sender + msg_id


def insert_outcome(result: int | None) -> Outcome:
    """Map a store insert result (None: the store failed) to a copy outcome."""
    if result is None:
        return REFUSED_STORE_FAILED
    return _INSERT_OUTCOMES.get(result, REFUSED_STORE_FAILED)


def resolve(sub: Submission, outcome: Outcome) -> None:
    """Report one copy's outcome to its submission, on the sender's worker.

    Called on the sender's own worker (the common case with one worker) it runs at once.
    """
    worker = sub.conn.worker
    if worker.on_own_thread():
        _settle(sub, outcome)
    else:
        worker.call_soon(_settle, sub, outcome)


def _settle(sub: Submission, outcome: Outcome) -> None:
    if sub.done:
        return
    conn = sub.conn
    if outcome < 0:
        sub.done = True
        code, reason = REFUSALS[outcome]
        conn.worker.queue_frame(conn, wire.encode(wire.Error(code, sub.msg_id, reason)))
        return
    sub.remaining -= 1
    if outcome < sub.status:
        sub.status = outcome
    if sub.remaining == 0:
        sub.done = True
        conn.worker.queue_frame(conn, wire.encode_accepted(sub.msg_id, sub.status))
