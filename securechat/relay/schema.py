"""The relay store's SQLite schema, version 3, and the migrations from 1 and 2.

Version (``PRAGMA user_version``) 3; frames are ordered by an AUTOINCREMENT
``seq`` that never reuses a value, so a reader's cursor (``seq > last seen``)
cannot miss a row inserted after a deletion.

Why version 2 names parties by number: every stored frame adds one entry to
two indexes that lead with the mailbox (the duplicate check and the reader's
``(mailbox, seq)`` order), and those land on a random index page per frame,
so each COMMIT writes (and fsyncs) one page per frame per index. Version 1
spelled the 32-byte mailbox and sender keys in each entry (about 90 bytes);
version 2 maps each key once to a small integer (table ``parties``), so the
entries are about 25 bytes, the indexes four times smaller, and a batch
touches far fewer pages: the bytes written per frame fell from about 16 KiB
to about 4 KiB. The map is exact (no hash, no collision).

Version 3 adds the sender's address prefix per frame (``origin``, for the
per-prefix quota) and the table of mailboxes whose identity has connected.
A version 1 or 2 store is migrated in one transaction on open (all or
nothing), and a newer version is refused.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from typing import Final

from securechat.core import wire
from securechat.errors import StorageError
from securechat.relay.limits import RelayConfig

log = logging.getLogger("securechat.relay")

SCHEMA_VERSION: Final = 3
PAGE_SIZE: Final = 4096
WAL_SIZE_LIMIT: Final = 1024 * 1024  # bytes kept of the WAL after a checkpoint
WAL_AUTOCHECKPOINT_PAGES: Final = 128  # 512 KiB of WAL between checkpoints

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


def setup(db: sqlite3.Connection, config: RelayConfig) -> None:
    """Journal and checkpoint settings; create, migrate or refuse the schema; the page cap."""
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if config.sync_full else 'NORMAL'}")
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
        _migrate(db, version)
    elif version != SCHEMA_VERSION:
        raise StorageError(
            f"relay store has schema version {version}, expected {SCHEMA_VERSION}"
            " (written by a newer relay? run that version or move the store away)"
        )
    if config.store_max_bytes:
        pages = max(config.store_max_bytes // PAGE_SIZE, 1)
        db.execute(f"PRAGMA max_page_count={pages}")


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Bring a version 1 or 2 store to version 3 in one transaction (all or nothing)."""
    try:
        db.execute("BEGIN IMMEDIATE")
        if version == 1:
            _migrate_1_to_2(db)
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


def _migrate_1_to_2(db: sqlite3.Connection) -> None:
    """Keys become party ids, keeping every seq (inside the caller's transaction)."""
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
