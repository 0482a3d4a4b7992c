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
  sealed end to end only once they arrive, see ``Messenger``);
* receipts due: ids of messages we stored, to be acknowledged end to end;
* who has acknowledged each message we sent (``delivered``);
* the history, one sealed record per message, per conversation;
* the known peers (trust on first use), one sealed blob.

What a reader of the file learns (schema 3): row counts and sizes, the order
of rows, a delivery status per history row, and which rows belong to the same
conversation or peer. It does not learn who the peers are, which message ids
the relay saw, or when: every row key is a MAC under a key derived from the
identity (``index``), not the raw identity key, conversation id or message id,
and every value, times included, is sealed with XChaCha20-Poly1305 under the
``state`` or ``history`` key with the table and row key as associated data, so
rows cannot be swapped. Deleted rows are overwritten (``secure_delete``).
Schema 2 (raw keys and ids in clear) and schema 1 are migrated on open, in
one transaction.

An exclusive lock on ``<name>.state.lock`` keeps two processes from driving
the same ratchets (which would desynchronise them); a read-only store (for
``history`` beside a running ``talk``) takes no lock and writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nacl.bindings
import nacl.exceptions
from securechat.core.keys import Identity
from securechat.errors import StorageError, UsageError

SCHEMA_VERSION: Final = 3  # PRAGMA user_version; 0 = a new file or a schema 1 file
E2E_CORE_KEY: Final = "e2e/core"
MAC_SIZE: Final = 16
_NONCE: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES

_TABLES: Final = """
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
"""

# Schema 2 tables (schema 1 = the same without e2e_peers), read only by the migration.
_SCHEMA_2_MISSING: Final = (
    "CREATE TABLE IF NOT EXISTS e2e_peers (peer BLOB PRIMARY KEY, v BLOB NOT NULL)"
)


@dataclass(frozen=True, slots=True)
class StoreKeys:
    """The three keys of one identity's store, derived from its private key."""

    state: bytes
    history: bytes
    index: bytes  # MACs row keys, so raw ids never reach the file

    @classmethod
    def of(cls, identity: Identity) -> StoreKeys:
        return cls(
            identity.storage_key("state"),
            identity.storage_key("history"),
            identity.storage_key("index"),
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
        self._keys = keys
        self.read_only = read_only
        if read_only:
            self._open_read_only(path)
            return
        self._lock_file: Any = self._acquire_lock(path.with_suffix(".lock"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA secure_delete=ON")
            self._create_or_migrate()
        except (OSError, sqlite3.Error) as exc:
            self._lock_file.close()
            raise StorageError(
                f"cannot open the client state {path}: {exc}; if it is corrupt, move it away "
                "(sessions will be re-established, unsent messages in it are lost)"
            ) from exc

    def _open_read_only(self, path: Path) -> None:
        """A second reader beside the process that holds the lock (``history`` while
        ``talk`` runs): SQLite's WAL lets readers see the last commit; it takes no lock
        and writes nothing, so it cannot disturb the writer's ratchets."""
        self._lock_file = None
        if not path.exists():
            raise StorageError(f"no local state for this identity yet ({path} does not exist)")
        try:
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
            )
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StorageError(f"cannot read the client state {path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            self._db.close()
            raise StorageError(
                f"the client state {path} has schema version {version}, expected "
                f"{SCHEMA_VERSION}; run a command that opens it for writing first"
            )

    def _create_or_migrate(self) -> None:
        db = self._db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            has_meta = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if not has_meta:  # a new file
                db.executescript(
                    f"BEGIN IMMEDIATE; {_TABLES} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
                return
            db.execute(_SCHEMA_2_MISSING)  # schema 1: the E2E blob moves later (Messenger)
            version = 2
        if version == 2:
            self._migrate_2_to_3()
        elif version != SCHEMA_VERSION:
            self._db.close()
            self._lock_file.close()
            raise StorageError(
                f"the client state {self.path} has schema version {version}, expected "
                f"{SCHEMA_VERSION} (written by a newer securechat? run that version)"
            )

    def _migrate_2_to_3(self) -> None:
        """Re-key every row by its MAC and re-seal it, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            peers = db.execute("SELECT peer, v FROM e2e_peers").fetchall()
            outbox = db.execute("SELECT msg_id, frame FROM outbox ORDER BY seq").fetchall()
            history = db.execute(
                "SELECT conv, msg_id, status, record FROM history ORDER BY seq"
            ).fetchall()
            for table in ("e2e_peers", "outbox", "history"):
                db.execute(f"DROP TABLE {table}")
            for statement in _TABLES.split(";"):  # not executescript: it would COMMIT
                if statement.strip():
                    db.execute(statement)
            for key, sealed in peers:
                row = self._open(self._keys.state, f"e2e/peer/{bytes(key).hex()}", sealed)
                mac = self.peer_key(bytes(key))
                sealed = self._seal(self._keys.state, f"e2e/peer/{mac.hex()}", row)
                db.execute("INSERT INTO e2e_peers (peer, v) VALUES (?, ?)", (mac, sealed))
            for msg_id, frame in outbox:
                plain = self._open(self._keys.state, f"outbox/{bytes(msg_id).hex()}", frame)
                self._outbox_insert(bytes(msg_id), plain, control=False)
            for conv, msg_id, status, record in history:
                ad = f"history/{conv}/{bytes(msg_id).hex()}"
                fields = json.loads(self._open(self._keys.history, ad, record))
                self._history_insert(conv, bytes(msg_id), int(status), fields)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        with contextlib.suppress(sqlite3.Error):  # old pages out of the WAL file too
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @staticmethod
    def _acquire_lock(path: Path) -> Any:
        try:
            handle = open(path, "a+")  # noqa: SIM115 (held for the store's lifetime)
            os.chmod(path, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            raise UsageError(
                "another securechat process is using this identity (talk, send or receive); "
                "run one at a time per identity"
            ) from exc
        return handle

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    # --- sealing and row keys ----------------------------------------------------------------

    def _mac(self, label: bytes, value: bytes) -> bytes:
        digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
            label + b"\x00" + value, digest_size=MAC_SIZE, key=self._keys.index
        )
        return bytes(digest)

    def peer_key(self, peer_dh: bytes) -> bytes:
        """The row key of a peer (its identity X25519 key never reaches the file)."""
        return self._mac(b"peer", peer_dh)

    def _msg_key(self, msg_id: bytes) -> bytes:
        return self._mac(b"msg", msg_id)

    def _conv_key(self, conv: str) -> bytes:
        return self._mac(b"conv", conv.encode())

    @staticmethod
    def _seal(key: bytes, ad: str, data: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            data, ad.encode(), nonce, key
        )

    def _open(self, key: bytes, ad: str, blob: bytes) -> bytes:
        try:
            return bytes(
                nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    blob[_NONCE:], ad.encode(), blob[:_NONCE], key
                )
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise StorageError(
                f"{self.path} is corrupt or belongs to another identity ({ad.split('/')[0]}); "
                "move it away to start fresh"
            ) from exc

    # --- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write {self.path}: {exc}") from exc
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
            raise StorageError(f"cannot write {self.path}: {exc} (disk full?)") from exc

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, params)
        except sqlite3.Error as exc:
            raise StorageError(f"client state {self.path}: {exc}") from exc

    # --- meta blobs (e2e state, known peers) -------------------------------------------------

    def get_blob(self, name: str) -> bytes | None:
        row = self._exec("SELECT v FROM meta WHERE k = ?", (name,)).fetchone()
        return None if row is None else self._open(self._keys.state, f"meta/{name}", row[0])

    def put_blob(self, name: str, data: bytes) -> None:
        sealed = self._seal(self._keys.state, f"meta/{name}", data)
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
            sealed = self._seal(self._keys.state, E2E_CORE_KEY, core)
            self._exec("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (E2E_CORE_KEY, sealed))
            written += len(sealed)
        for peer_dh, row in peers.items():
            key = self.peer_key(peer_dh)
            sealed = self._seal(self._keys.state, f"e2e/peer/{key.hex()}", row)
            self._exec("INSERT OR REPLACE INTO e2e_peers (peer, v) VALUES (?, ?)", (key, sealed))
            written += len(sealed)
        for peer_dh in deleted:
            self._exec("DELETE FROM e2e_peers WHERE peer = ?", (self.peer_key(peer_dh),))
        return written

    # --- outbox ------------------------------------------------------------------------------

    def _outbox_insert(self, msg_id: bytes, frame: bytes, *, control: bool) -> None:
        key = self._msg_key(msg_id)
        sealed = self._seal(self._keys.state, f"outbox/{key.hex()}", frame)
        self._exec(
            "INSERT OR IGNORE INTO outbox (msg, control, frame) VALUES (?, ?, ?)",
            (key, int(control), sealed),
        )

    def outbox_add(self, msg_id: bytes, frame: bytes, *, control: bool = False) -> None:
        self._outbox_insert(msg_id, frame, control=control)

    def outbox_remove(self, msg_id: bytes) -> bool:
        cur = self._exec("DELETE FROM outbox WHERE msg = ?", (self._msg_key(msg_id),))
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
        key = self._msg_key(msg_id)
        sealed = self._seal(self._keys.history, f"held/{key.hex()}", json.dumps(record).encode())
        self._exec(
            "INSERT OR IGNORE INTO held (conv, msg, v) VALUES (?, ?, ?)",
            (self._conv_key(conv), key, sealed),
        )

    def held(self) -> list[dict[str, Any]]:
        rows = self._exec("SELECT msg, v FROM held ORDER BY seq").fetchall()
        return [
            json.loads(self._open(self._keys.history, f"held/{bytes(k).hex()}", v)) for k, v in rows
        ]

    def held_remove(self, msg_id: bytes) -> None:
        self._exec("DELETE FROM held WHERE msg = ?", (self._msg_key(msg_id),))

    def held_count(self, conv: str | None = None) -> int:
        if conv is None:
            return int(self._exec("SELECT COUNT(*) FROM held").fetchone()[0])
        row = self._exec("SELECT COUNT(*) FROM held WHERE conv = ?", (self._conv_key(conv),))
        return int(row.fetchone()[0])

    # --- receipts: due to peers, and received for our messages ----------------------------------

    def receipt_due(self, peer_dh: bytes, kind: int, msg_id: bytes) -> None:
        key = self.peer_key(peer_dh)
        value = peer_dh + bytes([kind]) + msg_id
        sealed = self._seal(self._keys.state, f"receipts/{key.hex()}", value)
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
        key = self._msg_key(msg_id)
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
        conv_key, msg_key = self._conv_key(conv), self._msg_key(msg_id)
        record = {**record, "conv": conv, "msg_id": msg_id.hex()}
        sealed = self._seal(
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
        """Insert once per (conversation, message id); False if it was already there."""
        return self._history_insert(conv, msg_id, status, record)

    def history_set_status(self, msg_id: bytes, status: int) -> bool:
        """Raise a message's status (never lower it); True if it changed."""
        cur = self._exec(
            "UPDATE history SET status = ? WHERE msg = ? AND status < ?",
            (status, self._msg_key(msg_id), status),
        )
        return cur.rowcount > 0

    def _entry(self, conv_key: bytes, msg_key: bytes, status: int, sealed: bytes) -> HistoryEntry:
        ad = f"history/{conv_key.hex()}/{msg_key.hex()}"
        record = json.loads(self._open(self._keys.history, ad, sealed))
        return HistoryEntry(record["conv"], bytes.fromhex(record["msg_id"]), status, record)

    def history(self, conv: str, limit: int) -> list[HistoryEntry]:
        rows = self._exec(
            "SELECT conv, msg, status, record FROM history WHERE conv = ? "
            "ORDER BY seq DESC LIMIT ?",
            (self._conv_key(conv), limit),
        ).fetchall()
        return [self._entry(bytes(c), bytes(m), int(s), r) for c, m, s, r in reversed(rows)]

    def history_of(self, msg_id: bytes) -> HistoryEntry | None:
        """The history entry of one message (the first, if a group shares the id)."""
        row = self._exec(
            "SELECT conv, msg, status, record FROM history WHERE msg = ? ORDER BY seq LIMIT 1",
            (self._msg_key(msg_id),),
        ).fetchone()
        if row is None:
            return None
        return self._entry(bytes(row[0]), bytes(row[1]), int(row[2]), row[3])
