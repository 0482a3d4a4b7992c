"""A malicious relay against its users: forged ✓✓, withheld prekeys, poisoned clocks.

Real ``Messenger`` clients talk through ``FakeRelay``, a relay double speaking the
real Noise + wire protocol, told to lie in one specific way per test (issue 11,
items 1, 10, 11 and 12):

* "delivered" (✓✓) comes only from the recipient's device, end to end; a relay
  that answers ``Accepted(2)`` and drops the frame gets ✓ and nothing more;
* a message the recipient cannot open is reported on both sides;
* a peer once seen with prekeys is never silently started without them: the
  message is held, with a notice, until a bundle arrives;
* an idle client publishes its prekeys once per connection and writes nothing;
* a far-future session-opening message neither kills the network thread nor
  poisons the replay floor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat import cli
from securechat.client import keystore, prekeys
from securechat.client import session as session_module
from securechat.client.app import open_store
from securechat.client.events import STATUS_ACCEPTED, STATUS_DELIVERED, StatusEvent
from securechat.client.peers import Conversation
from securechat.client.session import ClientSession
from securechat.core import encoding, keys, wire
from securechat.core.e2e import Content, E2EState

from reliability.fakerelay import FakeRelay, wait_for
from reliability.harness import Client, make_identities

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def relay() -> Iterator[FakeRelay]:
    r = FakeRelay(seed=1, attack_rate=0.0)
    try:
        yield r
    finally:
        r.close()


class People:
    """Clients by name against one relay; each started on first use, all stopped at the end."""

    def __init__(self, home: Path, relay: FakeRelay) -> None:
        self.home, self.relay = home, relay
        self.running: dict[str, Client] = {}

    def __getitem__(self, name: str) -> Client:
        if name not in self.running:
            self.running[name] = Client(self.home, name, self.relay.address, self.relay.public)
            assert self.running[name].messenger.wait_connected(10)
        return self.running[name]

    def stop(self, name: str) -> None:
        self.running.pop(name).stop()

    def conv(self, me: str, *peers: str) -> Conversation:
        return Conversation.with_peers(  # peers are not started by naming them
            self[me].identity.public, [_public(self.home, p) for p in peers]
        )


@pytest.fixture
def people(sc_home: Path, relay: FakeRelay) -> Iterator[People]:
    make_identities(sc_home, "alice", "bob", "carol")
    group = People(sc_home, relay)
    try:
        yield group
    finally:
        for client in list(group.running.values()):
            client.stop()


def _marks(client: Client, msg_id: bytes) -> list[int]:
    return [
        e.status
        for e in list(client.events.events)
        if isinstance(e, StatusEvent) and e.msg_id == msg_id
    ]


def _history_status(client: Client, conv: Conversation, msg_id: bytes) -> int:
    entries = [e for e in client.messenger.history(conv.conv_id, 50) if e["msg_id"] == msg_id.hex()]
    assert entries, "the message is in the sender's history"
    return int(str(entries[0]["status"]))


def _published(client: Client) -> None:
    """Wait until the client's first prekey publish reached the relay (bundles exist)."""
    assert wait_for(lambda: client.messenger.session.published, 10)
    time.sleep(0.2)


# --- 11: delivery marks ----------------------------------------------------------------------


def test_delivered_comes_from_the_recipients_device(people: People) -> None:
    _published(people["bob"])
    conv = people.conv("alice", "bob")
    msg_id = people["alice"].messenger.send_text(conv, "are you there?")
    assert wait_for(lambda: "are you there?" in people["bob"].events.texts(), 10)
    assert wait_for(lambda: STATUS_DELIVERED in _marks(people["alice"], msg_id), 10)
    assert _marks(people["alice"], msg_id) == [STATUS_ACCEPTED, STATUS_DELIVERED]
    assert _history_status(people["alice"], conv, msg_id) == STATUS_DELIVERED
    # the receipt is a message of its own, never shown and never answered
    assert people["alice"].events.texts() == []
    assert people["bob"].messenger.pending() == 0


def test_a_relay_claiming_delivery_shows_only_accepted(people: People, relay: FakeRelay) -> None:
    _published(people["bob"])
    relay.claim_delivered = True  # Accepted(2) for every Send, and the frame is dropped
    conv = people.conv("alice", "bob")
    msg_id = people["alice"].messenger.send_text(conv, "this one is lost")
    assert wait_for(lambda: STATUS_ACCEPTED in _marks(people["alice"], msg_id), 10)
    time.sleep(1.5)
    assert _marks(people["alice"], msg_id) == [STATUS_ACCEPTED]
    assert _history_status(people["alice"], conv, msg_id) == STATUS_ACCEPTED
    assert "this one is lost" not in people["bob"].events.texts()


def test_a_group_message_is_delivered_once_every_member_confirmed(people: People) -> None:
    for name in ("bob", "carol"):
        _published(people[name])
    people.stop("carol")  # offline: her copy waits at the relay
    conv = people.conv("alice", "bob", "carol")
    msg_id = people["alice"].messenger.send_text(conv, "hello group")
    assert wait_for(lambda: "hello group" in people["bob"].events.texts(), 10)
    time.sleep(1.0)
    assert STATUS_DELIVERED not in _marks(people["alice"], msg_id)
    assert wait_for(lambda: "hello group" in people["carol"].events.texts(), 10)
    assert wait_for(lambda: STATUS_DELIVERED in _marks(people["alice"], msg_id), 10)


def test_a_message_that_does_not_open_is_reported_on_both_sides(
    people: People, relay: FakeRelay
) -> None:
    _published(people["bob"])
    conv = people.conv("alice", "bob")
    people["alice"].messenger.send_text(conv, "first")
    assert wait_for(lambda: "first" in people["bob"].events.texts(), 10)
    relay.corrupt_next.add(people["alice"].identity.public.dh)  # the next one arrives broken
    people["alice"].messenger.send_text(conv, "second")
    assert wait_for(
        lambda: any("rejected a message" in n for n in people["bob"].events.notices()), 10
    )
    assert wait_for(
        lambda: any("could not open your message" in n for n in people["alice"].events.notices()),
        10,
    ), people["alice"].events.notices()


# --- 12: no silent downgrade -----------------------------------------------------------------


def test_withheld_prekeys_of_a_peer_seen_with_them_hold_the_message(
    people: People, relay: FakeRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "HELD_RETRY", 0.3)
    bob = people["bob"]
    _published(bob)
    _saw_prekeys_before(people.home, "alice", bob.identity.public)
    alice = people["alice"]
    relay.withhold_bundles.add(bob.identity.public.dh)
    conv = people.conv("alice", "bob")
    alice.messenger.send_text(conv, "not without your prekeys")
    assert wait_for(lambda: any("holding the message" in n for n in alice.events.notices()), 10)
    assert alice.messenger.pending() == 1
    time.sleep(1.0)
    assert "not without your prekeys" not in bob.events.texts()
    relay.withhold_bundles.clear()  # the relay gives in: the held message goes, with prekeys
    assert wait_for(lambda: "not without your prekeys" in bob.events.texts(), 15)
    assert not any("without your prekeys" in n for n in bob.events.notices())
    assert wait_for(lambda: alice.messenger.pending() == 0, 10)


def _saw_prekeys_before(home: Path, name: str, peer: keys.PublicIdentity) -> None:
    """``name``'s store remembers ``peer`` with prekeys (an earlier run fetched a bundle;
    the in-memory rule from fetch to "seen" is tests/unit/test_client_session.py's)."""
    store = open_store(keystore.load_identity(str(home / f"{name}.key")))
    try:
        with store.transaction():
            store.put_json(prekeys.PREKEY_PEERS, [peer.dh.hex()])
    finally:
        store.close()


def test_an_offline_first_message_waits_for_the_bundle(
    sc_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held while offline, sealed with bob's bundle once the relay and bob are back.

    alice has seen bob with prekeys before: for a peer never seen with any, a "none"
    answer (alice may ask before bob has published) is the documented no-prekey
    start, and the test would race bob's publish against alice's reconnection.
    """
    monkeypatch.setattr(session_module, "HELD_RETRY", 0.3)
    make_identities(sc_home, "alice", "bob")
    _saw_prekeys_before(sc_home, "alice", _public(sc_home, "bob"))
    probe = FakeRelay(seed=2, attack_rate=0.0)
    port = int(probe.address.rsplit(":", 1)[1])
    probe.close()  # a port nothing listens on, yet
    alice = Client(sc_home, "alice", f"127.0.0.1:{port}", None)
    relay: FakeRelay | None = None
    bob: Client | None = None
    try:
        conv = Conversation.with_peers(alice.identity.public, [_public(sc_home, "bob")])
        alice.messenger.send_text(conv, "sent while offline")
        assert alice.store.held_count() == 1 and not alice.store.outbox()
        assert any("offline" in n for n in alice.events.notices())
        relay = FakeRelay(seed=2, attack_rate=0.0, port=port)
        bob = Client(sc_home, "bob", relay.address, relay.public)
        assert bob.messenger.wait_connected(10)
        _published(bob)
        assert wait_for(lambda: "sent while offline" in bob.events.texts(), 30)
        assert not any("without your prekeys" in n for n in bob.events.notices())
    finally:
        alice.stop()
        if bob is not None:
            bob.stop()
        if relay is not None:
            relay.close()


def _public(home: Path, name: str) -> keys.PublicIdentity:
    return keystore.load_public(str(home / f"{name}.pub"))


def test_a_no_prekey_start_is_flagged_by_a_recipient_with_prekeys(
    people: People, relay: FakeRelay
) -> None:
    bob = people["bob"]
    _published(bob)
    relay.withhold_bundles.add(bob.identity.public.dh)  # alice never saw bob's prekeys
    people["alice"].messenger.send_text(people.conv("alice", "bob"), "weak start")
    assert wait_for(lambda: "weak start" in bob.events.texts(), 10)
    assert any("without your prekeys" in n for n in bob.events.notices())


# --- 10: idle is free ----------------------------------------------------------------------------


def test_an_idle_client_publishes_once_and_writes_nothing(people: People, relay: FakeRelay) -> None:
    alice = people["alice"]
    _published(alice)
    wal = Path(str(alice.store.path) + "-wal")
    before = (relay.received.get("PublishPrekeys", 0), wal.stat().st_size, alice.store.path.stat())
    time.sleep(3.0)
    after = (relay.received.get("PublishPrekeys", 0), wal.stat().st_size, alice.store.path.stat())
    assert before[0] == after[0] == 1, relay.received
    assert before[1] == after[1] and before[2].st_mtime_ns == after[2].st_mtime_ns


# --- 1: a far-future first message --------------------------------------------------------------


def test_a_far_future_first_message_neither_kills_nor_poisons(
    people: People, relay: FakeRelay
) -> None:
    victim = people["bob"]
    _published(victim)
    for sent in (2**64 - 1, 2**64 - 2):
        mallory = E2EState.new(_throwaway())  # a new throwaway identity each time
        content = Content(os.urandom(16), sent, "poison")
        payload = mallory.encrypt(victim.identity.public, content, os.urandom, sent)
        frame = wire.Deliver(content.msg_id, mallory.identity.public.dh, 0, payload)
        relay._push(wire.mailbox_address(victim.identity.public.dh), [frame])
    assert wait_for(lambda: len(victim.events.notices()) >= 2, 10), victim.events.notices()
    assert victim.messenger.fatal is None
    people["alice"].messenger.send_text(people.conv("alice", "bob"), "still works")
    assert wait_for(lambda: "still works" in victim.events.texts(), 10)


def _throwaway() -> keys.Identity:
    return keys.generate_identity("mallory", os.urandom(64))


def test_a_dying_network_thread_fails_the_command(
    sc_home: Path,
    relay: FakeRelay,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_identities(sc_home, "alice")
    relay_pub = sc_home / "relay.pub"
    relay_pub.write_text(encoding.encode_token("screlay1", relay.public) + "\n")

    def broken(self: ClientSession, frames: object, now_ms: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ClientSession, "receive", broken)
    code = cli.main(
        [
            "receive",
            "--key",
            "alice",
            "--relay",
            relay.address,
            "--relay-key",
            str(relay_pub),
            "--timeout",
            "3",
        ]
    )
    assert code == 11
    assert "network thread failed" in capsys.readouterr().err


def test_send_fails_when_the_relay_refuses_a_message_for_good(
    sc_home: Path, relay: FakeRelay, capsys: pytest.CaptureFixture[str]
) -> None:
    make_identities(sc_home, "alice", "bob")
    relay_pub = sc_home / "relay.pub"
    relay_pub.write_text(encoding.encode_token("screlay1", relay.public) + "\n")
    relay.refuse_too_large = True
    code = cli.main(
        [
            "send",
            "--key",
            "alice",
            "--peer",
            "bob",
            "--relay",
            relay.address,
            "--relay-key",
            str(relay_pub),
            "-m",
            "refused",
            "--timeout",
            "5",
        ]
    )
    assert code == 8, capsys.readouterr().err
    assert "refused 1 of 1 message(s) for good" in capsys.readouterr().err
