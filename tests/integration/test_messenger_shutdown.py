"""A clean stop acknowledges what was received, so the relay never sends it again."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
from securechat.client.app import open_client
from securechat.client.events import Event, MessageEvent
from securechat.core import keys, wire

from relay_fixture import RelayProcess


@pytest.fixture
def relay(tmp_path: Path) -> RelayProcess:
    r = RelayProcess.start(tmp_path / "relay")
    yield r  # type: ignore[misc]
    r.stop()


def test_clean_stop_flushes_acks(relay: RelayProcess, sc_home: Path) -> None:
    address = f"{relay.host}:{relay.port}"
    alice = keys.generate_identity("alice", os.urandom(keys.SEED_SIZE))
    bob = keys.generate_identity("bob", os.urandom(keys.SEED_SIZE))
    shown: queue.Queue[MessageEvent] = queue.Queue()
    delivers: list[bytes] = []

    def on_event(event: Event) -> None:
        if isinstance(event, MessageEvent):
            shown.put(event)
            if event.text == "m4":
                # A slow UI: the user has seen the last message and quits while the
                # network thread is still inside the batch whose Ack is not sent yet.
                time.sleep(0.5)

    def tap(direction: str, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Deliver):
            delivers.append(frame.msg_id)

    with open_client(None, address, None, lambda e: None, identity=alice) as a:
        conv = a.conversation([bob.public])
        for i in range(5):
            a.messenger.send_text(conv, f"m{i}")
        assert a.messenger.wait_all_accepted(10)
    for run in range(2):  # two runs of bob's client: the second must get nothing again
        with open_client(None, address, None, on_event, identity=bob, tap=tap) as b:
            assert b.messenger.wait_connected(10)
            assert b.messenger.synced.wait(10)
            if run == 0:
                assert sorted(shown.get(timeout=10).text for _ in range(5)) == [
                    f"m{i}" for i in range(5)
                ]
    assert len(delivers) == 5, "a stopped client's messages were delivered again"
    assert shown.empty()


def test_a_replaced_connection_stops_instead_of_fighting_back(
    relay: RelayProcess, tmp_path: Path, sc_home: Path
) -> None:
    """The relay says REPLACED before closing the older connection of an identity (13.10):
    that client stops with a clear error instead of reconnecting and replacing the newer."""
    from securechat.client.events import NoticeEvent
    from securechat.client.messenger import Messenger
    from securechat.client.relays import KnownRelays
    from securechat.client.store import ClientStore, StoreKeys
    from securechat.errors import InUseError

    address = f"{relay.host}:{relay.port}"
    alice = keys.generate_identity("alice", os.urandom(keys.SEED_SIZE))
    notices: list[list[str]] = [[], []]
    stores, engines = [], []
    for i in range(2):
        store = ClientStore(tmp_path / f"device{i}.state.db", StoreKeys.of(alice))

        def record(event: Event, box: list[str] = notices[i]) -> None:
            if isinstance(event, NoticeEvent):
                box.append(event.text)

        m = Messenger(
            alice,
            store,
            address,
            KnownRelays(tmp_path / f"known{i}"),
            record,
            pinned_relay_key=relay.public,
        )
        stores.append(store)
        engines.append(m)
    try:
        engines[0].start()
        assert engines[0].wait_connected(10)
        engines[1].start()
        assert engines[1].wait_connected(10)
        deadline = time.monotonic() + 10
        while engines[0].fatal is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(engines[0].fatal, InUseError)
        assert any("replaced this one" in n for n in notices[0])
        time.sleep(1.5)  # the first one stays down: the second is not replaced back
        assert engines[1].connected and engines[1].fatal is None
        assert not engines[0].connected
    finally:
        for m, s in zip(engines, stores, strict=True):
            m.stop()
            s.close()
