"""Relay pieces without sockets: token bucket, key file, store, configuration."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securechat.core import dh
from securechat.errors import CorruptKeyError, KeyPermissionError, UsageError
from securechat.relay import keyfile, server
from securechat.relay import store as store_mod
from securechat.relay.limits import MAX_STORED_OTKS, RelayConfig, TokenBucket
from securechat.relay.mailboxes import Bundle, InsertResult, Published


@given(st.lists(st.tuples(st.floats(0, 2), st.floats(0, 50)), max_size=50))
def test_token_bucket_never_exceeds_rate_plus_burst(steps: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate=10.0, burst=20.0, now=0.0)
    now = 0.0
    taken = 0.0
    for dt, cost in steps:
        now += dt
        if bucket.take(cost, now):
            taken += cost
    assert taken <= 20.0 + 10.0 * now + 1e-6


def test_token_bucket_refill() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0, now=0.0)
    assert bucket.take(2, 0.0)
    assert not bucket.take(1, 0.5)
    assert bucket.take(1, 1.0)


def test_keyfile_created_reloaded_and_checked(tmp_path: Path) -> None:
    d = tmp_path / "data"
    first = keyfile.load_or_create(d)
    assert keyfile.load_or_create(d) == first
    assert (d / "relay.key").stat().st_mode & 0o777 == 0o600
    pub_line = (d / "relay.pub").read_text().strip()
    assert pub_line.startswith("screlay1:")
    os.chmod(d / "relay.key", 0o644)
    with pytest.raises(KeyPermissionError):
        keyfile.load_or_create(d)
    os.chmod(d / "relay.key", 0o600)
    text = (d / "relay.key").read_text()
    other = dh.public_key(os.urandom(32))
    from securechat.core.encoding import encode_token

    lines = text.splitlines()
    (d / "relay.key").write_text(
        f"{lines[0]}\n{lines[1]}\npublic {encode_token('screlay1', other)}\n"
    )
    with pytest.raises(CorruptKeyError):
        keyfile.load_or_create(d)
    (d / "relay.key").write_text("SECURECHAT RELAY KEY v2\n")
    with pytest.raises(CorruptKeyError):
        keyfile.load_or_create(d)


def make_store(tmp_path: Path, **kw: object) -> store_mod.MailboxStore:
    return store_mod.open_store(tmp_path, RelayConfig(data_dir=tmp_path, **kw))  # type: ignore[arg-type]


def test_store_insert_fetch_delete_quota(tmp_path: Path) -> None:
    s = make_store(tmp_path, quota_frames=2, ttl=10.0)
    mb, snd = b"m" * 32, b"s" * 32
    s.mark_known(mb)
    assert s.insert(mb, snd, b"1" * 16, 1000, b"a", force=False) == InsertResult.INSERTED
    assert s.insert(mb, snd, b"1" * 16, 1000, b"a", force=False) == InsertResult.DUPLICATE
    assert s.insert(mb, snd, b"2" * 16, 1000, b"bb", force=False) == InsertResult.INSERTED
    assert s.insert(mb, snd, b"3" * 16, 1000, b"c", force=False) == InsertResult.OVER_QUOTA
    assert s.insert(mb, snd, b"2" * 16, 1000, b"bb", force=False) == InsertResult.DUPLICATE
    assert s.insert(mb, snd, b"4" * 16, 1000, b"d", force=True) == InsertResult.INSERTED
    rows = s.fetch(mb, 0, 10, now_ms=1000)
    assert [r[2] for r in rows] == [b"1" * 16, b"2" * 16, b"4" * 16]
    assert s.fetch(mb, rows[0][0], 10, now_ms=1000)[0][2] == b"2" * 16
    assert s.delete(mb, snd, b"1" * 16)
    assert not s.delete(mb, snd, b"1" * 16)
    assert s.usage[mb] == [2, 3]
    assert s.fetch(mb, 0, 10, now_ms=20_000) == []  # expired rows are not handed out
    assert s.purge(now_ms=20_000) == 2
    assert s.usage.get(mb) is None
    s.close()


def test_store_seq_never_reused(tmp_path: Path) -> None:
    s = make_store(tmp_path)
    mb, snd = b"m" * 32, b"s" * 32
    s.insert(mb, snd, b"1" * 16, 0, b"a", force=False)
    ((seq1, *_),) = s.fetch(mb, 0, 10, 0)
    s.delete(mb, snd, b"1" * 16)
    s.insert(mb, snd, b"2" * 16, 0, b"a", force=False)
    ((seq2, *_),) = s.fetch(mb, 0, 10, 0)
    assert seq2 > seq1
    s.close()


def test_store_prekeys(tmp_path: Path) -> None:
    s = make_store(tmp_path)
    ident = b"i" * 32
    assert s.take_prekeys(ident) == Bundle(b"", None, 0)
    otks = tuple(i.to_bytes(4, "big") + bytes(32) for i in range(MAX_STORED_OTKS + 10))
    assert s.publish_prekeys(ident, b"spk", otks[:100]) == Published(100, True)
    assert s.publish_prekeys(ident, b"", otks[100:]) == Published(MAX_STORED_OTKS, True)  # capped
    assert s.publish_prekeys(ident, b"spk", ()) == Published(MAX_STORED_OTKS, False)  # no change
    assert s.publish_prekeys(ident, b"", otks[:1]) == Published(MAX_STORED_OTKS, False)  # full
    assert s.take_prekeys(ident) == Bundle(b"spk", otks[0], MAX_STORED_OTKS - 1)
    assert s.take_prekeys(ident, one_time=False) == Bundle(b"spk", None, MAX_STORED_OTKS - 1)
    assert s.take_prekeys(ident) == Bundle(b"spk", otks[1], MAX_STORED_OTKS - 2)
    assert s.count_prekeys(ident) == MAX_STORED_OTKS - 2
    # one-time prekeys with no signed prekey anywhere: refused, nothing stored (protocol 3.4)
    other = b"o" * 32
    assert s.publish_prekeys(other, b"", otks[:3]).refused
    assert s.count_prekeys(other) == 0
    s.close()


def test_store_schema_version_checked(tmp_path: Path) -> None:
    s = make_store(tmp_path)
    s.db.execute("PRAGMA user_version=7")
    s.close()
    from securechat.errors import StorageError

    with pytest.raises(StorageError, match="schema version 7"):
        make_store(tmp_path)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    server.add_arguments(p)
    return p.parse_args(list(argv))


def test_config_from_args() -> None:
    cfg = server.config_from_args(parse("--port", "0", "--quota-frames", "5", "--sync", "normal"))
    assert (cfg.port, cfg.quota_frames, cfg.sync_full) == (0, 5, False)
    with pytest.raises(UsageError):
        server.config_from_args(parse("--workers", "0"))
    with pytest.raises(UsageError):
        server.config_from_args(parse("--port", "70000"))
