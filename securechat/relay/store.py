"""Mailboxes and prekeys in SQLite, written by one store thread with group commit.

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
failure reply (the relay turns it into ``Error(STORE_FAILED)``).

Schema version 3 (``PRAGMA user_version``); frames are ordered by an
AUTOINCREMENT ``seq`` that never reuses a value, so a reader's cursor
(``seq > last seen``) cannot miss a row inserted after a deletion.

Quotas (all in memory, recounted from the table on open and after a rollback):
per mailbox (frames and bytes; a mailbox whose identity never connected gets a
small quota and a short lifetime), per sender identity, per sender address
prefix (the ``origin`` column, version 3), and a global cap on what is stored.
Why not per mailbox alone: any 32 bytes is a valid mailbox, so one sender could
fill the disk through mailboxes nobody will ever read. "Known" mailboxes (their
identity has connected at least once) are a table written once per identity,
never per connection, and cached in memory.

Why version 2 names parties by number: every stored frame adds one entry to
two indexes that lead with the mailbox (the duplicate check and the reader's
``(mailbox, seq)`` order), and those land on a random index page per frame,
so each COMMIT writes (and fsyncs) one page per frame per index. Version 1
spelled the 32-byte mailbox and sender keys in each entry (about 90 bytes);
version 2 maps each key once to a small integer (table ``parties``), so the
entries are about 25 bytes, the indexes four times smaller, and a batch
touches far fewer pages: the bytes written per frame fell from about 16 KiB
to about 4 KiB. The map is exact (no hash, no collision); its in-memory
cache is dropped on every rollback, so it never names an id that was not
committed. A version 1 or 2 store is migrated in one transaction on open, and a
newer version is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from securechat.core import wire
from securechat.errors import StorageError
from securechat.relay.limits import (
    KNOWN_MAILBOX_CACHE,
    MAX_STORED_OTKS,
    STORE_BATCH,
    STORE_FILL_RATIO,
    STORE_REQUEST_COST,
    STORE_ROW_OVERHEAD,
    RelayConfig,
)

log = logging.getLogger("securechat.relay")

SCHEMA_VERSION: Final = 3
DB_FILE: Final = "relay.sqlite3"
PAGE_SIZE: Final = 4096
WAL_SIZE_LIMIT: Final = 1024 * 1024  # bytes kept of the WAL after a checkpoint
WAL_AUTOCHECKPOINT_PAGES: Final = 128  # 512 KiB of WAL between checkpoints
SQLITE_FULL: Final = 13  # SQLite's result code for "database or disk is full"

# Insert results
INSERTED: Final = 1
DUPLICATE: Final = 2
OVER_QUOTA: Final = 3  # the recipient's mailbox is full
LOW_SPACE: Final = 4  # refused: the disk is full and the reserve is spent
SENDER_OVER_QUOTA: Final = 5  # the sender identity stored its share
PREFIX_OVER_QUOTA: Final = 6  # the sender's address prefix stored its share
UNKNOWN_OVER_QUOTA: Final = 7  # a mailbox nobody ever connected for is full
STORE_FULL: Final = 8  # the relay's global cap (--store-max-bytes) is reached
# Publish results (besides the count)
PUBLISH_REFUSED: Final = -1  # one-time prekeys with no signed prekey (protocol 3.4)
RESERVE_FILE: Final = "relay.reserve"
# Space held back for a full disk: released so that acknowledgements (deletes)
# and the WAL checkpoint that frees space can still be written.
RESERVE_BYTES: Final = 128 * 1024
SPACE_CHECK_S: Final = 0.5  # how often a store in low-space mode retries the reserve
KNOWN_FLUSH_S: Final = 1.0  # how often newly connected identities are recorded as known
FAILED: Final = 4
# Chosen: party ids kept in memory (32-byte key -> int); past it the cache starts over.
MAX_CACHED_PARTIES: Final = 1 << 18

_SCHEMA: Final = """
CREATE TABLE parties(id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE);
CREATE TABLE frames(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    payload BLOB NOT NULL,
    origin INTEGER NOT NULL DEFAULT 0,
    UNIQUE(mailbox, sender, msg_id)
);
CREATE INDEX frames_by_mailbox ON frames(mailbox, seq);
CREATE INDEX frames_by_expiry ON frames(expires);
CREATE TABLE signed_prekeys(identity BLOB PRIMARY KEY, spk BLOB NOT NULL);
CREATE TABLE one_time_prekeys(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity BLOB NOT NULL,
    otk BLOB NOT NULL
);
CREATE INDEX otks_by_identity ON one_time_prekeys(identity, id);
CREATE TABLE known_mailboxes(mailbox BLOB PRIMARY KEY) WITHOUT ROWID;
"""

# Version 1 -> 2: the same rows (same seq) with keys replaced by party ids; the
# AUTOINCREMENT counter carried over so no seq is ever handed out twice.
_MIGRATE_1_TO_2: Final = (
    "CREATE TABLE parties(id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE)",
    "INSERT INTO parties(key) SELECT mailbox FROM frames UNION SELECT sender FROM frames",
    "CREATE TABLE frames_v2(seq INTEGER PRIMARY KEY AUTOINCREMENT, mailbox INTEGER NOT NULL,"
    " sender INTEGER NOT NULL, msg_id BLOB NOT NULL, ts INTEGER NOT NULL,"
    " expires INTEGER NOT NULL, payload BLOB NOT NULL, UNIQUE(mailbox, sender, msg_id))",
    "INSERT INTO frames_v2(seq, mailbox, sender, msg_id, ts, expires, payload)"
    " SELECT f.seq, m.id, s.id, f.msg_id, f.ts, f.expires, f.payload FROM frames f"
    " JOIN parties m ON m.key = f.mailbox JOIN parties s ON s.key = f.sender ORDER BY f.seq",
    "DROP TABLE frames",
    "ALTER TABLE frames_v2 RENAME TO frames",
    "CREATE INDEX frames_by_mailbox ON frames(mailbox, seq)",
    "CREATE INDEX frames_by_expiry ON frames(expires)",
)

# Version 2 -> 3: the sender's address prefix per frame (0: unknown, frames stored
# before), and the mailboxes known to have connected. Every mailbox that holds frames
# at migration time is taken as known, so no stored frame gets a shorter life.
_MIGRATE_2_TO_3: Final = (
    "ALTER TABLE frames ADD COLUMN origin INTEGER NOT NULL DEFAULT 0",
    "CREATE TABLE known_mailboxes(mailbox BLOB PRIMARY KEY) WITHOUT ROWID",
    "INSERT OR IGNORE INTO known_mailboxes(mailbox)"
    " SELECT DISTINCT p.key FROM frames f JOIN parties p ON p.id = f.mailbox",
)

Row = tuple[int, bytes, bytes, int, bytes]  # seq, sender, msg_id, ts, payload


class Poster(Protocol):
    """What the store needs of a worker: run ``fn(*args)`` on that worker's thread."""

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None: ...


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
        try:
            # Created 0600 before SQLite opens it; its -wal/-shm files copy the mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._setup()
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot open the relay store {path}: {exc}") from exc
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

    def _setup(self) -> None:
        db = self.db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self._config.sync_full else 'NORMAL'}")
        # After each checkpoint the WAL is cut back to this size, so space freed by
        # acknowledged (deleted) frames really returns to the disk.
        db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        # Checkpoint often enough that the WAL never holds most of a full disk: a
        # checkpoint needs room in the main file for the pages it moves there.
        db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        elif version in (1, 2):
            self._migrate(version)
        elif version != SCHEMA_VERSION:
            raise StorageError(
                f"relay store has schema version {version}, expected {SCHEMA_VERSION}"
                " (written by a newer relay? run that version or move the store away)"
            )
        if self._config.store_max_bytes:
            pages = max(self._config.store_max_bytes // PAGE_SIZE, 1)
            db.execute(f"PRAGMA max_page_count={pages}")

    def _migrate(self, version: int) -> None:
        """Bring a version 1 or 2 store to version 3 in one transaction (all or nothing)."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            if version == 1:
                self._migrate_1_to_2()
            for statement in _MIGRATE_2_TO_3:
                db.execute(statement)
            # Identities that published prekeys have connected: their mailboxes are known.
            identities = [bytes(r[0]) for r in db.execute("SELECT identity FROM signed_prekeys")]
            db.executemany(
                "INSERT OR IGNORE INTO known_mailboxes(mailbox) VALUES (?)",
                [(wire.mailbox_address(i),) for i in identities if len(i) == wire.KEY_SIZE],
            )
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        log.info("relay store migrated from schema version %d to %d", version, SCHEMA_VERSION)

    def _migrate_1_to_2(self) -> None:
        """Keys become party ids, keeping every seq (inside the caller's transaction)."""
        db = self.db
        last = db.execute(
            "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'frames'"
        ).fetchone()[0]
        for statement in _MIGRATE_1_TO_2:
            db.execute(statement)
        db.execute("DELETE FROM sqlite_sequence WHERE name IN ('frames', 'frames_v2')")
        db.execute(
            "INSERT INTO sqlite_sequence(name, seq)"
            " SELECT 'frames', max(?, coalesce(max(seq), 0)) FROM frames",
            (last,),
        )

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
    ) -> int:
        """Store one copy; INSERTED, DUPLICATE (idempotent retry) or a refusal.

        ``force`` skips the per-mailbox, per-sender and per-prefix quotas: used for
        a copy that was already delivered live but not acknowledged in time. The
        global cap and a full disk refuse even those (the sender keeps the message
        and retries: nothing acknowledged is lost). ``origin``: the sender's address
        prefix (empty: not counted per prefix).
        """
        if self.low_space:
            return LOW_SPACE
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
            return DUPLICATE if self._exists(mailbox, sender, msg_id) else STORE_FULL
        known = self.is_known(mailbox)
        sender_id = self._party(sender, create=False)
        origin_id = self._party(origin, create=False) if origin else 0
        if not force:
            refusal = self._over_quota(mailbox, sender_id, origin_id, size, known)
            if refusal:
                return DUPLICATE if self._exists(mailbox, sender, msg_id) else refusal
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
            return DUPLICATE
        usage = self.usage.get(mailbox)
        if usage is None:
            usage = self.usage[mailbox] = [0, 0]
        usage[0] += 1
        usage[1] += size
        self.sender_usage[sender_id] = self.sender_usage.get(sender_id, 0) + size
        if origin_id:
            self.origin_usage[origin_id] = self.origin_usage.get(origin_id, 0) + size
        self.total_cost += cost
        return INSERTED

    def _over_quota(
        self,
        mailbox: bytes,
        sender_id: int | None,
        origin_id: int | None,
        size: int,
        known: bool,
    ) -> int:
        """The quota a new copy would break (0: none), the recipient's first."""
        cfg = self._config
        frames, stored = self.usage.get(mailbox, (0, 0))
        if known:
            if frames + 1 > cfg.quota_frames or stored + size > cfg.quota_bytes:
                return OVER_QUOTA
        elif frames + 1 > min(cfg.unknown_quota_frames, cfg.quota_frames) or stored + size > min(
            cfg.unknown_quota_bytes, cfg.quota_bytes
        ):
            return UNKNOWN_OVER_QUOTA
        if sender_id is not None and (
            self.sender_usage.get(sender_id, 0) + size > cfg.sender_quota_bytes
        ):
            return SENDER_OVER_QUOTA
        if origin_id and self.origin_usage.get(origin_id, 0) + size > cfg.prefix_quota_bytes:
            return PREFIX_OVER_QUOTA
        return 0

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
    def publish_prekeys(
        self, identity: bytes, spk: bytes, otks: tuple[bytes, ...]
    ) -> tuple[int, bool]:
        """Store a bundle; (one-time prekeys held, whether anything changed).

        One-time prekeys need a signed prekey (in this frame or published before):
        without one they could never be handed out, so the publish is refused
        (count ``PUBLISH_REFUSED``) and nothing is stored.
        """
        db = self.db
        row = db.execute("SELECT spk FROM signed_prekeys WHERE identity=?", (identity,)).fetchone()
        old_spk = bytes(row[0]) if row is not None else b""
        if otks and not spk and not old_spk:
            return PUBLISH_REFUSED, False
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
        return count, changed

    def count_prekeys(self, identity: bytes) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM one_time_prekeys WHERE identity=?", (identity,)
        ).fetchone()
        return int(row[0])

    def take_prekeys(
        self, identity: bytes, *, one_time: bool = True
    ) -> tuple[bytes, bytes | None, int]:
        """The signed prekey and (with ``one_time``) one one-time prekey, which is deleted
        (handed out once); and the one-time prekeys left."""
        row = self.db.execute(
            "SELECT spk FROM signed_prekeys WHERE identity=?", (identity,)
        ).fetchone()
        left = self.otk_counts.get(identity, 0)
        if row is None:
            return b"", None, left
        otk = None
        if one_time and left:
            otk = self.db.execute(
                "DELETE FROM one_time_prekeys WHERE id = (SELECT id FROM one_time_prekeys"
                " WHERE identity=? ORDER BY id LIMIT 1) RETURNING otk",
                (identity,),
            ).fetchone()
            if otk is not None:
                left = self.otk_counts[identity] = max(left - 1, 0)
        return bytes(row[0]), (bytes(otk[0]) if otk else None), left


def _subtract(counts: dict[int, int], key: int, amount: int) -> None:
    left = counts.get(key, 0) - amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@dataclass(slots=True)
class Request:
    """One unit of store work: ``op(store, now_ms)``; its result goes to ``fn`` on ``poster``."""

    op: Callable[[MailboxStore, int], Any]
    poster: Poster | None
    fn: Callable[..., None] | None
    mailbox: bytes | None = None  # set on inserts: owners are told about new rows
    size: int = 0  # payload bytes held by the request (its cost is this + STORE_REQUEST_COST)
    result: Any = None
    failed: bool = False


class StoreThread:
    """Runs every request in a queue, many per transaction, replies after COMMIT."""

    def __init__(
        self, store: MailboxStore, config: RelayConfig, on_new_rows: Callable[[set[bytes]], None]
    ) -> None:
        self._store = store
        self._config = config
        self._on_new_rows = on_new_rows
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="relay-store", daemon=True)
        self._next_purge = 0.0
        self._next_space_check = 0.0
        self._next_known_flush = 0.0
        self.batches = 0  # for tests and the benchmark: commits so far
        # Cost of the requests queued but not yet committed (payload bytes plus
        # STORE_REQUEST_COST each, so a request without payload is not free), changed
        # under ``_count_lock`` by workers (put) and the store thread (after commit);
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

    def put(self, request: Request) -> None:
        mailbox = request.mailbox
        with self._count_lock:
            self.queued_bytes += request.size + STORE_REQUEST_COST
            self.queued_requests += 1
            if mailbox is not None:
                pending = self._pending_inserts
                pending[mailbox] = pending.get(mailbox, 0) + 1
        self._queue.put(request)

    def _settled(self, batch: list[Request]) -> None:
        """Committed (or failed): forget the batch's cost (the workers' back-pressure)."""
        inserts = [req.mailbox for req in batch if req.mailbox is not None]
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

    def may_hold(self, mailbox: bytes) -> bool:
        """False only if ``mailbox`` has no stored frame and no insert queued or running.

        Called by a worker while it registers a connection under the router's
        lock, after which every new offline copy is routed to that connection.
        The pending count is read first: an insert raises it (put) before it
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
        """From a worker: is ``mailbox`` in the cache of known mailboxes (or about to be)?"""
        store = self._store
        return mailbox in store.known or mailbox in store.pending_known

    def note_known(self, mailbox: bytes) -> None:
        """From a worker: ``mailbox``'s identity connected; recorded within KNOWN_FLUSH_S."""
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

    def stop(self) -> None:
        """Finish every queued request, then close the database."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=KNOWN_FLUSH_S)
            except queue.Empty:
                first = _NOTHING
            batch: list[Request] = []
            if first is None:
                stopping = True
            elif first is not _NOTHING:
                batch.append(first)
            while len(batch) < STORE_BATCH and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
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

    def _run_batch(self, batch: list[Request]) -> None:
        db = self._store.db
        now_ms = _now_ms()
        try:
            db.execute("BEGIN IMMEDIATE")
            for req in batch:
                req.result = req.op(self._store, now_ms)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("store batch of %d failed (%s); retrying one by one", len(batch), exc)
            self._rollback()
            if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                self._reclaim_wal()
            for req in batch:
                self._run_alone(req, now_ms)
        self.batches += 1
        self._settled(batch)
        new_rows: set[bytes] = set()
        for req in batch:
            if req.mailbox is not None and not req.failed and req.result == INSERTED:
                new_rows.add(req.mailbox)
            if req.poster is not None and req.fn is not None:
                req.poster.call_soon(req.fn, None if req.failed else req.result)
        if new_rows:
            self._on_new_rows(new_rows)

    def _run_alone(self, req: Request, now_ms: int) -> None:
        db = self._store.db
        try:
            db.execute("BEGIN IMMEDIATE")
            req.result = req.op(self._store, now_ms)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("store request failed: %s", exc)
            req.failed = True
            self._rollback()

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


_NOTHING: Final = Request(op=lambda store, now: None, poster=None, fn=None)


def _now_ms() -> int:
    return int(time.time() * 1000)


def open_store(data_dir: Path, config: RelayConfig) -> MailboxStore:
    return MailboxStore(data_dir / DB_FILE, config)
