"""The client's local state, encrypted at rest (shell).

One SQLite database per identity under the key directory,
``<home>/<name>.state.db``, mode 0600, holding:

* the end-to-end state as rows: one core row (``meta`` key ``e2e/core``) and
  one row per peer (table ``e2e_peers``), so a message rewrites only the row
  of the peer it concerns;
* the outbox: every message (and receipt) the relay has not yet accepted, as
  the exact sealed frame, so a restart resends the same bytes and the relay's
  idempotency by message id holds;
* held messages: text the user sent that waits for a peer's prekeys (it is
  sealed end to end only once they arrive, see :mod:`~securechat.client.outgoing`);
* receipts due: ids of messages we stored, to be acknowledged end to end;
* who has acknowledged each message we sent (``delivered``);
* the history, one sealed record per message, per conversation;
* the known peers (trust on first use), one sealed blob;
* the event log (schema 4): one sealed row per history line added, per mark
  raised and per key change noticed, numbered by a cursor that only grows. It is
  written in the transaction that changes the history, by whichever process holds
  the lock, so a daemon's subscriber that was away resumes from its last cursor
  and misses nothing (:mod:`securechat.daemon`). Rows hold references (kind,
  conversation, message id, mark, time), not the text, which stays in the
  history; the oldest rows beyond :data:`MAX_EVENTS` are deleted.

What a reader of the file learns (schema 4): row counts and sizes, the order
of rows, a delivery status per history row, and which rows belong to the same
conversation or peer. It does not learn who the peers are, which message ids
the relay saw, or when: every row key is a MAC under a key derived from the
identity (``index``), not the raw identity key, conversation id or message id,
and every value, times included, is sealed with XChaCha20-Poly1305 under the
``state`` or ``history`` key with the table and row key as associated data, so
rows cannot be swapped (:mod:`~securechat.client.sealing`). Deleted rows are
overwritten (``secure_delete``). Schema 2 (raw keys and ids in clear) and
schema 1 are migrated on open, in one transaction
(:mod:`~securechat.client.store_schema`).

An exclusive lock on ``<name>.state.lock`` keeps two processes from driving
the same ratchets (which would desynchronise them); a read-only store (for
``history`` beside a running ``talk``) takes no lock and writes nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from securechat.client.oserrors import map_exceptions
from securechat.client.sealing import Sealer, StoreKeys
from securechat.client.store_schema import SCHEMA_VERSION, create_or_migrate
from securechat.errors import StorageError, UsageError
from securechat.files import lock_exclusive

__all__ = [
    "SCHEMA_VERSION",
    "ClientStore",
    "DueReceipt",
    "HistoryEntry",
    "OutboxItem",
    "StoreKeys",
]

E2E_CORE_KEY: Final = "e2e/core"
# Chosen: the event log keeps this many rows (about 150 bytes each sealed: ~15 MB at
# most); a subscriber further behind is told it missed some (the history has them).
MAX_EVENTS: Final = 100_000
EVENTS_PRUNE_EVERY: Final = 1000  # prune the log once per this many rows added
_MOVE_AWAY: Final = (
    "if it is corrupt, move it away (sessions will be re-established, unsent messages in it "
    "are lost)"
)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    frame: bytes
    control: bool  # an end-to-end receipt, not a message the user wrote


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    conv: str
    msg_id: bytes
    status: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DueReceipt:
    seq: int
    peer: bytes  # the peer's identity X25519 key
    kind: int  # envelope.CONTENT_RECEIPT or CONTENT_REJECTED
    msg_id: bytes


class ClientStore:
    """Sealed key-value, outbox, held, receipts and history tables for one identity."""

    def __init__(self, path: Path, keys: StoreKeys, *, read_only: bool = False) -> None:
        self.path = path
        self._seal = Sealer(keys, path)
        self._keys = keys
        self.read_only = read_only
        self._lock_file: IO[str] | None = None
        if read_only:
            self._open_read_only(path)
            return
        busy = UsageError(
            "another securechat process is using this identity (talk, send or receive)",
            hint="run one at a time per identity",
        )
        self._lock_file = lock_exclusive(path.with_suffix(".lock"), busy)
        try:
            with map_exceptions(
                {OSError: StorageError, sqlite3.Error: StorageError},
                f"cannot open the client state {path}",
                hint=_MOVE_AWAY,
            ):
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA secure_delete=ON")
                create_or_migrate(
                    self._db, path, self._seal, self._migrated_outbox, self._history_insert
                )
        except BaseException:
            self.close()
            raise

    def _open_read_only(self, path: Path) -> None:
        """A second reader beside the process that holds the lock (``history`` while
        ``talk`` runs): SQLite's WAL lets readers see the last commit; it takes no lock
        and writes nothing, so it cannot disturb the writer's ratchets."""
        if not path.exists():
            raise StorageError(
                f"no local state for this identity yet ({path} does not exist)",
                hint="send or receive a message first",
            )
        with map_exceptions({sqlite3.Error: StorageError}, f"cannot read the client state {path}"):
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            self._db.close()
            raise StorageError(
                f"the client state {path} has schema version {version}, expected {SCHEMA_VERSION}",
                hint="run a command that opens it for writing first (receive, talk)",
            )

    def close(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def _migrated_outbox(self, msg_id: bytes, frame: bytes) -> None:
        self._outbox_insert(msg_id, frame, control=False)  # schema 2 queued only messages

    def peer_key(self, peer_dh: bytes) -> bytes:
        """The row key of a peer (its identity X25519 key never reaches the file)."""
        return self._seal.peer_key(peer_dh)

    def _open(self, key: bytes, ad: str, blob: bytes) -> bytes:
        return self._seal.open(key, ad, blob)

    # --- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all."""
        with map_exceptions({sqlite3.Error: StorageError}, f"cannot write {self.path}"):
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise StorageError(
                f"cannot write {self.path}: {exc}",
                hint="is the disk full? free some space and run it again: nothing was lost",
            ) from exc

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with map_exceptions({sqlite3.Error: StorageError}, f"client state {self.path}"):
            return self._db.execute(sql, params)

    # --- meta blobs (e2e state, known peers) -------------------------------------------------

    def get_blob(self, name: str) -> bytes | None:
        row = self._exec("SELECT v FROM meta WHERE k = ?", (name,)).fetchone()
        return None if row is None else self._open(self._keys.state, f"meta/{name}", row[0])

    def put_blob(self, name: str, data: bytes) -> None:
        sealed = self._seal.seal(self._keys.state, f"meta/{name}", data)
        self._exec("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (name, sealed))

    def delete_blob(self, name: str) -> None:
        self._exec("DELETE FROM meta WHERE k = ?", (name,))

    def get_json(self, name: str) -> Any:
        blob = self.get_blob(name)
        return None if blob is None else json.loads(blob)

    def put_json(self, name: str, value: Any) -> None:
        self.put_blob(name, json.dumps(value, sort_keys=True).encode())

    # --- end-to-end state rows ------------------------------------------------------------------

    def e2e_rows(self) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
        """(core row or None if there is no state yet, [(peer row key, peer row)])."""
        row = self._exec("SELECT v FROM meta WHERE k = ?", (E2E_CORE_KEY,)).fetchone()
        core = None if row is None else self._open(self._keys.state, E2E_CORE_KEY, row[0])
        peers = []
        for key, sealed in self._exec("SELECT peer, v FROM e2e_peers ORDER BY peer").fetchall():
            key = bytes(key)
            peers.append((key, self._open(self._keys.state, f"e2e/peer/{key.hex()}", sealed)))
        return core, peers

    def put_e2e_rows(
        self, core: bytes | None, peers: Mapping[bytes, bytes], deleted: Iterable[bytes] = ()
    ) -> int:
        """Write the changed rows, delete the evicted (inside the caller's transaction);
        return the bytes written."""
        written = 0
        if core is not None:
            sealed = self._seal.seal(self._keys.state, E2E_CORE_KEY, core)
            self._exec("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (E2E_CORE_KEY, sealed))
            written += len(sealed)
        for peer_dh, row in peers.items():
            key = self.peer_key(peer_dh)
            sealed = self._seal.seal(self._keys.state, f"e2e/peer/{key.hex()}", row)
            self._exec("INSERT OR REPLACE INTO e2e_peers (peer, v) VALUES (?, ?)", (key, sealed))
            written += len(sealed)
        for peer_dh in deleted:
            self._exec("DELETE FROM e2e_peers WHERE peer = ?", (self.peer_key(peer_dh),))
        return written

    # --- outbox ------------------------------------------------------------------------------

    def _outbox_insert(self, msg_id: bytes, frame: bytes, *, control: bool) -> None:
        key = self._seal.msg_key(msg_id)
        sealed = self._seal.seal(self._keys.state, f"outbox/{key.hex()}", frame)
        self._exec(
            "INSERT OR IGNORE INTO outbox (msg, control, frame) VALUES (?, ?, ?)",
            (key, int(control), sealed),
        )

    def outbox_add(self, msg_id: bytes, frame: bytes, *, control: bool = False) -> None:
        self._outbox_insert(msg_id, frame, control=control)

    def outbox_remove(self, msg_id: bytes) -> bool:
        cur = self._exec("DELETE FROM outbox WHERE msg = ?", (self._seal.msg_key(msg_id),))
        return cur.rowcount > 0

    def outbox(self) -> list[OutboxItem]:
        rows = self._exec("SELECT msg, control, frame FROM outbox ORDER BY seq").fetchall()
        return [
            OutboxItem(self._open(self._keys.state, f"outbox/{bytes(k).hex()}", f), bool(c))
            for k, c, f in rows
        ]

    def outbox_count(self) -> int:
        """Messages the user wrote that the relay has not accepted (receipts not counted)."""
        return int(self._exec("SELECT COUNT(*) FROM outbox WHERE control = 0").fetchone()[0])

    # --- held messages (waiting for a peer's prekeys) -----------------------------------------

    def held_add(self, conv: str, msg_id: bytes, record: dict[str, Any]) -> None:
        key = self._seal.msg_key(msg_id)
        sealed = self._seal.seal(
            self._keys.history, f"held/{key.hex()}", json.dumps(record).encode()
        )
        self._exec(
            "INSERT OR IGNORE INTO held (conv, msg, v) VALUES (?, ?, ?)",
            (self._seal.conv_key(conv), key, sealed),
        )

    def held(self) -> list[dict[str, Any]]:
        rows = self._exec("SELECT msg, v FROM held ORDER BY seq").fetchall()
        return [
            json.loads(self._open(self._keys.history, f"held/{bytes(k).hex()}", v)) for k, v in rows
        ]

    def held_remove(self, msg_id: bytes) -> None:
        self._exec("DELETE FROM held WHERE msg = ?", (self._seal.msg_key(msg_id),))

    def held_count(self, conv: str | None = None) -> int:
        if conv is None:
            return int(self._exec("SELECT COUNT(*) FROM held").fetchone()[0])
        row = self._exec("SELECT COUNT(*) FROM held WHERE conv = ?", (self._seal.conv_key(conv),))
        return int(row.fetchone()[0])

    # --- receipts: due to peers, and received for our messages ----------------------------------

    def receipt_due(self, peer_dh: bytes, kind: int, msg_id: bytes) -> None:
        key = self.peer_key(peer_dh)
        value = peer_dh + bytes([kind]) + msg_id
        sealed = self._seal.seal(self._keys.state, f"receipts/{key.hex()}", value)
        self._exec("INSERT INTO receipts_due (peer, v) VALUES (?, ?)", (key, sealed))

    def receipts_due(self, limit: int) -> list[DueReceipt]:
        rows = self._exec(
            "SELECT seq, peer, v FROM receipts_due ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        due = []
        for seq, key, sealed in rows:
            value = self._open(self._keys.state, f"receipts/{bytes(key).hex()}", sealed)
            due.append(DueReceipt(int(seq), value[:32], value[32], value[33:]))
        return due

    def receipts_done(self, seqs: Iterable[int]) -> None:
        for seq in seqs:
            self._exec("DELETE FROM receipts_due WHERE seq = ?", (seq,))

    def delivered_add(self, msg_id: bytes, peer_dh: bytes) -> int:
        """Record ``peer``'s end-to-end receipt for ``msg_id``; return how many peers have."""
        key = self._seal.msg_key(msg_id)
        self._exec(
            "INSERT OR IGNORE INTO delivered (msg, peer) VALUES (?, ?)",
            (key, self.peer_key(peer_dh)),
        )
        row = self._exec("SELECT COUNT(*) FROM delivered WHERE msg = ?", (key,)).fetchone()
        return int(row[0])

    # --- history -----------------------------------------------------------------------------

    def _history_insert(
        self, conv: str, msg_id: bytes, status: int, record: dict[str, Any]
    ) -> bool:
        conv_key, msg_key = self._seal.conv_key(conv), self._seal.msg_key(msg_id)
        record = {**record, "conv": conv, "msg_id": msg_id.hex()}
        sealed = self._seal.seal(
            self._keys.history,
            f"history/{conv_key.hex()}/{msg_key.hex()}",
            json.dumps(record).encode(),
        )
        cur = self._exec(
            "INSERT OR IGNORE INTO history (conv, msg, status, record) VALUES (?, ?, ?, ?)",
            (conv_key, msg_key, status, sealed),
        )
        return cur.rowcount > 0

    def history_add(self, conv: str, msg_id: bytes, status: int, record: dict[str, Any]) -> bool:
        """Insert once per (conversation, message id); False if it was already there.

        A new line is also an event in the log (same transaction as the caller's).
        """
        added = self._history_insert(conv, msg_id, status, record)
        if added:
            self.event_add({"type": "message", "conv": conv, "msg_id": msg_id.hex()})
        return added

    def history_set_status(self, msg_id: bytes, status: int) -> bool:
        """Raise a message's status (never lower it); True if it changed (then logged)."""
        cur = self._exec(
            "UPDATE history SET status = ? WHERE msg = ? AND status < ?",
            (status, self._seal.msg_key(msg_id), status),
        )
        changed = cur.rowcount > 0
        if changed:
            self.event_add({"type": "receipt", "msg_id": msg_id.hex(), "status": status})
        return changed

    def history_entry(self, conv: str, msg_id: bytes) -> HistoryEntry | None:
        """The history line of one message in one conversation, if kept."""
        conv_key, msg_key = self._seal.conv_key(conv), self._seal.msg_key(msg_id)
        row = self._exec(
            "SELECT status, record FROM history WHERE conv = ? AND msg = ?", (conv_key, msg_key)
        ).fetchone()
        return None if row is None else self._entry(conv_key, msg_key, int(row[0]), row[1])

    def history_page(
        self, conv: str, before: int | None, limit: int
    ) -> list[tuple[int, HistoryEntry]]:
        """Up to ``limit`` lines before row ``before`` (None: the newest), oldest first,
        each with its row number (the paging cursor of a daemon's ``history``)."""
        rows = self._exec(
            "SELECT seq, conv, msg, status, record FROM history WHERE conv = ? AND seq < ? "
            "ORDER BY seq DESC LIMIT ?",
            (self._seal.conv_key(conv), before if before is not None else 2**63 - 1, limit),
        ).fetchall()
        return [
            (int(q), self._entry(bytes(c), bytes(m), int(s), r)) for q, c, m, s, r in reversed(rows)
        ]

    # --- the event log ------------------------------------------------------------------------

    def event_add(self, event: dict[str, Any]) -> int:
        """Append one event (inside the caller's transaction, if any); return its cursor.

        The cursor is one more than the newest row's, so it only grows: pruning
        never removes the newest row. The time is added here (this is a shell).
        """
        row = self._exec("SELECT MAX(seq) FROM events").fetchone()
        seq = int(row[0] or 0) + 1
        record = {**event, "at_ms": int(time.time() * 1000)}
        sealed = self._seal.seal(self._keys.history, f"events/{seq}", json.dumps(record).encode())
        self._exec("INSERT INTO events (seq, v) VALUES (?, ?)", (seq, sealed))
        if seq % EVENTS_PRUNE_EVERY == 0:
            self._exec("DELETE FROM events WHERE seq <= ?", (seq - MAX_EVENTS,))
        return seq

    def events_since(self, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Events with a cursor above ``after``, oldest first, at most ``limit``."""
        rows = self._exec(
            "SELECT seq, v FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        ).fetchall()
        return [
            (int(seq), json.loads(self._open(self._keys.history, f"events/{int(seq)}", v)))
            for seq, v in rows
        ]

    def events_bounds(self) -> tuple[int, int]:
        """(oldest cursor kept, newest cursor); (0, 0) for an empty log."""
        row = self._exec("SELECT MIN(seq), MAX(seq) FROM events").fetchone()
        return int(row[0] or 0), int(row[1] or 0)

    def _entry(self, conv_key: bytes, msg_key: bytes, status: int, sealed: bytes) -> HistoryEntry:
        ad = f"history/{conv_key.hex()}/{msg_key.hex()}"
        record = json.loads(self._open(self._keys.history, ad, sealed))
        return HistoryEntry(record["conv"], bytes.fromhex(record["msg_id"]), status, record)

    def history(self, conv: str, limit: int) -> list[HistoryEntry]:
        rows = self._exec(
            "SELECT conv, msg, status, record FROM history WHERE conv = ? "
            "ORDER BY seq DESC LIMIT ?",
            (self._seal.conv_key(conv), limit),
        ).fetchall()
        return [self._entry(bytes(c), bytes(m), int(s), r) for c, m, s, r in reversed(rows)]

    def history_of(self, msg_id: bytes) -> HistoryEntry | None:
        """The history entry of one message (the first, if a group shares the id)."""
        row = self._exec(
            "SELECT conv, msg, status, record FROM history WHERE msg = ? ORDER BY seq LIMIT 1",
            (self._seal.msg_key(msg_id),),
        ).fetchone()
        if row is None:
            return None
        return self._entry(bytes(row[0]), bytes(row[1]), int(row[2]), row[3])
