"""Who is online where, who watches whom, what was acknowledged lately (shared by every loop).

Ownership rules (the relay's concurrency design in four lines):

* a connection and everything hanging off it (its inflight deliveries, its
  store cursor, its output buffer) is touched only by the thread of the loop
  that owns it; other threads *post* work to that loop (``Loop.call_soon``);
* a :class:`~securechat.relay.conn.Submission` (one Send or SendMulti) belongs
  to the sender's loop: each copy's outcome is posted there and counted there
  (``delivery.resolve``);
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
from typing import Final

from securechat.relay.conn import Conn
from securechat.relay.limits import RECENTLY_ACKED


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
