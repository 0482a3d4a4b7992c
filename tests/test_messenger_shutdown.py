"""A clean stop acknowledges what was received, so the relay never sends it again."""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import pytest
from relayclient import RelayProcess

from securechat import keys, wire
from securechat.client.app import open_client
from securechat.client.messenger import Event, MessageEvent


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
