"""The client's local state, encrypted at rest (shell).

One SQLite database per identity under the key directory,
``<home>/<name>.state.db``, mode 0600, holding:

* the end-to-end state as rows: one core row (prekeys, accepted ephemeral
  keys, counters; ``meta`` key ``e2e/core``) and one row per peer (sessions,
  seen message ids; table ``e2e_peers``), so a message rewrites only the row of
  the peer it concerns. Schema 1 (no ``user_version``) held it as one blob,
  ``meta/e2e_state``; the client migrates that on open (see ``Messenger``);
* the outbox: every message the user sent that the relay has not yet
  accepted, as the exact sealed frame, so a restart resends the same bytes
  (re-encrypting would advance the ratchet and could reuse nothing, but
  resending the same frame keeps the relay's idempotency by message id);
* the history, one sealed record per message, per conversation;
* the known peers (trust on first use), one sealed blob.

Every value is sealed with XChaCha20-Poly1305 under a key derived from the
identity (``Identity.storage_key``), with the table and row key as associated
data so rows cannot be swapped (``e2e/peer/<hex key>``, ``e2e/core``).
State changes that must go together (ratchet advanced + frame queued +
history written) are one SQLite transaction: after a crash either all of them
happened or none did.

An exclusive lock on ``<name>.state.lock`` keeps two processes from driving
the same ratchets (which would desynchronise them).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import nacl.bindings
import nacl.exceptions

from securechat.errors import StorageError, UsageError

SCHEMA_VERSION: Final = 2  # PRAGMA user_version; 0 = a new file or a schema 1 file
E2E_CORE_KEY: Final = "e2e/core"
_NONCE: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE,
    conv TEXT NOT NULL,
    frame BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conv TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    status INTEGER NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (conv, msg_id)
);
CREATE TABLE IF NOT EXISTS e2e_peers (peer BLOB PRIMARY KEY, v BLOB NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    msg_id: bytes
    conv: str
    frame: bytes
    created_ms: int


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    conv: str
    msg_id: bytes
    status: int
    record: dict[str, Any]


class ClientStore:
    """Sealed key-value, outbox and history tables for one identity."""

    def __init__(
        self, path: Path, state_key: bytes, history_key: bytes, *, read_only: bool = False
    ) -> None:
        self.path = path
        self._state_key = state_key
        self._history_key = history_key
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
            self._create_or_check_schema()
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
                f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
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

    def _create_or_check_schema(self) -> None:
        """Schema 1 -> 2 only adds a table: the E2E blob moves when the identity is known."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        elif version != SCHEMA_VERSION:
            self._db.close()
            self._lock_file.close()
            raise StorageError(
                f"the client state {self.path} has schema version {version}, expected "
                f"{SCHEMA_VERSION} (written by a newer securechat? run that version)"
            )

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

    # --- sealing ---------------------------------------------------------------------------

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
                f"{self.path} is corrupt or belongs to another identity ({ad}); move it away "
                "to start fresh"
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
        return None if row is None else self._open(self._state_key, f"meta/{name}", row[0])

    def put_blob(self, name: str, data: bytes) -> None:
        sealed = self._seal(self._state_key, f"meta/{name}", data)
        self._exec("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (name, sealed))

    def delete_blob(self, name: str) -> None:
        self._exec("DELETE FROM meta WHERE k = ?", (name,))

    def get_json(self, name: str) -> Any:
        blob = self.get_blob(name)
        return None if blob is None else json.loads(blob)

    def put_json(self, name: str, value: Any) -> None:
        self.put_blob(name, json.dumps(value, sort_keys=True).encode())

    # --- end-to-end state rows ------------------------------------------------------------------

    def e2e_rows(self) -> tuple[bytes | None, dict[bytes, bytes]]:
        """(core row or None if there is no state yet, {peer key: peer row})."""
        row = self._exec("SELECT v FROM meta WHERE k = ?", (E2E_CORE_KEY,)).fetchone()
        core = None if row is None else self._open(self._state_key, E2E_CORE_KEY, row[0])
        peers = {}
        for key, sealed in self._exec("SELECT peer, v FROM e2e_peers ORDER BY peer").fetchall():
            key = bytes(key)
            peers[key] = self._open(self._state_key, f"e2e/peer/{key.hex()}", sealed)
        return core, peers

    def put_e2e_rows(self, core: bytes | None, peers: Mapping[bytes, bytes]) -> int:
        """Write the changed rows (inside the caller's transaction); return bytes written."""
        written = 0
        if core is not None:
            sealed = self._seal(self._state_key, E2E_CORE_KEY, core)
            self._exec("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (E2E_CORE_KEY, sealed))
            written += len(sealed)
        for key, row in peers.items():
            sealed = self._seal(self._state_key, f"e2e/peer/{key.hex()}", row)
            self._exec("INSERT OR REPLACE INTO e2e_peers (peer, v) VALUES (?, ?)", (key, sealed))
            written += len(sealed)
        return written

    # --- outbox ------------------------------------------------------------------------------

    def outbox_add(self, item: OutboxItem) -> None:
        sealed = self._seal(self._state_key, f"outbox/{item.msg_id.hex()}", item.frame)
        self._exec(
            "INSERT OR IGNORE INTO outbox (msg_id, conv, frame, created_ms) VALUES (?, ?, ?, ?)",
            (item.msg_id, item.conv, sealed, item.created_ms),
        )

    def outbox_remove(self, msg_id: bytes) -> bool:
        return self._exec("DELETE FROM outbox WHERE msg_id = ?", (msg_id,)).rowcount > 0

    def outbox(self) -> list[OutboxItem]:
        rows = self._exec("SELECT msg_id, conv, frame, created_ms FROM outbox ORDER BY seq")
        return [
            OutboxItem(bytes(m), c, self._open(self._state_key, f"outbox/{bytes(m).hex()}", f), t)
            for m, c, f, t in rows.fetchall()
        ]

    def outbox_count(self) -> int:
        return int(self._exec("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # --- history -----------------------------------------------------------------------------

    def history_add(self, conv: str, msg_id: bytes, status: int, record: dict[str, Any]) -> bool:
        """Insert once per (conversation, message id); False if it was already there."""
        sealed = self._seal(
            self._history_key, f"history/{conv}/{msg_id.hex()}", json.dumps(record).encode()
        )
        cur = self._exec(
            "INSERT OR IGNORE INTO history (conv, msg_id, status, record) VALUES (?, ?, ?, ?)",
            (conv, msg_id, status, sealed),
        )
        return cur.rowcount > 0

    def history_set_status(self, msg_id: bytes, status: int) -> None:
        self._exec(
            "UPDATE history SET status = ? WHERE msg_id = ? AND status < ?",
            (status, msg_id, status),
        )

    def history(self, conv: str, limit: int) -> list[HistoryEntry]:
        rows = self._exec(
            "SELECT conv, msg_id, status, record FROM history WHERE conv = ? "
            "ORDER BY seq DESC LIMIT ?",
            (conv, limit),
        ).fetchall()
        entries = []
        for c, m, s, r in reversed(rows):
            record = json.loads(self._open(self._history_key, f"history/{c}/{bytes(m).hex()}", r))
            entries.append(HistoryEntry(c, bytes(m), int(s), record))
        return entries
