"""The client's E2E state on disk: one sealed row per peer plus a core row, schema 1 migration.

Driven through the I/O-free :class:`ClientSession` (no relay, no thread): offline, a
message to a peer with a session goes to the outbox, one without is held.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest
from securechat.client.e2e_store import LEGACY_BLOB
from securechat.client.events import Event, MessageEvent
from securechat.client.peers import Conversation
from securechat.client.session import ClientSession
from securechat.client.store import SCHEMA_VERSION, ClientStore, StoreKeys
from securechat.core import keys, wire
from securechat.core.e2e import Content, E2EState
from securechat.errors import StorageError, UsageError


def _identity(name: str) -> keys.Identity:
    return keys.generate_identity(name, hashlib.sha512(f"state test {name}".encode()).digest())


ALICE, BOB, CAROL = _identity("alice"), _identity("bob"), _identity("carol")


def _store(path: Path, ident: keys.Identity = ALICE, *, read_only: bool = False) -> ClientStore:
    return ClientStore(path, StoreKeys.of(ident), read_only=read_only)


def _now() -> int:
    return int(time.time() * 1000)


def _deliver(m: ClientSession, sender: E2EState, text: str) -> list[Event]:
    """A message from ``sender`` to alice, through the session's receive path."""
    content = Content(os.urandom(16), _now(), text)
    payload = sender.encrypt(ALICE.public, content, os.urandom, _now())
    frame = wire.Deliver(content.msg_id, sender.identity.public.dh, 0, payload)
    return m.receive([frame], _now()).events


def _with_sessions(m: ClientSession, *senders: E2EState) -> None:
    """Sessions alice can send on at once (offline, a first message would be held)."""
    for sender in senders:
        _deliver(m, sender, f"hello from {sender.identity.name}")


def _session(store: ClientStore) -> ClientSession:
    """An offline session (no link): sends go to the outbox only."""
    return ClientSession(ALICE, store, os.urandom)


def _send(m: ClientSession, conv: Conversation, text: str) -> bytes:
    return m.send_text(conv, text, _now())[0]


def _reloaded(path: Path, ident: keys.Identity = ALICE) -> bytes:
    store = _store(path, ident)
    try:
        core, peers = store.e2e_rows()
        assert core is not None
        return E2EState.load(ident, core, peers, key_of=store.peer_key).serialize()
    finally:
        store.close()


@pytest.fixture
def db(tmp_path: Path, sc_home: Path) -> Path:
    return tmp_path / "alice.state.db"


def test_a_message_writes_only_its_peers_row(db: Path, tmp_path: Path) -> None:
    store = _store(db)
    m = _session(store)
    _with_sessions(m, E2EState.new(BOB), E2EState.new(CAROL))
    to_bob = Conversation.with_peers(ALICE.public, [BOB.public])
    _send(m, to_bob, "hello bob")
    _send(m, Conversation.with_peers(ALICE.public, [CAROL.public]), "hello carol")
    writes: list[tuple[bytes | None, list[bytes]]] = []
    put = store.put_e2e_rows

    def spy(core: bytes | None, peers: Mapping[bytes, bytes], deleted: Iterable[bytes] = ()) -> int:
        writes.append((core, sorted(peers)))
        return put(core, peers, deleted)

    store.put_e2e_rows = spy  # type: ignore[method-assign]
    _send(m, to_bob, "again")
    assert writes == [(None, [BOB.public.dh])]
    live = m.state.serialize()
    store.close()
    assert _reloaded(db) == live


def test_failed_transaction_writes_nothing_and_the_next_one_catches_up(
    db: Path, tmp_path: Path
) -> None:
    store = _store(db)
    m = _session(store)
    _with_sessions(m, E2EState.new(BOB))
    to_bob = Conversation.with_peers(ALICE.public, [BOB.public])
    _send(m, to_bob, "first")
    on_disk = store.e2e_rows()
    add = store.outbox_add

    def disk_full(*args: object, **kwargs: object) -> None:
        raise StorageError("disk full")

    store.outbox_add = disk_full  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        _send(m, to_bob, "lost")
    assert store.e2e_rows() == on_disk, "a rolled-back message left rows behind"
    store.outbox_add = add  # type: ignore[method-assign]
    m.receive([wire.PrekeyCount(5)], _now())  # a prekey refill: must also write bob's row
    live = m.state.serialize()
    store.close()
    assert _reloaded(db) == live


def test_received_message_survives_a_restart(db: Path, tmp_path: Path) -> None:
    events: list[Event] = []
    store = _store(db)
    m = _session(store)
    bob = E2EState.new(BOB)
    for n in range(3):
        events += _deliver(m, bob, f"hi {n}")
    assert [e.text for e in events if isinstance(e, MessageEvent)] == ["hi 0", "hi 1", "hi 2"]
    store.close()
    store = _store(db)
    m = _session(store)
    events += _deliver(m, bob, "after restart")
    assert isinstance(events[-1], MessageEvent) and events[-1].text == "after restart"
    store.close()


def _raw(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        with conn:
            return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def test_swapped_rows_are_refused(db: Path, tmp_path: Path) -> None:
    store = _store(db)
    m = _session(store)
    _with_sessions(m, E2EState.new(BOB), E2EState.new(CAROL))
    _send(m, Conversation.with_peers(ALICE.public, [BOB.public, CAROL.public]), "to both")
    bob_key, carol_key = store.peer_key(BOB.public.dh), store.peer_key(CAROL.public.dh)
    store.close()
    rows = dict(_raw(db, "SELECT peer, v FROM e2e_peers"))
    bob_row, carol_row = rows[bob_key], rows[carol_key]
    _raw(db, "UPDATE e2e_peers SET v = ? WHERE peer = ?", (carol_row, bob_key))
    with pytest.raises(StorageError, match="corrupt"):
        _reloaded(db)
    _raw(db, "UPDATE e2e_peers SET v = ? WHERE peer = ?", (bob_row, bob_key))
    core = _raw(db, "SELECT v FROM meta WHERE k = 'e2e/core'")[0][0]
    _raw(db, "UPDATE meta SET v = ? WHERE k = 'e2e/core'", (bob_row,))
    with pytest.raises(StorageError, match="corrupt"):
        _reloaded(db)
    _raw(db, "UPDATE meta SET v = ? WHERE k = 'e2e/core'", (core,))
    _reloaded(db)  # back in place: fine again


# --- migration from schema 1 (one sealed blob), built byte for byte like the old client --------

_SCHEMA_1 = """
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
"""


def _seal_v1(name: str, data: bytes) -> bytes:
    nonce = os.urandom(24)
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        data, f"meta/{name}".encode(), nonce, ALICE.storage_key("state")
    )


def _old_state() -> tuple[E2EState, E2EState]:
    """Alice with sessions to bob (both ways) and carol (one way), and bob's end."""
    alice, bob, carol = E2EState.new(ALICE), E2EState.new(BOB), E2EState.new(CAROL)
    rng = os.urandom
    alice.make_prekeys(rng, 0, one_time=5)
    for n in range(3):
        bob.decrypt(ALICE.public.dh, alice.encrypt(BOB.public, Content(rng(16), n, "x"), rng, n), n)
    alice.decrypt(BOB.public.dh, bob.encrypt(ALICE.public, Content(rng(16), 5, "y"), rng, 5), 5)
    carol.decrypt(ALICE.public.dh, alice.encrypt(CAROL.public, Content(rng(16), 6, "z"), rng, 6), 6)
    return alice, bob


def _write_schema_1(db: Path, state: bytes) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(_SCHEMA_1)
    with conn:
        conn.execute("INSERT INTO meta VALUES ('e2e_state', ?)", (_seal_v1("e2e_state", state),))
        peers = {"bob": BOB.public.to_line()}
        known = json.dumps(peers, sort_keys=True).encode()
        sealed = _seal_v1("known_peers", known)
        conn.execute("INSERT INTO meta VALUES ('known_peers', ?)", (sealed,))
    conn.close()


def test_schema_1_blob_migrates_to_rows(db: Path, tmp_path: Path) -> None:
    alice, bob = _old_state()
    _write_schema_1(db, alice.serialize())
    store = _store(db)
    m = _session(store)
    assert m.state.serialize() == alice.serialize()
    assert store.get_blob(LEGACY_BLOB) is None
    assert m.peers.identities() == [BOB.public]  # the other meta blobs are untouched
    # the migrated session still works both ways
    _send(m, Conversation.with_peers(ALICE.public, [BOB.public]), "after migration")
    events = _deliver(m, bob, "welcome")
    assert [e.text for e in events if isinstance(e, MessageEvent)] == ["welcome"]
    live = m.state.serialize()
    peer_keys = {store.peer_key(BOB.public.dh), store.peer_key(CAROL.public.dh)}
    store.close()
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert {bytes(k) for (k,) in _raw(db, "SELECT peer FROM e2e_peers")} == peer_keys
    assert _reloaded(db) == live


def test_migration_is_all_or_nothing(db: Path, tmp_path: Path) -> None:
    alice, _ = _old_state()
    _write_schema_1(db, alice.serialize())
    store = _store(db)
    delete = store.delete_blob

    def crash(name: str) -> None:
        raise StorageError("killed")

    store.delete_blob = crash  # type: ignore[method-assign]
    with pytest.raises(StorageError):
        _session(store)
    assert store.e2e_rows() == (None, []), "half a migration was committed"
    store.delete_blob = delete  # type: ignore[method-assign]
    assert _session(store).state.serialize() == alice.serialize()
    store.close()


def test_newer_schema_is_refused(db: Path) -> None:
    _store(db).close()
    _raw(db, f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StorageError, match="newer securechat"):
        _store(db)
    _raw(db, f"PRAGMA user_version={SCHEMA_VERSION}")
    _store(db).close()  # the lock was released by the refusal


def test_peer_rows_without_a_core_are_refused(db: Path, tmp_path: Path) -> None:
    store = _store(db)
    _with_sessions(_session(store), E2EState.new(BOB))
    store.close()
    _raw(db, "DELETE FROM meta WHERE k = 'e2e/core'")
    store = _store(db)
    with pytest.raises(StorageError, match="no end-to-end core"):
        _session(store)
    store.close()


def test_a_read_only_store_reads_history_while_the_writer_holds_the_lock(
    db: Path, tmp_path: Path
) -> None:
    writer = _store(db)
    try:
        m = _session(writer)
        to_bob = Conversation.with_peers(ALICE.public, [BOB.public])
        _send(m, to_bob, "written by the locked writer")
        with pytest.raises(Exception, match="another securechat process"):
            _store(db)  # a second writer is refused ...
        reader = _store(db, read_only=True)
        try:  # ... but a reader sees the last commit and cannot write
            texts = [e.record["text"] for e in reader.history(to_bob.conv_id, 10)]
            assert texts == ["written by the locked writer"]
            with pytest.raises(StorageError), reader.transaction():
                reader.put_json("x", 1)
        finally:
            reader.close()
    finally:
        writer.close()


def test_a_read_only_store_of_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no local state"):
        _store(tmp_path / "none.state.db", read_only=True)


# --- schema 3: nothing in the file names a peer, a message or a time (issue 11.14) ---------


def _file_bytes(db: Path) -> bytes:
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*") if p.is_file())


def test_the_file_holds_no_raw_keys_ids_conversations_or_times(db: Path, tmp_path: Path) -> None:
    store = _store(db)
    m = _session(store)
    bob = E2EState.new(BOB)
    _with_sessions(m, bob, E2EState.new(CAROL))
    to_bob = Conversation.with_peers(ALICE.public, [BOB.public])
    sent = _send(m, to_bob, "a secret")
    received = m.history(to_bob.conv_id, 10)
    store.close()
    raw = _file_bytes(db)
    secrets = [BOB.public.dh, CAROL.public.dh, sent, to_bob.conv_id.encode()]
    secrets += [bytes.fromhex(str(e["msg_id"])) for e in received]
    secrets += [int(str(e["sent_ms"])).to_bytes(8, "big") for e in received]
    secrets += [b"a secret", b"hello from bob"]
    for secret in secrets:
        assert secret not in raw, secret
    assert len(received) == 2  # and yet everything reads back
    store = _store(db)
    assert [e.record["text"] for e in store.history(to_bob.conv_id, 10)] == [
        "hello from bob",
        "a secret",
    ]
    assert store.history_of(sent) is not None
    store.close()


_SCHEMA_2 = _SCHEMA_1 + "CREATE TABLE e2e_peers (peer BLOB PRIMARY KEY, v BLOB NOT NULL);"


def _seal(key: bytes, ad: str, data: bytes) -> bytes:
    nonce = os.urandom(24)
    return nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        data, ad.encode(), nonce, key
    )


def test_schema_2_migrates_to_macs_and_keeps_everything(db: Path, tmp_path: Path) -> None:
    alice, _ = _old_state()
    changes = alice.take_changes()
    state_key, history_key = ALICE.storage_key("state"), ALICE.storage_key("history")
    conv = Conversation.with_peers(ALICE.public, [BOB.public]).conv_id
    msg_id, frame = os.urandom(16), b"an outbox frame, sealed end to end"
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_2)
    with conn:
        assert changes.core is not None
        conn.execute(
            "INSERT INTO meta VALUES ('e2e/core', ?)", (_seal(state_key, "e2e/core", changes.core),)
        )
        for peer, row in changes.peers.items():
            conn.execute(
                "INSERT INTO e2e_peers VALUES (?, ?)",
                (peer, _seal(state_key, f"e2e/peer/{peer.hex()}", row)),
            )
        conn.execute(
            "INSERT INTO outbox (msg_id, conv, frame, created_ms) VALUES (?, ?, ?, ?)",
            (msg_id, conv, _seal(state_key, f"outbox/{msg_id.hex()}", frame), 5),
        )
        record = json.dumps({"sender": "alice", "sent_ms": 5, "text": "old", "out": True})
        conn.execute(
            "INSERT INTO history (conv, msg_id, status, record) VALUES (?, ?, 1, ?)",
            (conv, msg_id, _seal(history_key, f"history/{conv}/{msg_id.hex()}", record.encode())),
        )
        conn.execute("PRAGMA user_version=2")
    conn.close()
    store = _store(db)
    m = _session(store)
    assert m.state.serialize() == alice.serialize()
    assert [item.frame for item in store.outbox()] == [frame]
    assert store.outbox_remove(msg_id)
    entries = store.history(conv, 10)
    assert [(e.msg_id, e.status, e.record["text"]) for e in entries] == [(msg_id, 1, "old")]
    store.close()
    assert _raw(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    raw = _file_bytes(db)
    assert BOB.public.dh not in raw and CAROL.public.dh not in raw and msg_id not in raw
    assert conv.encode() not in raw


def test_a_group_message_too_big_for_one_frame_is_refused_before_sealing(
    db: Path, tmp_path: Path
) -> None:
    """63 copies of the largest padding bucket exceed one SendMulti frame: say how much fits."""
    store = _store(db)
    m = _session(store)
    members = [keys.generate_identity(f"m{i}", os.urandom(64)).public for i in range(63)]
    group = Conversation.with_peers(ALICE.public, members)
    with pytest.raises(UsageError, match=r"at most \d+ bytes of text fit") as refused:
        _send(m, group, "x" * 16_000)
    most = int(str(refused.value).split("at most ")[1].split()[0])
    assert 10_000 < most < 16_000
    _send(m, group, "x" * most)  # exactly the limit is accepted (held: offline)
    assert store.held_count() == 1
    store.close()
