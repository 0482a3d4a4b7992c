"""The client store's tables and their migrations (shell).

Schema 4 is current (``PRAGMA user_version``): schema 3 plus the event log
(table ``events``, what a daemon's subscribers resume from), which the 3 -> 4
migration adds empty (the history stays where it is). A new file gets the tables at
once; schema 2 (raw keys, ids and conversation ids as row keys) is re-keyed by
MAC and re-sealed, and schema 1 (no ``e2e_peers`` table, the E2E state in one
blob that :mod:`securechat.client.e2e_store` moves into rows) goes through
schema 2, each migration in one transaction. A newer schema is refused: this
version cannot know what it means.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from securechat.client.sealing import Sealer
from securechat.errors import StorageError

SCHEMA_VERSION: Final = 4  # PRAGMA user_version; 0 = a new file or a schema 1 file

TABLES: Final = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS e2e_peers (peer BLOB PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg BLOB NOT NULL UNIQUE,
    control INTEGER NOT NULL,
    frame BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conv BLOB NOT NULL,
    msg BLOB NOT NULL,
    status INTEGER NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (conv, msg)
);
CREATE INDEX IF NOT EXISTS history_by_msg ON history (msg);
CREATE TABLE IF NOT EXISTS held (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conv BLOB NOT NULL,
    msg BLOB NOT NULL UNIQUE,
    v BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts_due (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    peer BLOB NOT NULL,
    v BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS delivered (
    msg BLOB NOT NULL,
    peer BLOB NOT NULL,
    PRIMARY KEY (msg, peer)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
"""
# Schema 3 -> 4: the event log, empty (cursors start after the migration).
_SCHEMA_4_EVENTS: Final = (
    "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, v BLOB NOT NULL)"
)

# Schema 2 tables (schema 1 = the same without e2e_peers), read only by the migration.
_SCHEMA_2_MISSING: Final = (
    "CREATE TABLE IF NOT EXISTS e2e_peers (peer BLOB PRIMARY KEY, v BLOB NOT NULL)"
)

OutboxInsert = Callable[[bytes, bytes], None]  # (msg_id, frame)
HistoryInsert = Callable[[str, bytes, int, dict[str, Any]], object]  # (conv, id, status, record)


def create_or_migrate(
    db: sqlite3.Connection,
    path: Path,
    sealer: Sealer,
    outbox_insert: OutboxInsert,
    history_insert: HistoryInsert,
) -> None:
    """Bring the file at ``path`` to :data:`SCHEMA_VERSION` (the inserts write rows as now)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        has_meta = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:  # a new file
            db.executescript(
                f"BEGIN IMMEDIATE; {TABLES} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
            return
        db.execute(_SCHEMA_2_MISSING)  # schema 1: the E2E blob moves later (e2e_store)
        version = 2
    if version == 2:
        _migrate_2_to_3(db, sealer, outbox_insert, history_insert)  # TABLES has events too
    elif version == 3:
        db.executescript(
            f"BEGIN IMMEDIATE; {_SCHEMA_4_EVENTS}; PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
        )
    elif version != SCHEMA_VERSION:
        raise StorageError(
            f"the client state {path} has schema version {version}, expected "
            f"{SCHEMA_VERSION} (written by a newer securechat?)",
            hint="run that newer version",
        )


def _migrate_2_to_3(
    db: sqlite3.Connection,
    sealer: Sealer,
    outbox_insert: OutboxInsert,
    history_insert: HistoryInsert,
) -> None:
    """Re-key every row by its MAC and re-seal it, in one transaction."""
    state_key, history_key = sealer.keys.state, sealer.keys.history
    db.execute("BEGIN IMMEDIATE")
    try:
        peers = db.execute("SELECT peer, v FROM e2e_peers").fetchall()
        outbox = db.execute("SELECT msg_id, frame FROM outbox ORDER BY seq").fetchall()
        history = db.execute(
            "SELECT conv, msg_id, status, record FROM history ORDER BY seq"
        ).fetchall()
        for table in ("e2e_peers", "outbox", "history"):
            db.execute(f"DROP TABLE {table}")
        for statement in TABLES.split(";"):  # not executescript: it would COMMIT
            if statement.strip():
                db.execute(statement)
        for key, sealed in peers:
            row = sealer.open(state_key, f"e2e/peer/{bytes(key).hex()}", sealed)
            mac = sealer.peer_key(bytes(key))
            sealed = sealer.seal(state_key, f"e2e/peer/{mac.hex()}", row)
            db.execute("INSERT INTO e2e_peers (peer, v) VALUES (?, ?)", (mac, sealed))
        for msg_id, frame in outbox:
            outbox_insert(
                bytes(msg_id), sealer.open(state_key, f"outbox/{bytes(msg_id).hex()}", frame)
            )
        for conv, msg_id, status, record in history:
            ad = f"history/{conv}/{bytes(msg_id).hex()}"
            fields = json.loads(sealer.open(history_key, ad, record))
            history_insert(conv, bytes(msg_id), int(status), fields)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    with contextlib.suppress(sqlite3.Error):  # old pages out of the WAL file too
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
