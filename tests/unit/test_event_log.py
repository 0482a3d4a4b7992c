"""The client store's event log (schema 4): what a daemon's subscribers resume from."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from securechat.client import store as store_mod
from securechat.client.store import SCHEMA_VERSION, ClientStore, StoreKeys
from securechat.client.store_schema import TABLES
from securechat.core import keys
from securechat.errors import StorageError


def _store(path: Path) -> ClientStore:
    identity = keys.generate_identity("alice", os.urandom(keys.SEED_SIZE))
    return ClientStore(path, StoreKeys.of(identity))


@pytest.fixture
def store(tmp_path: Path) -> ClientStore:
    s = _store(tmp_path / "alice.state.db")
    yield s
    s.close()


def _add(store: ClientStore, conv: str, msg_id: bytes, text: str = "secret text") -> bool:
    with store.transaction():
        return store.history_add(conv, msg_id, 0, {"text": text, "sent_ms": 1})


def test_history_lines_and_raised_marks_are_logged_in_order(store: ClientStore) -> None:
    assert store.events_bounds() == (0, 0)
    assert _add(store, "dm-1", b"a" * 16)
    assert not _add(store, "dm-1", b"a" * 16)  # a duplicate is not an event
    with store.transaction():
        assert store.history_set_status(b"a" * 16, 1)
        assert not store.history_set_status(b"a" * 16, 1)  # no change: no event
        assert not store.history_set_status(b"a" * 16, 0)  # never lowered
    events = store.events_since(0, 10)
    assert [seq for seq, _ in events] == [1, 2]
    assert events[0][1]["type"] == "message" and events[0][1]["conv"] == "dm-1"
    assert events[1][1] == {**events[1][1], "type": "receipt", "status": 1}
    assert store.events_since(1, 10) == events[1:]
    assert store.events_bounds() == (1, 2)


def test_an_event_rolls_back_with_its_history_line(store: ClientStore) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.history_add("dm-1", b"b" * 16, 0, {"text": "x"})
        raise RuntimeError("crash before commit")
    assert store.events_bounds() == (0, 0)


def test_rows_are_sealed_and_bound_to_their_cursor(store: ClientStore, tmp_path: Path) -> None:
    _add(store, "dm-secret-conversation", bytes(range(16)), "the text")
    _add(store, "dm-2", b"c" * 16)
    raw = sqlite3.connect(tmp_path / "alice.state.db")
    rows = raw.execute("SELECT seq, v FROM events").fetchall()
    blob = b"".join(bytes(v) for _, v in rows)
    for leak in (b"dm-secret", bytes(range(16)).hex().encode(), b"the text", b"message"):
        assert leak not in blob
    raw.execute("UPDATE events SET v = (SELECT v FROM events WHERE seq = 2) WHERE seq = 1")
    raw.commit()
    raw.close()
    with pytest.raises(StorageError):
        store.events_since(0, 10)  # a row moved to another cursor does not open


def test_the_log_is_bounded_and_its_cursor_only_grows(
    store: ClientStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "MAX_EVENTS", 5)
    monkeypatch.setattr(store_mod, "EVENTS_PRUNE_EVERY", 4)
    for i in range(12):
        _add(store, "dm-1", i.to_bytes(16, "big"))
    oldest, newest = store.events_bounds()
    assert newest == 12 and newest - oldest + 1 <= 5 + 4
    _add(store, "dm-1", (99).to_bytes(16, "big"))
    assert store.events_bounds()[1] == 13


def test_schema_3_gains_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "alice.state.db"
    db = sqlite3.connect(path)
    schema_3 = TABLES.replace(
        "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, v BLOB NOT NULL);", ""
    )
    db.executescript(f"BEGIN; {schema_3} PRAGMA user_version=3; COMMIT;")
    db.close()
    store = _store(path)
    try:
        assert store.events_bounds() == (0, 0)
        _add(store, "dm-1", b"d" * 16)
        assert store.events_bounds() == (1, 1)
    finally:
        store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    db.close()
