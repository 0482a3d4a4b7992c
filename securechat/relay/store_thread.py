"""The store thread: every store request runs here, many per transaction (group commit).

Why one thread: SQLite serialises writers anyway, and one thread that takes
every waiting request, runs them in one transaction and commits once turns
thousands of fsyncs into one (group commit). Replies (the callbacks that let
the relay send ``Accepted``) run only *after* COMMIT returned, so an accepted
frame is on disk.

Durability: WAL journal with ``synchronous=FULL`` by default: COMMIT fsyncs
the WAL, so an acknowledged frame survives kill -9 and power loss. With
``synchronous=NORMAL`` (``--sync normal``) COMMIT writes the WAL without
fsync: still safe against kill -9 of the relay (the data is in the OS page
cache, which the kernel writes later), not against a power cut.

Failure: if a batch fails (disk full, read-only, corrupt), it is rolled back
and every request is retried alone, so only the ones that really fail get the
failure reply ``None`` (the relay turns it into ``Error(STORE_FAILED)``).

:class:`StoreThread` is the relay's :class:`~securechat.relay.mailboxes.Mailboxes`:
workers ``submit`` requests and read its hints; the SQL is in ``store.py``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from securechat.relay.limits import STORE_BATCH, STORE_REQUEST_COST, RelayConfig
from securechat.relay.mailboxes import STOP, Insert, InsertResult, Request, take_batch
from securechat.relay.store import RESERVE_BYTES, MailboxStore

log = logging.getLogger("securechat.relay")

SQLITE_FULL: Final = 13  # SQLite's result code for "database or disk is full"
SPACE_CHECK_S: Final = 0.5  # how often a store in low-space mode retries the reserve
KNOWN_FLUSH_S: Final = 1.0  # how often newly connected identities are recorded as known


class StoreThread:
    """Runs every request in a queue, many per transaction, replies after COMMIT."""

    def __init__(
        self, store: MailboxStore, config: RelayConfig, on_new_rows: Callable[[set[bytes]], None]
    ) -> None:
        self._store = store
        self._config = config
        self._on_new_rows = on_new_rows
        self._queue: queue.SimpleQueue[Request[Any] | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="relay-store", daemon=True)
        self._next_purge = 0.0
        self._next_space_check = 0.0
        self._next_known_flush = 0.0
        self.batches = 0  # for tests and the benchmark: commits so far
        # Cost of the requests queued but not yet committed (payload bytes plus
        # STORE_REQUEST_COST each, so a request without payload is not free), changed
        # under ``_count_lock`` by workers (submit) and the store thread (after commit);
        # workers stop reading above ``store_high_water`` (see worker.py), so a burst
        # cannot grow this queue.
        self._count_lock = threading.Lock()
        self.queued_bytes = 0
        self.queued_requests = 0
        # Inserts queued or running, per mailbox (same lock): with none, and no frame
        # stored, a new connection for that mailbox need not ask the store for its backlog.
        self._pending_inserts: dict[bytes, int] = {}

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request[Any]) -> None:
        """Queue ``request``; its reply runs on its poster after COMMIT (any thread)."""
        with self._count_lock:
            self.queued_bytes += request.size + STORE_REQUEST_COST
            self.queued_requests += 1
            if isinstance(request, Insert):
                pending = self._pending_inserts
                pending[request.mailbox] = pending.get(request.mailbox, 0) + 1
        self._queue.put(request)

    def _settled(self, batch: list[Request[Any]]) -> None:
        """Committed (or failed): forget the batch's cost (the workers' back-pressure)."""
        inserts = [req.mailbox for req in batch if isinstance(req, Insert)]
        cost = sum(req.size for req in batch) + STORE_REQUEST_COST * len(batch)
        with self._count_lock:
            self.queued_bytes -= cost
            self.queued_requests -= len(batch)
            pending = self._pending_inserts
            for mailbox in inserts:
                left = pending[mailbox] - 1
                if left:
                    pending[mailbox] = left
                else:
                    del pending[mailbox]

    # --- hints, answered from memory on the asking worker's thread ---------------------------
    def may_hold(self, mailbox: bytes) -> bool:
        """False only if ``mailbox`` has no stored frame and no insert queued or running.

        Called by a worker while it registers a connection under the router's
        lock, after which every new offline copy is routed to that connection.
        The pending count is read first: an insert raises it (submit) before it
        raises the usage (insert) and lowers it (settled) only after, so at
        every moment one of the two shows a frame that may exist; and one that
        commits later tells the registered connection (``on_new_rows``).
        """
        with self._count_lock:
            if mailbox in self._pending_inserts:
                return True
        usage = self._store.usage.get(mailbox)
        return usage is not None and usage[0] > 0

    def prekey_count(self, identity: bytes) -> int:
        """One-time prekeys held for ``identity`` (a hint for the client to replenish)."""
        return self._store.otk_counts.get(identity, 0)

    def is_known(self, mailbox: bytes) -> bool:
        """Is ``mailbox`` in the cache of known mailboxes (or about to be)?"""
        store = self._store
        return mailbox in store.known or mailbox in store.pending_known

    def note_known(self, mailbox: bytes) -> None:
        """``mailbox``'s identity connected; recorded within KNOWN_FLUSH_S, in one batch."""
        self._store.pending_known.add(mailbox)

    def _flush_known(self) -> None:
        """Record the mailboxes noted since the last flush, in one transaction."""
        store = self._store
        if not store.pending_known:
            return
        noted = list(store.pending_known)
        db = store.db
        try:
            db.execute("BEGIN IMMEDIATE")
            for mailbox in noted:
                store.mark_known(mailbox)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("recording %d known mailboxes failed: %s", len(noted), exc)
            self._rollback()
            return
        store.pending_known.difference_update(noted)

    # --- the thread ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Finish every queued request, then close the database."""
        self._queue.put(STOP)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first: object | None = self._queue.get(timeout=KNOWN_FLUSH_S)
            except queue.Empty:
                first = None  # a quiet second: the timers below still run
            batch, stopping = take_batch(first, self._queue, STORE_BATCH)
            try:
                self._maybe_purge()
                if batch:
                    self._run_batch(batch)
            except Exception:  # never let the store thread die: log and go on
                log.exception("store thread error")
        with contextlib.suppress(Exception):
            self._flush_known()
        self._store.close()

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now >= self._next_known_flush:
            self._next_known_flush = now + KNOWN_FLUSH_S
            self._flush_known()
        if self._store.low_space and now >= self._next_space_check:
            self._next_space_check = now + SPACE_CHECK_S
            self._reclaim_wal()
            if self._store.restore_reserve():
                self._store.low_space = False
                log.warning("disk space is back: accepting new frames again")
        if now < self._next_purge:
            return
        self._next_purge = now + self._config.purge_interval
        try:
            purged = self._store.purge(_now_ms())
        except sqlite3.Error as exc:
            log.warning("store purge failed: %s", exc)
            return
        if purged:
            log.info("purged %d expired frames", purged)

    def _run_batch(self, batch: list[Request[Any]]) -> None:
        db = self._store.db
        now_ms = _now_ms()
        results: list[Any] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for req in batch:
                results.append(req.run(self._store, now_ms))
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("store batch of %d failed (%s); retrying one by one", len(batch), exc)
            self._rollback()
            if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                self._reclaim_wal()
            results = [self._run_alone(req, now_ms) for req in batch]
        self.batches += 1
        self._settled(batch)
        new_rows: set[bytes] = set()
        for req, result in zip(batch, results, strict=True):
            if result == InsertResult.INSERTED and isinstance(req, Insert):
                new_rows.add(req.mailbox)
            if req.poster is not None and req.reply is not None:
                req.poster.call_soon(req.reply, result)
        if new_rows:
            self._on_new_rows(new_rows)

    def _run_alone(self, req: Request[Any], now_ms: int) -> Any:
        """Run one request in its own transaction; its result, or None when it failed."""
        db = self._store.db
        try:
            db.execute("BEGIN IMMEDIATE")
            result = req.run(self._store, now_ms)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("store request failed: %s", exc)
            self._rollback()
            return None
        return result

    def _reclaim_wal(self) -> None:
        """On a full disk: release the reserve, fold the WAL into the database, truncate it.

        Without this a full disk stays full: the deletes that acknowledgements
        would make, and the checkpoint that returns WAL space, both need room to
        be written. The store refuses new frames (STORE_FAILED, senders retry)
        until the reserve can be re-created.
        """
        if self._store.release_reserve():
            log.warning(
                "disk full: released the %d KiB reserve; refusing new frames until space returns",
                RESERVE_BYTES // 1024,
            )
        try:
            self._store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("store checkpoint on a full disk failed: %s", exc)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._store.db.execute("ROLLBACK")
        try:
            self._store.forget_uncommitted()
        except sqlite3.Error as exc:
            log.warning("store recount failed: %s", exc)


def _now_ms() -> int:
    return int(time.time() * 1000)
