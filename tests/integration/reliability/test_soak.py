"""The soak's short form for CI: real client processes and relay, SIGKILLed at random.

The long run is ``python scripts/soak.py`` (a few thousand messages, dozens of kills);
see docs/reliability.md. Both check the same promise: every message a sender saw
accepted is shown exactly once to every recipient, in per-sender order, and nothing
committed to an outbox is forgotten.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
SCRIPT = REPO / "scripts" / "soak.py"


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("securechat_soak", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_soak_with_kills_loses_nothing(tmp_path: Path) -> None:
    soak = _soak()
    fig = soak.run_soak(
        messages=280, kills=10, seed=6, rate=20.0, work=tmp_path, log=lambda *_: None
    )
    assert fig.problems == []
    assert fig.relay_kills + fig.client_kills == 10
    assert fig.relay_kills >= 1 and fig.client_kills >= 1
    assert fig.messages_sent >= 270  # a kill while sealing may abort a message or two
    assert fig.lost == 0
    assert fig.duplicates_shown == 0
    assert fig.forgotten == 0
    assert fig.acknowledged == fig.messages_sent
    assert fig.delivered >= fig.deliveries_expected > 0
    assert fig.order_violations == 0


def test_analysis_catches_loss_duplicates_and_disorder(tmp_path: Path) -> None:
    """The checker itself must be able to fail: feed it a doctored run."""
    soak = _soak()
    plan = {"ann": [("p1", ["ben"])], "ben": [("p1", ["ann"])]}
    log = soak.EventLog(tmp_path / "events-ann.jsonl")
    for seq in (1, 2, 3):
        log.write(ev="sending", label="p1", seq=seq)
        log.write(ev="queued", id=f"{seq:02x}", text=f"ann|p1|{seq}")
        log.write(ev="accepted", id=f"{seq:02x}")
    log.write(ev="sending", label="p1", seq=4)  # killed before the commit
    ben = soak.EventLog(tmp_path / "events-ben.jsonl")
    for text in ("ann|p1|2", "ann|p1|1", "ann|p1|2"):  # 3 lost, 1 out of order, 2 twice
        ben.write(ev="shown", text=text, sender="ann")
    fig = soak.Figures()
    soak.analyse(tmp_path, plan, fig)
    assert (fig.messages_sent, fig.acknowledged, fig.aborted_before_commit) == (3, 3, 1)
    assert fig.lost == 1
    assert fig.duplicates_shown == 1
    assert fig.order_violations == 2
    assert not fig.ok


def test_reconnect_resends_outbox_before_new_messages(sc_home: Path) -> None:
    """Messages queued offline reach the peer before one sent right at reconnection.

    The soak found this as order violations (the link was published before the outbox
    was resent); here it is made deterministic by sending from the ConnectionEvent
    callback, i.e. at the moment the link becomes usable.
    """
    import socket

    from securechat.client import keystore
    from securechat.client.events import ConnectionEvent, Event
    from securechat.client.peers import Conversation

    from reliability.fakerelay import FakeRelay, wait_for
    from reliability.harness import Client, make_identities

    make_identities(sc_home, "alice", "bob")
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # free now, nobody listening once closed
    relay_box: list[FakeRelay] = []
    alice = Client(sc_home, "alice", f"127.0.0.1:{port}", None)
    bob_identity = keystore.load_public(str(sc_home / "bob.pub"))
    conv = Conversation.with_peers(alice.identity.public, [bob_identity])
    try:
        for i in range(3):
            alice.messenger.send_text(conv, f"queued offline {i}")
        original = alice.events

        def on_event(event: Event) -> None:
            original(event)
            if isinstance(event, ConnectionEvent) and event.connected:
                alice.messenger.send_text(conv, "sent at reconnection")

        alice.messenger._emit = on_event
        relay_box.append(FakeRelay(seed=1, attack_rate=0.0, port=port))
        bob = Client(sc_home, "bob", f"127.0.0.1:{port}", relay_box[0].public)
        try:
            assert wait_for(lambda: len(bob.events.texts()) >= 4, 30), bob.events.texts()
            assert bob.events.texts() == [
                "queued offline 0",
                "queued offline 1",
                "queued offline 2",
                "sent at reconnection",
            ]
        finally:
            bob.stop()
    finally:
        alice.stop()
        for relay in relay_box:
            relay.close()
