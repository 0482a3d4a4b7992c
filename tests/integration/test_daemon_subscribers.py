"""Subscriptions in one process (no relay): replay, live, a slow subscriber, the bounds."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from securechat.client.relays import KnownRelays
from securechat.client.store import ClientStore, StoreKeys
from securechat.core import keys
from securechat.daemon import rpc, service
from securechat.daemon.service import Caller, Daemon


class Sink:
    """A connection's queue with room for ``room`` events."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.events: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.cond = threading.Condition()

    def offer(self, event: dict[str, Any]) -> bool:
        with self.cond:
            if len(self.events) >= self.room:
                return False
            self.events.append(event)
            self.cond.notify_all()
            return True

    def fail(self, event: dict[str, Any]) -> None:
        with self.cond:
            self.failed.append(event)
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float = 10.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: predicate(self), timeout=timeout)


@pytest.fixture
def daemon(sc_home: Path) -> Iterator[Daemon]:
    sc_home.mkdir(mode=0o700)
    identity = keys.generate_identity("alice", os.urandom(keys.SEED_SIZE))
    path = sc_home / "alice.state.db"
    store = ClientStore(path, StoreKeys.of(identity))
    reader = ClientStore(path, StoreKeys.of(identity), read_only=True)
    d = Daemon(identity, store, reader, "127.0.0.1:9", KnownRelays(sc_home / "known_relays"))
    yield d  # never started: no relay needed; the store is written as the session would
    d.stop()
    reader.close()
    store.close()


def _store_messages(d: Daemon, first: int, count: int) -> None:
    store = d.messenger.store
    for i in range(first, first + count):
        with store.transaction():
            store.history_add("dm-x", i.to_bytes(16, "big"), 3, {"text": f"m{i}", "out": False})
    d.log.wake()


def _subscribe(d: Daemon, sink: Sink, since: int) -> Caller:
    caller = Caller(sink)
    d.call(rpc.Request("subscribe", {"since": since}, 1, notify=False), caller)
    for after in caller.after:
        after()
    return caller


def _texts(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events]


def test_replay_then_live_without_a_gap_or_a_duplicate(daemon: Daemon) -> None:
    _store_messages(daemon, 0, 450)  # more than two replay batches
    sink = Sink(room=10_000)
    _subscribe(daemon, sink, since=0)
    writer = threading.Thread(target=_store_messages, args=(daemon, 450, 50))
    writer.start()  # new messages while the replay runs: the seam
    writer.join()
    sink.wait(lambda s: len(s.events) >= 500)
    time.sleep(0.2)
    assert _texts(sink.events) == [f"m{i}" for i in range(500)]
    assert [e["cursor"] for e in sink.events] == list(range(1, 501))


def test_a_slow_subscriber_is_dropped_and_resumes_from_its_cursor(daemon: Daemon) -> None:
    _store_messages(daemon, 0, 30)
    slow = Sink(room=12)
    caller = _subscribe(daemon, slow, since=0)
    slow.wait(lambda s: s.failed)
    error = slow.failed[0]
    assert error["type"] == "error" and error["code"] == rpc.SLOW_SUBSCRIBER
    assert error["cursor"] == 12 and "since=12" in error["message"]
    assert caller.subscription is not None and daemon._subs == set()
    _store_messages(daemon, 30, 5)  # the dropped one gets no more
    time.sleep(0.3)
    assert len(slow.events) == 12
    again = Sink(room=1000)
    _subscribe(daemon, again, since=error["cursor"])
    again.wait(lambda s: len(s.events) >= 23)
    assert _texts(slow.events + again.events) == [f"m{i}" for i in range(35)]


def test_live_events_that_do_not_fit_drop_the_subscriber_too(daemon: Daemon) -> None:
    sink = Sink(room=3)
    _subscribe(daemon, sink, since=daemon.log.bounds()[1])
    from securechat.client.events import PresenceEvent

    for _ in range(10):  # a presence flood never makes the daemon buffer
        daemon._on_event(PresenceEvent("bob", True))
    assert len(sink.events) == 3 and sink.failed and sink.failed[0]["code"] == rpc.SLOW_SUBSCRIBER


def test_subscribers_are_bounded(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "MAX_SUBSCRIBERS", 2)
    _subscribe(daemon, Sink(10), 0)
    _subscribe(daemon, Sink(10), 0)
    with pytest.raises(rpc.RpcError) as info:
        _subscribe(daemon, Sink(10), 0)
    assert info.value.code == rpc.TOO_MANY_SUBSCRIBERS


def test_a_cursor_older_than_the_log_says_so(daemon: Daemon) -> None:
    store = daemon.messenger.store
    _store_messages(daemon, 0, 3)
    with store.transaction():
        store._exec("DELETE FROM events WHERE seq <= 2")  # as pruning does
    result = daemon.call(rpc.Request("subscribe", {"since": 0}, 1, False), Caller(Sink(10)))
    assert result["missed"] is True and result["oldest"] == 3
    fine = daemon.call(rpc.Request("subscribe", {"since": 2}, 1, False), Caller(Sink(10)))
    assert fine["missed"] is False


def test_a_socket_path_longer_than_sun_path_still_works(tmp_path: Path) -> None:
    """Key directories deep in a home folder exceed sun_path's 108 bytes: reached through
    a directory descriptor instead."""
    import os
    import socket as sock_mod

    from securechat.daemon import server

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "alice.sock"
    assert len(str(path)) > 108
    address, fd = server._address(path)
    listener = sock_mod.socket(sock_mod.AF_UNIX, sock_mod.SOCK_STREAM)
    try:
        listener.bind(address)
        listener.listen(1)
        assert path.exists() and server.answers(path)
    finally:
        if fd is not None:
            os.close(fd)
        listener.close()
    assert not server.answers(path)  # a stale file: nobody answers
