"""The relay's mailbox store: schema 2 (party ids), migration from 1, rollback, purge.

A model (plain dicts) runs beside the store under random operation sequences,
including failed batches that roll back, so the party-id cache can never hand
one mailbox's frames to another.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securechat.core import wire
from securechat.errors import StorageError
from securechat.relay import schema
from securechat.relay import store as store_mod
from securechat.relay.limits import RelayConfig
from securechat.relay.mailboxes import Bundle, Delete, Insert, InsertResult, Published, Request
from securechat.relay.store_thread import StoreThread

TTL_MS = 10_000

# The version 1 schema exactly as relays before schema 2 created it (the migration input).
V1_SCHEMA = """
CREATE TABLE frames(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox BLOB NOT NULL,
    sender BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    payload BLOB NOT NULL,
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
"""


def make_store(tmp_path: Path, **kw: Any) -> store_mod.MailboxStore:
    return store_mod.open_store(tmp_path, RelayConfig(data_dir=tmp_path, **kw))


def key(tag: str) -> bytes:
    return tag.encode().ljust(32, b".")


def mid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def write_v1(path: Path, rows: list[tuple[bytes, bytes, bytes, int, bytes]], drop: int) -> int:
    """A version 1 store holding ``rows``, with its last ``drop`` rows deleted; the old counter."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(f"BEGIN; {V1_SCHEMA} PRAGMA user_version=1; COMMIT;")
    for mailbox, sender, msg_id, ts, payload in rows:
        db.execute(
            "INSERT INTO frames(mailbox, sender, msg_id, ts, expires, payload)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (mailbox, sender, msg_id, ts, ts + TTL_MS, payload),
        )
    db.execute(
        "DELETE FROM frames WHERE seq IN (SELECT seq FROM frames ORDER BY seq DESC LIMIT ?)",
        (drop,),
    )
    db.execute("INSERT INTO signed_prekeys VALUES (?, ?)", (key("i"), b"spk"))
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name='frames'").fetchone()
    last = int(row[0]) if row else 0
    db.close()
    return last


def test_migrates_v1_keeping_rows_seqs_and_counter(tmp_path: Path) -> None:
    a, b, s1, s2 = key("a"), key("b"), key("s1"), key("s2")
    rows = [
        (a if i % 3 else b, s1 if i % 2 else s2, mid(i), 1000 + i, bytes([i]) * (i + 1))
        for i in range(12)
    ]
    last = write_v1(tmp_path / store_mod.DB_FILE, rows, drop=2)
    s = make_store(tmp_path, ttl=TTL_MS / 1000)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    kept = rows[:-2]
    for mailbox in (a, b):
        got = s.fetch(mailbox, 0, 100, now_ms=1000)
        want = [(i + 1, r[1], r[2], r[3], r[4]) for i, r in enumerate(kept) if r[0] == mailbox]
        assert [(seq, bytes(sn), bytes(m), ts, bytes(p)) for seq, sn, m, ts, p in got] == want
        assert s.usage[mailbox] == [len(want), sum(len(w[4]) for w in want)]
    assert s.insert(a, s1, kept[1][2], 5, b"x", force=False) == InsertResult.DUPLICATE
    assert s.insert(a, s1, mid(99), 5, b"x", force=False) == InsertResult.INSERTED
    new_seq = s.fetch(a, 0, 100, now_ms=0)[-1][0]
    assert new_seq > last  # the deleted tail's seqs are not handed out again
    assert s.delete(b, kept[0][1], kept[0][2])
    assert s.take_prekeys(key("i")) == (b"spk", None, 0)  # other tables untouched
    # mailboxes holding frames, and identities with prekeys, count as known (full ttl)
    assert s.is_known(a) and s.is_known(b)
    assert s.is_known(wire.mailbox_address(key("i")))
    assert not s.is_known(key("stranger"))
    s.close()
    again = make_store(tmp_path)  # a migrated store opens as the current version unchanged
    assert again.fetch(a, new_seq - 1, 10, now_ms=0)[0][2] == mid(99)
    again.close()


def test_migration_of_empty_v1_store(tmp_path: Path) -> None:
    write_v1(tmp_path / store_mod.DB_FILE, [], drop=0)
    s = make_store(tmp_path)
    assert s.insert(key("a"), key("s"), mid(1), 0, b"p", force=False) == InsertResult.INSERTED
    assert [r[2] for r in s.fetch(key("a"), 0, 10, 0)] == [mid(1)]
    s.close()


@pytest.mark.parametrize("version", [schema.SCHEMA_VERSION + 1, 99])
def test_newer_schema_is_refused_unchanged(tmp_path: Path, version: int) -> None:
    s = make_store(tmp_path)
    s.insert(key("a"), key("s"), mid(1), 0, b"p", force=False)
    s.db.execute(f"PRAGMA user_version={version}")
    s.close()
    with pytest.raises(
        StorageError, match=f"schema version {version}, expected {schema.SCHEMA_VERSION}"
    ):
        make_store(tmp_path)
    db = sqlite3.connect(tmp_path / store_mod.DB_FILE)
    assert db.execute("PRAGMA user_version").fetchone()[0] == version
    assert db.execute("SELECT count(*) FROM frames").fetchone()[0] == 1
    db.close()


def test_keys_are_stored_once_per_party(tmp_path: Path) -> None:
    s = make_store(tmp_path)
    for i in range(20):
        s.insert(key(f"m{i % 4}"), key(f"s{i % 5}"), mid(i), 0, b"p", force=False)
    assert s.db.execute("SELECT count(*) FROM parties").fetchone()[0] == 9
    s.close()


class FakePoster:
    def call_soon(self, fn: Any, *args: Any) -> None:
        fn(*args)


class _Op(Request[Any]):
    """A request that runs any function of the store (to inject a failure)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any, poster: Any, reply: Any) -> None:
        super().__init__(poster, reply)
        self.fn = fn

    def run(self, store: Any, now_ms: int) -> Any:
        return self.fn(store, now_ms)


def _run_batch(s: store_mod.MailboxStore, ops: list[Any]) -> list[Any]:
    """Run ``ops`` through a StoreThread as one batch; their results (None: failed)."""
    thread = StoreThread(s, RelayConfig(), lambda mailboxes: None)
    results: list[Any] = [None] * len(ops)
    done = threading.Event()

    def reply(i: int) -> Any:
        def fn(result: Any) -> None:
            results[i] = result
            if i == len(ops) - 1:
                done.set()

        return fn

    requests: list[Request[Any]] = [_Op(op, FakePoster(), reply(i)) for i, op in enumerate(ops)]
    thread._run_batch(requests)  # one batch, on this thread (no timing involved)
    assert done.is_set()
    return results


def _fail(store: store_mod.MailboxStore, now: int) -> int:
    raise sqlite3.OperationalError("injected failure")


def _ins(mailbox: bytes, sender: bytes, n: int) -> Any:
    return lambda store, now: store.insert(mailbox, sender, mid(n), now, b"p%d" % n, force=False)


def test_failed_batch_does_not_reuse_an_undone_party_id(tmp_path: Path) -> None:
    """The batch's new party ids are rolled back; the retry and later parties get fresh ones."""
    s = make_store(tmp_path)
    a, b, snd = key("a"), key("b"), key("s")
    results = _run_batch(s, [_ins(a, snd, 1), _fail])
    assert results == [InsertResult.INSERTED, None]
    assert _run_batch(s, [_ins(b, snd, 2)]) == [InsertResult.INSERTED]
    assert [r[2] for r in s.fetch(a, 0, 10, 0)] == [mid(1)]
    assert [r[2] for r in s.fetch(b, 0, 10, 0)] == [mid(2)]
    ids = s.db.execute("SELECT count(DISTINCT mailbox) FROM frames").fetchone()[0]
    assert ids == 2
    s.close()


def test_purge_forgets_unused_parties_and_ids_never_mix(tmp_path: Path) -> None:
    s = make_store(tmp_path, ttl=TTL_MS / 1000)
    old, live, snd = key("old"), key("live"), key("s")
    s.insert(old, snd, mid(1), 0, b"x", force=False)
    s.insert(live, snd, mid(2), 5 * TTL_MS, b"y", force=False)
    assert s.purge(now_ms=2 * TTL_MS) == 1
    assert s.db.execute("SELECT count(*) FROM parties").fetchone()[0] == 2  # live and s
    newcomer = key("new")
    s.insert(newcomer, snd, mid(3), 5 * TTL_MS, b"z", force=False)  # may take old's id
    assert s.fetch(old, 0, 10, 0) == []
    assert [r[2] for r in s.fetch(newcomer, 0, 10, 0)] == [mid(3)]
    assert [r[2] for r in s.fetch(live, 0, 10, 0)] == [mid(2)]
    assert not s.delete(old, snd, mid(1))
    s.close()


# --- model-based: random operations against plain dicts ------------------------------------
MAILBOXES = [key(f"m{i}") for i in range(3)]
SENDERS = [key(f"s{i}") for i in range(3)]
op_strategy = st.one_of(
    st.tuples(
        st.just("insert"),
        st.integers(0, 2),
        st.integers(0, 2),
        st.integers(0, 5),
        st.integers(0, 3),
    ),
    st.tuples(st.just("delete"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 5)),
    st.tuples(st.just("purge"), st.integers(0, 4)),
    st.tuples(st.just("batch_fails"), st.integers(0, 2), st.integers(0, 2), st.integers(6, 8)),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op_strategy, max_size=30))
def test_store_matches_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[Any, ...]]
) -> None:
    s = make_store(tmp_path_factory.mktemp("model"), ttl=TTL_MS / 1000, quota_frames=4)
    for mailbox in MAILBOXES:  # their identities connected: the full quota (4 here)
        s.mark_known(mailbox)
    model: dict[tuple[bytes, bytes, bytes], tuple[int, int]] = {}  # key -> (order, expires)
    order = 0
    for op in ops:
        if op[0] == "insert":
            _, m, snd, n, ts_step = op
            k = (MAILBOXES[m], SENDERS[snd], mid(n))
            result = s.insert(*k, ts_step * TTL_MS, b"p", force=False)
            full = sum(1 for kk in model if kk[0] == k[0]) >= 4
            want = (
                InsertResult.DUPLICATE
                if k in model
                else InsertResult.OVER_QUOTA
                if full
                else InsertResult.INSERTED
            )
            assert result == want
            if want == InsertResult.INSERTED:
                order += 1
                model[k] = (order, ts_step * TTL_MS + TTL_MS)
        elif op[0] == "delete":
            k = (MAILBOXES[op[1]], SENDERS[op[2]], mid(op[3]))
            assert s.delete(*k) == (model.pop(k, None) is not None)
        elif op[0] == "purge":
            now = op[1] * TTL_MS
            expired = [k for k, (_, exp) in model.items() if exp < now]
            assert s.purge(now) == len(expired)
            for k in expired:
                del model[k]
        else:  # a batch that creates parties, then fails: the retry keeps the insert only
            k = (MAILBOXES[op[1]], SENDERS[op[2]], mid(op[3]))
            results = _run_batch(s, [_ins(*k[:2], op[3]), _fail])
            full = sum(1 for kk in model if kk[0] == k[0]) >= 4
            if k not in model and not full:
                assert results[0] == InsertResult.INSERTED
                order += 1
                model[k] = (order, 2**62)  # stamped with the real clock: never purged here
        for mailbox in MAILBOXES:
            rows = s.fetch(mailbox, 0, 100, now_ms=0)
            kept = sorted((o, k[1], k[2]) for k, (o, _) in model.items() if k[0] == mailbox)
            assert [(bytes(r[1]), bytes(r[2])) for r in rows] == [(w[1], w[2]) for w in kept]
            if kept:
                assert s.usage[mailbox][0] == len(kept)
            else:
                assert s.usage.get(mailbox, [0, 0])[0] == 0
    s.close()


def test_may_hold_covers_queued_stored_and_acked_frames(tmp_path: Path) -> None:
    """A connection skips its first backlog fetch only when may_hold says no:
    a queued (uncommitted) insert and a stored frame must both say yes."""
    store = make_store(tmp_path)
    thread = StoreThread(store, RelayConfig(data_dir=tmp_path), lambda boxes: None)
    box, sender = key("box"), key("sender")
    assert not thread.may_hold(box)

    done = threading.Event()

    class Poster:
        def call_soon(self, fn: Any, *args: Any) -> None:
            fn(*args)
            done.set()

    request = Insert(
        Poster(), lambda r: None, box, sender, mid(1), 0, b"payload", force=False, origin=b""
    )
    thread.submit(request)
    assert thread.may_hold(box)  # queued, not run yet: the store thread is not started
    assert not thread.may_hold(key("other"))
    thread.start()
    try:
        assert done.wait(5)
        assert thread.may_hold(box)  # committed: stored
        done.clear()
        thread.submit(Delete(Poster(), lambda r: None, box, [(sender, mid(1))]))
        assert done.wait(5)
        assert not thread.may_hold(box)  # acknowledged and deleted: nothing left
    finally:
        thread.stop()


def test_prekey_count_follows_publish_take_and_rollback(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    alice = key("alice")
    store.db.execute("BEGIN")
    assert store.publish_prekeys(alice, b"spk", (b"k1", b"k2", b"k3")) == Published(3, True)
    store.db.execute("COMMIT")
    assert store.otk_counts[alice] == 3
    store.db.execute("BEGIN")
    assert store.take_prekeys(alice) == Bundle(b"spk", b"k1", 2)
    store.db.execute("COMMIT")
    assert store.otk_counts[alice] == 2
    store.db.execute("BEGIN")
    store.take_prekeys(alice)
    store.db.execute("ROLLBACK")
    store.forget_uncommitted()  # what the store thread does after a failed batch
    assert store.otk_counts[alice] == 2
    reopened = make_store(tmp_path)
    assert reopened.otk_counts[alice] == 2


# The version 2 schema exactly as relays before schema 3 created it (the migration input).
V2_SCHEMA = """
CREATE TABLE parties(id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE);
CREATE TABLE frames(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox INTEGER NOT NULL,
    sender INTEGER NOT NULL,
    msg_id BLOB NOT NULL,
    ts INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    payload BLOB NOT NULL,
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
"""


def test_migrates_v2_keeping_frames_and_marking_known_mailboxes(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / store_mod.DB_FILE, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(f"BEGIN; {V2_SCHEMA} PRAGMA user_version=2; COMMIT;")
    db.execute("INSERT INTO parties(id, key) VALUES (1, ?), (2, ?)", (key("box"), key("snd")))
    for i in range(3):
        db.execute(
            "INSERT INTO frames(mailbox, sender, msg_id, ts, expires, payload)"
            " VALUES (1, 2, ?, 1000, ?, ?)",
            (mid(i), 1000 + TTL_MS, b"p%d" % i),
        )
    db.execute("INSERT INTO signed_prekeys VALUES (?, ?)", (key("ident"), b"spk"))
    db.close()
    s = make_store(tmp_path, ttl=TTL_MS / 1000)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION == 3
    got = [bytes(r[2]) for r in s.fetch(key("box"), 0, 10, now_ms=1000)]
    assert got == [mid(0), mid(1), mid(2)]
    assert s.usage[key("box")] == [3, 6]
    assert s.is_known(key("box"))  # it held frames: nobody's frames get a shorter life
    assert s.is_known(wire.mailbox_address(key("ident")))  # it published prekeys
    assert not s.is_known(key("stranger"))
    assert s.db.execute("SELECT count(*) FROM frames WHERE origin != 0").fetchone()[0] == 0
    assert s.delete(key("box"), key("snd"), mid(0))
    assert (
        s.insert(key("box"), key("snd"), mid(9), 2000, b"q", force=False, origin=b"127.0.0.0/24")
        == InsertResult.INSERTED
    )
    s.close()
    again = make_store(tmp_path, ttl=TTL_MS / 1000)
    assert again.origin_usage == {again._party(b"127.0.0.0/24", create=False): 1}
    again.close()
