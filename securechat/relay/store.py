"""Mailboxes and prekeys in SQLite: the queries and the quotas (the relay's store backend).

Only the store thread (``store_thread.py``) calls these methods after open,
inside the transactions it commits; workers read a few of the in-memory
dicts (``usage``, ``otk_counts``, ``known``) through the thread's hints. The
schema and its migrations are in ``schema.py``; what the relay's rules see of
all this is ``mailboxes.py`` (requests and results as data).

Quotas (all in memory, recounted from the table on open and after a rollback):
per mailbox (frames and bytes; a mailbox whose identity never connected gets a
small quota and a short lifetime), per sender identity, per sender address
prefix (the ``origin`` column, version 3), and a global cap on what is stored.
Why not per mailbox alone: any 32 bytes is a valid mailbox, so one sender could
fill the disk through mailboxes nobody will ever read. "Known" mailboxes (their
identity has connected at least once) are a table written once per identity,
never per connection, and cached in memory.

Parties: mailboxes, sender keys and origins are named by small integers
(table ``parties``, see ``schema.py``). The in-memory cache of that map is
dropped on every rollback, so it never names an id that was not committed.

A full disk: ``relay.reserve`` (128 KiB of zeros) is released so that the
deletes of acknowledgements and the checkpoint that returns WAL space can still
be written; new frames are refused (``LOW_SPACE``) until it can be re-created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import Final

from securechat.errors import StorageError
from securechat.relay import schema
from securechat.relay.limits import (
    KNOWN_MAILBOX_CACHE,
    MAX_STORED_OTKS,
    STORE_FILL_RATIO,
    STORE_ROW_OVERHEAD,
    RelayConfig,
)
from securechat.relay.mailboxes import Bundle, InsertResult, Published, Row
from securechat.relay.oserrors import map_exceptions

log = logging.getLogger("securechat.relay")

DB_FILE: Final = "relay.sqlite3"
RESERVE_FILE: Final = "relay.reserve"
# Space held back for a full disk: released so that acknowledgements (deletes)
# and the WAL checkpoint that frees space can still be written.
RESERVE_BYTES: Final = 128 * 1024
# Chosen: party ids kept in memory (32-byte key -> int); past it the cache starts over.
MAX_CACHED_PARTIES: Final = 1 << 18


class MailboxStore:
    """Synchronous SQL operations; only the store thread calls them after open."""

    def __init__(self, path: Path, config: RelayConfig) -> None:
        self._config = config
        self._ttl_ms = int(config.ttl * 1000)
        # An unknown mailbox never gets more than a known one (a tighter --ttl wins).
        self._unknown_ttl_ms = int(min(config.unknown_ttl, config.ttl) * 1000)
        self._cap = int(config.store_max_bytes * STORE_FILL_RATIO)
        self.at_cap = False  # the global cap refuses new frames (logged once per episode)
        self._reserve = path.with_name(RESERVE_FILE)
        self.low_space = not self.restore_reserve(headroom=0)
        self._parties: dict[bytes, int] = {}  # cache of the parties table (key -> id)
        failures = {OSError: StorageError, sqlite3.Error: StorageError}
        with map_exceptions(failures, f"cannot open the relay store {path}"):
            # Created 0600 before SQLite opens it; its -wal/-shm files copy the mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            schema.setup(self.db, config)
        # Per mailbox [frames, bytes] for the quota, kept in memory; and per identity
        # the one-time prekeys held, so a new connection learns its count without a
        # store round trip (workers read both dicts; only the store thread writes).
        self.usage: dict[bytes, list[int]] = {}
        self.otk_counts: dict[bytes, int] = {}
        # Stored payload bytes per sender party id and per origin (prefix) party id, and
        # the total cost (payload + STORE_ROW_OVERHEAD per frame) for the global cap.
        self.sender_usage: dict[int, int] = {}
        self.origin_usage: dict[int, int] = {}
        self.total_cost = 0
        self.recount()
        # Mailboxes known to have connected (a cache of known_mailboxes; workers read it
        # to skip the store when a connection's mailbox is already recorded).
        rows = self.db.execute(
            "SELECT mailbox FROM known_mailboxes LIMIT ?", (KNOWN_MAILBOX_CACHE,)
        )
        self.known: dict[bytes, None] = {bytes(mb): None for (mb,) in rows}
        # Mailboxes whose identity connected and that are not recorded yet: workers add
        # (StoreThread.note_known), the store thread records them in one transaction
        # every KNOWN_FLUSH_S, so a burst of new identities costs one commit, not one each.
        self.pending_known: set[bytes] = set()
        # Mailboxes looked up and not known (store thread only): most frames for a stranger
        # come in runs, and a look-up per frame cost the stored path a quarter of its rate.
        self._unknown: dict[bytes, None] = {}

    def _party(self, key: bytes, *, create: bool) -> int | None:
        """The id of a mailbox, sender key or origin prefix; with ``create``, a new one if
        it has none.

        The cache only ever holds ids read or written in the current transaction
        or before it; ``forget_uncommitted`` empties it on rollback, so an id that
        a rollback undid is never used for another row.
        """
        pid = self._parties.get(key)
        if pid is not None:
            return pid
        row = self.db.execute("SELECT id FROM parties WHERE key=?", (key,)).fetchone()
        if row is not None:
            pid = int(row[0])
        elif not create:
            return None
        else:
            cur = self.db.execute("INSERT INTO parties(key) VALUES (?)", (key,))
            assert cur.lastrowid is not None
            pid = cur.lastrowid
        if len(self._parties) >= MAX_CACHED_PARTIES:
            self._parties.clear()
        self._parties[key] = pid
        return pid

    def forget_uncommitted(self) -> None:
        """After a rollback: drop cached ids and known mailboxes (some may be undone), recount."""
        self._parties.clear()
        self.known = {}
        self._unknown.clear()
        self.recount()

    def release_reserve(self) -> bool:
        """The disk is full: free the reserve and stop accepting new frames."""
        self.low_space = True
        try:
            self._reserve.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot release the store's disk reserve: %s", exc)
            return False
        return True

    def restore_reserve(self, *, headroom: int = RESERVE_BYTES) -> bool:
        """Re-create the reserve; True when it exists (so new frames may be stored).

        ``headroom``: free space that must remain beside it (after a full disk,
        taking the reserve back must not leave the disk full again).
        """
        try:
            if self._reserve.stat().st_size >= RESERVE_BYTES:
                return True
        except FileNotFoundError:
            pass
        try:
            fs = os.statvfs(self._reserve.parent)
        except OSError:
            return False
        if fs.f_bavail * fs.f_frsize < RESERVE_BYTES + headroom:
            return False  # taking the reserve back now would leave the disk full again
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, bytes(RESERVE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                self._reserve.unlink()
            return False
        return True

    def recount(self) -> None:
        rows = self.db.execute(
            "SELECT p.key, count(*), sum(length(f.payload)) FROM frames f"
            " JOIN parties p ON p.id = f.mailbox GROUP BY f.mailbox"
        )
        self.usage = {bytes(mb): [n, size] for mb, n, size in rows}
        self.sender_usage = dict(
            self.db.execute("SELECT sender, sum(length(payload)) FROM frames GROUP BY sender")
        )
        self.origin_usage = dict(
            self.db.execute(
                "SELECT origin, sum(length(payload)) FROM frames WHERE origin != 0 GROUP BY origin"
            )
        )
        frames = sum(n for n, _ in self.usage.values())
        self.total_cost = sum(b for _, b in self.usage.values()) + frames * STORE_ROW_OVERHEAD
        counts = self.db.execute(
            "SELECT identity, count(*) FROM one_time_prekeys GROUP BY identity"
        )
        self.otk_counts = {bytes(identity): n for identity, n in counts}

    def close(self) -> None:
        self.db.close()

    # --- known mailboxes -----------------------------------------------------------------------
    def is_known(self, mailbox: bytes) -> bool:
        """Has the identity of ``mailbox`` ever connected (or is it recorded as such)?"""
        if mailbox in self.known or mailbox in self.pending_known:
            return True
        if mailbox in self._unknown:
            return False
        row = self.db.execute(
            "SELECT 1 FROM known_mailboxes WHERE mailbox=?", (mailbox,)
        ).fetchone()
        if row is None:
            if len(self._unknown) >= KNOWN_MAILBOX_CACHE:
                self._unknown.clear()
            self._unknown[mailbox] = None
            return False
        self._remember_known(mailbox)
        return True

    def mark_known(self, mailbox: bytes) -> bool:
        """Record that ``mailbox``'s identity connected; True the first time ever.

        The first time, frames already waiting for it (stored with the short
        lifetime of an unknown mailbox) get the full lifetime.
        """
        cur = self.db.execute(
            "INSERT OR IGNORE INTO known_mailboxes(mailbox) VALUES (?)", (mailbox,)
        )
        self._remember_known(mailbox)
        if cur.rowcount != 1:
            return False
        mailbox_id = self._party(mailbox, create=False)
        if mailbox_id is not None:
            self.db.execute(
                "UPDATE frames SET expires = ts + ? WHERE mailbox = ?", (self._ttl_ms, mailbox_id)
            )
        return True

    def _remember_known(self, mailbox: bytes) -> None:
        self._unknown.pop(mailbox, None)
        if len(self.known) >= KNOWN_MAILBOX_CACHE:
            self.known = {}  # a fresh dict: workers reading the old one are unaffected
        self.known[mailbox] = None

    # --- frames ------------------------------------------------------------------------------
    def insert(
        self,
        mailbox: bytes,
        sender: bytes,
        msg_id: bytes,
        ts: int,
        payload: bytes,
        *,
        force: bool,
        origin: bytes = b"",
    ) -> InsertResult:
        """Store one copy; INSERTED, DUPLICATE (idempotent retry) or a refusal.

        ``force`` skips the per-mailbox, per-sender and per-prefix quotas: used for
        a copy that was already delivered live but not acknowledged in time. The
        global cap and a full disk refuse even those (the sender keeps the message
        and retries: nothing acknowledged is lost). ``origin``: the sender's address
        prefix (empty: not counted per prefix).
        """
        if self.low_space:
            return InsertResult.LOW_SPACE
        size = len(payload)
        cost = size + STORE_ROW_OVERHEAD
        if self._cap and self.total_cost + cost > self._cap:
            if not self.at_cap:
                self.at_cap = True
                log.warning(
                    "store cap reached: %d MiB stored, %d%% of --store-max-bytes %d MiB; new"
                    " frames are refused (senders keep them and retry) until acknowledgements"
                    " or expiry free space; raise --store-max-bytes if the disk allows",
                    self.total_cost >> 20,
                    int(STORE_FILL_RATIO * 100),
                    self._config.store_max_bytes >> 20,
                )
            return (
                InsertResult.DUPLICATE
                if self._exists(mailbox, sender, msg_id)
                else InsertResult.STORE_FULL
            )
        known = self.is_known(mailbox)
        sender_id = self._party(sender, create=False)
        origin_id = self._party(origin, create=False) if origin else 0
        if not force:
            refusal = self._over_quota(mailbox, sender_id, origin_id, size, known)
            if refusal is not None:
                return InsertResult.DUPLICATE if self._exists(mailbox, sender, msg_id) else refusal
        mailbox_id = self._party(mailbox, create=True)
        if sender_id is None:
            sender_id = self._party(sender, create=True)
        if origin_id is None:
            origin_id = self._party(origin, create=True)
        assert sender_id is not None and origin_id is not None
        ttl = self._ttl_ms if known else self._unknown_ttl_ms
        cur = self.db.execute(
            "INSERT OR IGNORE INTO frames(mailbox, sender, msg_id, ts, expires, payload, origin)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (mailbox_id, sender_id, msg_id, ts, ts + ttl, payload, origin_id),
        )
        if cur.rowcount != 1:
            return InsertResult.DUPLICATE
        usage = self.usage.get(mailbox)
        if usage is None:
            usage = self.usage[mailbox] = [0, 0]
        usage[0] += 1
        usage[1] += size
        self.sender_usage[sender_id] = self.sender_usage.get(sender_id, 0) + size
        if origin_id:
            self.origin_usage[origin_id] = self.origin_usage.get(origin_id, 0) + size
        self.total_cost += cost
        return InsertResult.INSERTED

    def _over_quota(
        self,
        mailbox: bytes,
        sender_id: int | None,
        origin_id: int | None,
        size: int,
        known: bool,
    ) -> InsertResult | None:
        """The quota a new copy would break (None: none), the recipient's first."""
        cfg = self._config
        frames, stored = self.usage.get(mailbox, (0, 0))
        if known:
            if frames + 1 > cfg.quota_frames or stored + size > cfg.quota_bytes:
                return InsertResult.OVER_QUOTA
        elif frames + 1 > min(cfg.unknown_quota_frames, cfg.quota_frames) or stored + size > min(
            cfg.unknown_quota_bytes, cfg.quota_bytes
        ):
            return InsertResult.UNKNOWN_OVER_QUOTA
        if sender_id is not None and (
            self.sender_usage.get(sender_id, 0) + size > cfg.sender_quota_bytes
        ):
            return InsertResult.SENDER_OVER_QUOTA
        if origin_id and self.origin_usage.get(origin_id, 0) + size > cfg.prefix_quota_bytes:
            return InsertResult.PREFIX_OVER_QUOTA
        return None

    def _frame_key(
        self, mailbox: bytes, sender: bytes, msg_id: bytes
    ) -> tuple[int, int, bytes] | None:
        """The (mailbox id, sender id, msg_id) of a frame, or None if no frame can match."""
        mailbox_id = self._party(mailbox, create=False)
        sender_id = self._party(sender, create=False)
        if mailbox_id is None or sender_id is None:
            return None
        return mailbox_id, sender_id, msg_id

    def _exists(self, mailbox: bytes, sender: bytes, msg_id: bytes) -> bool:
        key = self._frame_key(mailbox, sender, msg_id)
        if key is None:
            return False
        row = self.db.execute(
            "SELECT 1 FROM frames WHERE mailbox=? AND sender=? AND msg_id=?", key
        ).fetchone()
        return row is not None

    def fetch(
        self, mailbox: bytes, after_seq: int, limit: int, now_ms: int, max_bytes: int = 0
    ) -> list[Row]:
        """Up to ``limit`` rows after ``after_seq``; with ``max_bytes``, stop at the row
        that reaches that many payload bytes (memory: many readers fetch at once)."""
        mailbox_id = self._party(mailbox, create=False)
        if mailbox_id is None:
            return []
        cur = self.db.execute(
            "SELECT f.seq, p.key, f.msg_id, f.ts, f.payload FROM frames f"
            " JOIN parties p ON p.id = f.sender"
            " WHERE f.mailbox=? AND f.seq>? AND f.expires>=? ORDER BY f.seq LIMIT ?",
            (mailbox_id, after_seq, now_ms, limit),
        )
        if not max_bytes:
            return cur.fetchall()
        rows: list[Row] = []
        size = 0
        for row in cur:
            rows.append(row)
            size += len(row[4])
            if size >= max_bytes:
                break
        cur.close()
        return rows

    def delete(self, mailbox: bytes, sender: bytes, msg_id: bytes) -> bool:
        key = self._frame_key(mailbox, sender, msg_id)
        if key is None:
            return False
        row = self.db.execute(
            "DELETE FROM frames WHERE mailbox=? AND sender=? AND msg_id=?"
            " RETURNING length(payload), origin",
            key,
        ).fetchone()
        if row is None:
            return False
        size, origin_id = row
        usage = self.usage.get(mailbox)
        if usage is not None:
            usage[0] -= 1
            usage[1] -= size
        _subtract(self.sender_usage, key[1], size)
        if origin_id:
            _subtract(self.origin_usage, origin_id, size)
        self.total_cost -= size + STORE_ROW_OVERHEAD
        self._below_cap()
        return True

    def _below_cap(self) -> None:
        if self.at_cap and self.total_cost < self._cap * 0.9:
            self.at_cap = False
            log.info("store below its cap again: accepting new frames")

    def purge(self, now_ms: int) -> int:
        """Delete expired frames; then forget parties no frame names any more.

        The parties sweep scans the frames once, like ``recount``, so it runs
        only when something expired (not on every acknowledgement).
        """
        count = self.db.execute("DELETE FROM frames WHERE expires<?", (now_ms,)).rowcount
        if count:
            self._parties.clear()  # ids below may be deleted (and later reused)
            self.db.execute(
                "DELETE FROM parties WHERE id NOT IN (SELECT sender FROM frames)"
                " AND id NOT IN (SELECT origin FROM frames)"
                " AND NOT EXISTS (SELECT 1 FROM frames WHERE mailbox = parties.id)"
            )
            self.recount()
            self._below_cap()
        return count

    # --- prekeys -------------------------------------------------------------------------------
    def publish_prekeys(self, identity: bytes, spk: bytes, otks: tuple[bytes, ...]) -> Published:
        """Store a bundle; (one-time prekeys held, whether anything changed).

        One-time prekeys need a signed prekey (in this frame or published before):
        without one they could never be handed out, so the publish is refused
        (``refused``) and nothing is stored.
        """
        db = self.db
        row = db.execute("SELECT spk FROM signed_prekeys WHERE identity=?", (identity,)).fetchone()
        old_spk = bytes(row[0]) if row is not None else b""
        if otks and not spk and not old_spk:
            return Published(self.otk_counts.get(identity, 0), changed=False, refused=True)
        changed = False
        if spk and spk != old_spk:
            db.execute(
                "INSERT OR REPLACE INTO signed_prekeys(identity, spk) VALUES (?, ?)",
                (identity, spk),
            )
            changed = True
        room = max(MAX_STORED_OTKS - self.count_prekeys(identity), 0)
        if otks[:room]:
            db.executemany(
                "INSERT INTO one_time_prekeys(identity, otk) VALUES (?, ?)",
                [(identity, otk) for otk in otks[:room]],
            )
            changed = True
        count = self.otk_counts[identity] = self.count_prekeys(identity)
        return Published(count, changed)

    def count_prekeys(self, identity: bytes) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM one_time_prekeys WHERE identity=?", (identity,)
        ).fetchone()
        return int(row[0])

    def take_prekeys(self, identity: bytes, *, one_time: bool = True) -> Bundle:
        """The signed prekey and (with ``one_time``) one one-time prekey, which is deleted
        (handed out once); and the one-time prekeys left."""
        row = self.db.execute(
            "SELECT spk FROM signed_prekeys WHERE identity=?", (identity,)
        ).fetchone()
        left = self.otk_counts.get(identity, 0)
        if row is None:
            return Bundle(b"", None, left)
        otk = None
        if one_time and left:
            otk = self.db.execute(
                "DELETE FROM one_time_prekeys WHERE id = (SELECT id FROM one_time_prekeys"
                " WHERE identity=? ORDER BY id LIMIT 1) RETURNING otk",
                (identity,),
            ).fetchone()
            if otk is not None:
                left = self.otk_counts[identity] = max(left - 1, 0)
        return Bundle(bytes(row[0]), bytes(otk[0]) if otk else None, left)


def _subtract(counts: dict[int, int], key: int, amount: int) -> None:
    left = counts.get(key, 0) - amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def open_store(data_dir: Path, config: RelayConfig) -> MailboxStore:
    return MailboxStore(data_dir / DB_FILE, config)
