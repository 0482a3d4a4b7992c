"""Reading the store's event log for a daemon's subscribers (shell).

:class:`EventLog` owns a second, read-only connection to the identity's store
(SQLite's WAL lets it see every commit of the writer, so readers never wait for
the network thread, nor it for them) and a condition that the daemon notifies
whenever the messenger reports a change. :class:`Subscription` is one
subscriber's reader: its thread reads the log from the subscriber's cursor,
offers each event to the connection's bounded queue, and sleeps until the next
change. Replay and live streaming are the same loop, so there is no seam to lose
or repeat an event at; nothing is buffered here beyond one batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from securechat.client.peers import KnownPeers
from securechat.client.store import ClientStore
from securechat.daemon import api
from securechat.errors import SecureChatError

T = TypeVar("T")

REPLAY_BATCH: Final = 200  # log rows read per step of a subscription
# A subscription sleeps until the messenger reports a change (every log write comes with
# one); this is only a safety net, long enough that an idle daemon stays idle.
WAKE_INTERVAL: Final = 30.0


class Sink(Protocol):
    """Where a subscription's events go: a connection's bounded queue."""

    def offer(self, event: dict[str, Any]) -> bool:
        """Queue ``event`` if there is room; False if the queue is full."""

    def fail(self, event: dict[str, Any]) -> None:
        """Queue ``event`` whatever the room (the last word of a dropped subscription)."""


class EventLog:
    """See the module docstring; thread-safe."""

    def __init__(self, reader: ClientStore, account: str, me_hex: str) -> None:
        self.account = account
        self.me_hex = me_hex
        self._reader = reader
        self._open = True
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._version = 0

    def close(self) -> None:
        """Close the reading connection (under its lock: no thread reads a closed one)."""
        with self._lock:
            self._open = False
            self._reader.close()

    def read(self, fn: Callable[[ClientStore], T]) -> T:
        """Run ``fn`` on the reading connection, alone."""
        with self._lock:
            return fn(self._reader)

    # --- change notification -------------------------------------------------------------

    def wake(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def version(self) -> int:
        with self._changed:
            return self._version

    def wait(self, seen: int, stop: threading.Event) -> None:
        """Until a change after version ``seen``, a stop, or the safety-net interval."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._version != seen or stop.is_set(), timeout=WAKE_INTERVAL
            )

    # --- reading -------------------------------------------------------------------------

    def bounds(self) -> tuple[int, int]:
        with self._lock:
            return self._reader.events_bounds() if self._open else (0, 0)

    def names(self, reader: ClientStore) -> api.Names:
        return {p.dh.hex(): p.name for p in KnownPeers(reader).identities()}

    def events_after(self, cursor: int, limit: int) -> tuple[int, list[dict[str, Any]], bool]:
        """(the cursor reached, the API events after ``cursor``, whether more may follow)
        from at most ``limit`` rows."""
        with self._lock:
            if not self._open:
                return cursor, [], False
            rows = self._reader.events_since(cursor, limit)
            names = self.names(self._reader)
            events = []
            for seq, logged in rows:
                cursor = seq
                shaped = self._shape(seq, logged, names)
                if shaped is not None:
                    events.append(shaped)
        return cursor, events, len(rows) == limit

    def _shape(self, seq: int, logged: dict[str, Any], names: api.Names) -> dict[str, Any] | None:
        kind = logged.get("type")
        if kind == "message":
            entry = self._reader.history_entry(
                str(logged["conv"]), bytes.fromhex(str(logged["msg_id"]))
            )
            if entry is None:
                return None
            return api.message(entry, self.account, self.me_hex, names, seq)
        if kind == "receipt":
            entry = self._reader.history_of(bytes.fromhex(str(logged["msg_id"])))
            return api.receipt(entry, logged, self.account, self.me_hex, names, seq)
        if kind == "keyChanged":
            return api.key_changed(logged, self.account, seq)
        return None  # a kind a newer version logged: skipped, its cursor still counts


class Subscription:
    """One subscriber's reader of the log, from a cursor on, in its own thread.

    ``overflow(self)``: the sink was full (the daemon drops the subscriber with an
    error event); ``ended(self)``: the subscription stopped for another reason.
    """

    def __init__(
        self,
        log: EventLog,
        sink: Sink,
        since: int,
        overflow: Callable[[Subscription], None],
        ended: Callable[[Subscription], object],
    ) -> None:
        self.log = log
        self.sink = sink
        self.cursor = since  # the last event offered (what to resume from)
        self._overflow = overflow
        self._ended = ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="securechat-sub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = self.log.version()
            try:
                reached, events, more = self.log.events_after(self.cursor, REPLAY_BATCH)
            except SecureChatError as exc:
                self._ended(self)
                self.sink.fail(
                    {
                        "type": "error",
                        "cursor": self.cursor,
                        "account": self.log.account,
                        "code": exc.exit_code,
                        "message": str(exc),
                    }
                )
                return
            for event in events:
                if self._stop.is_set():
                    return
                if not self.sink.offer(event):
                    self._overflow(self)
                    return
                self.cursor = int(event["cursor"])
            self.cursor = max(self.cursor, reached)
            if not more:
                self.log.wait(seen, self._stop)
