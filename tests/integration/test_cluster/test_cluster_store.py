"""The Redis store on its own (``redis_store.RedisMailboxes`` against a real redis-server):
the same requests and answers as the SQLite store, and what a retry or a full Redis does.

Each test is an attack or a failure someone can cause: a retried insert, a retried publish
(a one-time prekey must never be handed out twice), a sender spreading frames over
mailboxes, Redis out of memory (stored frames stay, acknowledgements still work).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from securechat.core import wire
from securechat.relay.limits import RelayConfig
from securechat.relay.mailboxes import (
    Bundle,
    Delete,
    Fetch,
    Insert,
    InsertResult,
    MarkKnown,
    Publish,
    Published,
    Request,
    TakePrekeys,
)
from securechat.relay.redis_store import RedisMailboxes, load_library, mailbox_keys

from test_cluster.nodes import RedisServer

pytestmark = pytest.mark.timeout(60)


def now_ms() -> int:
    return int(time.time() * 1000)


class Poster:
    """Where replies land: a queue the test reads (any thread may post)."""

    def __init__(self) -> None:
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        fn(*args)


class Store:
    def __init__(self, server: RedisServer, config: RelayConfig) -> None:
        self.client = redis.Redis(port=server.port)
        load_library(self.client)
        self.new_rows: list[set[bytes]] = []
        self.mailboxes = RedisMailboxes(self.client, config, "testnode", self.new_rows.append)
        self.mailboxes.start()
        self.poster = Poster()

    def ask(self, make: Callable[[Poster, Callable[[Any], None]], Request[Any]]) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def reply(result: Any) -> None:
            box.append(result)
            done.set()

        self.mailboxes.submit(make(self.poster, reply))
        assert done.wait(10), "no reply from the Redis store"
        return box[0]

    def insert(
        self, mailbox: bytes, sender: bytes, payload: bytes, *, msg_id: bytes = b"",
        force: bool = False, origin: bytes = b"10.0.0.0/24", ts: int = 0,
    ) -> InsertResult:  # fmt: skip
        mid = msg_id or os.urandom(wire.ID_SIZE)
        return self.ask(  # type: ignore[no-any-return]
            lambda p, r: Insert(
                p, r, mailbox, sender, mid, ts or now_ms(), payload, force=force, origin=origin
            )
        )

    def fetch(self, mailbox: bytes, after: int = 0, limit: int = 100) -> list[Any]:
        return self.ask(lambda p, r: Fetch(p, r, mailbox, after, limit, 0))  # type: ignore[no-any-return]

    def close(self) -> None:
        self.mailboxes.stop()
        self.client.close()


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[Store]:
    s = Store(redis_server, RelayConfig(quota_frames=5, sender_quota_bytes=1000,
                                        unknown_quota_frames=3))  # fmt: skip
    try:
        yield s
    finally:
        s.close()


def known(store: Store, mailbox: bytes) -> None:
    assert store.ask(lambda p, r: MarkKnown(p, r, mailbox)) is True


def test_insert_fetch_in_order_and_delete(store: Store) -> None:
    mailbox, sender = os.urandom(32), os.urandom(32)
    known(store, mailbox)
    ids = [os.urandom(wire.ID_SIZE) for _ in range(4)]
    for i, mid in enumerate(ids):
        assert store.insert(mailbox, sender, f"m{i}".encode(), msg_id=mid) == InsertResult.INSERTED
    rows = store.fetch(mailbox)
    assert [r[4] for r in rows] == [b"m0", b"m1", b"m2", b"m3"]
    assert [r[2] for r in rows] == ids and all(r[1] == sender for r in rows)
    assert [r[4] for r in store.fetch(mailbox, after=rows[1][0])] == [b"m2", b"m3"]
    store.ask(lambda p, r: Delete(p, r, mailbox, [(sender, ids[0]), (sender, ids[2])]))
    assert [r[4] for r in store.fetch(mailbox)] == [b"m1", b"m3"]
    assert mailbox in set().union(*store.new_rows)


def test_a_retried_insert_is_a_duplicate_not_a_second_copy(store: Store) -> None:
    mailbox, sender, mid = os.urandom(32), os.urandom(32), os.urandom(wire.ID_SIZE)
    known(store, mailbox)
    assert store.insert(mailbox, sender, b"once", msg_id=mid) == InsertResult.INSERTED
    assert store.insert(mailbox, sender, b"once", msg_id=mid) == InsertResult.DUPLICATE
    assert len(store.fetch(mailbox)) == 1


def test_quotas_per_mailbox_per_sender_and_for_unknown_mailboxes(store: Store) -> None:
    box, sender = os.urandom(32), os.urandom(32)
    known(store, box)
    results = [store.insert(box, sender, b"x") for _ in range(6)]
    assert results[:5] == [InsertResult.INSERTED] * 5
    assert results[5] == InsertResult.OVER_QUOTA
    # The same sender spreading over other (known) mailboxes hits its own quota (1000 B).
    boxes = [_known(store) for _ in range(4)]
    spread = [store.insert(b, sender, bytes(300)) for b in boxes]
    assert spread[:3] == [InsertResult.INSERTED] * 3
    assert spread[3] == InsertResult.SENDER_OVER_QUOTA
    # A mailbox nobody connected for takes 3 frames.
    stranger = os.urandom(32)
    got = [store.insert(stranger, os.urandom(32), b"y") for _ in range(4)]
    assert got == [InsertResult.INSERTED] * 3 + [InsertResult.UNKNOWN_OVER_QUOTA]
    # An acknowledgement gives the sender its share back.
    rows = store.fetch(boxes[0])
    store.ask(lambda p, r: Delete(p, r, boxes[0], [(row[1], row[2]) for row in rows]))
    assert store.insert(_known(store), sender, bytes(300)) == InsertResult.INSERTED


def _known(store: Store) -> bytes:
    box = os.urandom(32)
    known(store, box)
    return box


def test_a_retried_publish_never_hands_out_a_prekey_twice(store: Store) -> None:
    identity = os.urandom(32)
    otks = tuple(bytes([i]) * wire.ONE_TIME_PREKEY_SIZE for i in range(1, 4))
    first = store.ask(lambda p, r: Publish(p, r, identity, b"spk", otks))
    assert first == Published(3, changed=True)
    again = store.ask(lambda p, r: Publish(p, r, identity, b"spk", otks))  # a lost reply
    assert again == Published(3, changed=False)
    handed = [store.ask(lambda p, r: TakePrekeys(p, r, identity, one_time=True)) for _ in range(5)]
    assert all(isinstance(b, Bundle) and b.signed_prekey == b"spk" for b in handed)
    assert [b.one_time_prekey for b in handed] == [*otks, None, None]
    assert handed[-1].left == 0
    # One-time prekeys without any signed prekey are refused, and nothing is stored.
    other = os.urandom(32)
    refused = store.ask(lambda p, r: Publish(p, r, other, b"", otks))
    assert refused.refused and refused.held == 0
    assert store.mailboxes.prekey_count(identity) == 0  # the hint after the hand-outs


def test_a_full_redis_refuses_new_frames_and_still_takes_acknowledgements(
    redis_server: RedisServer,
) -> None:
    s = Store(redis_server, RelayConfig())
    try:
        box, sender = os.urandom(32), os.urandom(32)
        known(s, box)
        ids = [os.urandom(wire.ID_SIZE) for _ in range(3)]
        for mid in ids:
            assert s.insert(box, sender, bytes(1000), msg_id=mid) == InsertResult.INSERTED
        used = int(s.client.info("memory")["used_memory"])
        s.client.config_set("maxmemory", str(used - 1024))
        assert s.insert(box, sender, bytes(1000)) == InsertResult.STORE_FULL
        assert len(s.fetch(box)) == 3  # stored frames stay, and can be read
        s.ask(lambda p, r: Delete(p, r, box, [(sender, ids[0])]))  # acks still work
        assert len(s.fetch(box)) == 2
        s.client.config_set("maxmemory", "0")
        assert s.insert(box, sender, bytes(1000)) == InsertResult.INSERTED
    finally:
        s.close()


def test_expired_frames_are_not_delivered_and_free_their_quota(store: Store) -> None:
    box, sender = _known(store), os.urandom(32)
    ttl_ms = int(RelayConfig().ttl * 1000)
    old = now_ms() - ttl_ms - 1000
    assert store.insert(box, sender, bytes(500), ts=old) == InsertResult.INSERTED
    assert store.insert(box, sender, b"fresh") == InsertResult.INSERTED
    assert [r[4] for r in store.fetch(box)] == [b"fresh"]  # the expired one is dropped
    # ... and its bytes no longer count against the sender (1000 B quota).
    assert store.insert(_known(store), sender, bytes(900)) == InsertResult.INSERTED


def test_keys_of_one_mailbox_share_one_cluster_slot(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    box = os.urandom(32)
    tags = {key[key.index("{") : key.index("}") + 1] for key in mailbox_keys(box).values()}
    assert tags == {"{" + box.hex() + "}"}
    client.close()


def test_nothing_a_sender_stores_lives_forever(store: Store) -> None:
    """Every key an insert creates expires (after the frame's life and a slack), so frames
    nobody fetches, and their senders' counters, cannot fill Redis for good."""
    box, sender = _known(store), os.urandom(32)
    assert store.insert(box, sender, b"x") == InsertResult.INSERTED
    ttl_ms = int(RelayConfig().ttl * 1000)
    keys = mailbox_keys(box)
    for name in ("q", "m", "d", "t"):
        life = store.client.pttl(keys[name])
        assert ttl_ms < life <= ttl_ms + ttl_ms // 8 + 1000, name
    for key in (b"sc:s:" + sender, b"sc:o:10.0.0.0/24"):
        assert 0 < store.client.pttl(key) <= ttl_ms + ttl_ms // 8 + 1000
