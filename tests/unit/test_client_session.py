"""The client's rules in memory: :class:`ClientSession`, no socket, no thread, no clock.

Each test drives real sessions (real E2E crypto, real SQLite stores in tmp_path)
through ``MemoryRelay``, a relay double that routes the frames the sessions return
the way docs/protocol.md section 3 says a relay does, and can be told to lie.
One test per rule of the session (docs/protocol.md, section 5), and the attacks a
relay can try on each.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from securechat.client import receipts, session
from securechat.client.events import (
    EVENT_TYPES,
    ConnectionEvent,
    Event,
    MessageEvent,
    NoticeEvent,
    Output,
    PresenceEvent,
    Status,
    StatusEvent,
    event_dict,
)
from securechat.client.peers import Conversation
from securechat.client.prekeys import FETCH_TIMEOUT, MAX_IN_FLIGHT, PREKEY_PEERS
from securechat.client.session import ClientSession, LinkState
from securechat.client.store import ClientStore, StoreKeys
from securechat.core import envelope, keys, wire
from securechat.core.e2e import E2EState
from securechat.errors import InUseError, PeerKeyChangedError, StorageError, UsageError

from paths import REPO

T0 = 1_700_000_000_000  # a wall clock in ms; every test moves it by hand


def _identity(name: str) -> keys.Identity:
    return keys.generate_identity(name, hashlib.sha512(f"session test {name}".encode()).digest())


@dataclass
class Party:
    """One identity's session and everything it reported."""

    name: str
    session: ClientSession
    store: ClientStore
    events: list[Event] = field(default_factory=list)

    @property
    def identity(self) -> keys.Identity:
        return self.session.identity

    @property
    def public(self) -> keys.PublicIdentity:
        return self.session.identity.public

    def texts(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, MessageEvent)]

    def notices(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, NoticeEvent)]

    def marks(self, msg_id: bytes) -> list[Status]:
        return [e.status for e in self.events if isinstance(e, StatusEvent) and e.msg_id == msg_id]


@dataclass
class MemoryRelay:
    """Routes frames between online sessions as the relay does; stores for offline ones."""

    now: int = T0
    online: dict[bytes, Party] = field(default_factory=dict)  # mailbox -> party
    stored: dict[bytes, list[wire.Deliver]] = field(default_factory=dict)
    bundles: dict[bytes, tuple[bytes, list[bytes]]] = field(default_factory=dict)
    acked: list[tuple[bytes, bytes]] = field(default_factory=list)
    sent: list[tuple[str, wire.Frame]] = field(default_factory=list)  # what each party wrote
    # lies the relay can be told to tell
    withhold: set[bytes] = field(default_factory=set)  # answer "no bundle" for these
    silent: set[bytes] = field(default_factory=set)  # never answer FetchPrekeys for these
    drop_sends: bool = False  # accept (Accepted) and drop, as a lying relay would

    def connect(self, party: Party) -> None:
        """The party's link comes up: outbox first, then what the relay stored, then Synced."""
        self.online[wire.mailbox_address(party.public.dh)] = party
        self.route(party, party.session.connection_made(self.now))
        self.push(party, [wire.PrekeyCount(len(self.bundles.get(party.public.dh, (b"", []))[1]))])
        waiting = self.stored.pop(wire.mailbox_address(party.public.dh), [])
        self.push(party, [*waiting, wire.Synced()])

    def disconnect(self, party: Party) -> None:
        del self.online[wire.mailbox_address(party.public.dh)]
        party.session.connection_lost()

    def push(self, party: Party, frames: list[wire.Frame]) -> None:
        """Frames from the relay to ``party``; what it answers is routed in turn."""
        self.route(party, party.session.receive(frames, self.now))

    def tick(self, party: Party, seconds: float) -> None:
        self.now += int(seconds * 1000)
        self.route(party, party.session.tick(self.now))

    def route(self, party: Party, out: Output) -> None:
        party.events += out.events
        if party.session.link is not LinkState.ONLINE:
            return  # the pump writes nothing while offline
        for frame in out.frames:
            self.sent.append((party.name, frame))
            self._handle(party, frame)

    def _handle(self, party: Party, frame: wire.Frame) -> None:
        me = party.public.dh
        if isinstance(frame, wire.Send):
            self._deliver(party, frame.msg_id, [(frame.mailbox, frame.payload)])
        elif isinstance(frame, wire.SendMulti):
            self._deliver(party, frame.msg_id, list(frame.recipients))
        elif isinstance(frame, wire.Ack):
            self.acked += frame.entries
        elif isinstance(frame, wire.PublishPrekeys):
            signed, otks = self.bundles.get(me, (b"", []))
            self.bundles[me] = (frame.signed_prekey or signed, otks + list(frame.one_time_prekeys))
            self.push(party, [wire.PrekeyCount(len(self.bundles[me][1]))])
        elif isinstance(frame, wire.FetchPrekeys):
            if frame.identity_key in self.silent:
                return
            signed, otks = self.bundles.get(frame.identity_key, (b"", []))
            if frame.identity_key in self.withhold or not signed:
                self.push(party, [wire.Prekeys(frame.identity_key, b"", None)])
            else:
                otk = otks.pop(0) if otks else None
                self.push(party, [wire.Prekeys(frame.identity_key, signed, otk)])

    def _deliver(self, party: Party, msg_id: bytes, copies: list[tuple[bytes, bytes]]) -> None:
        self.push(party, [wire.Accepted(msg_id, wire.STATUS_STORED)])
        if self.drop_sends:
            return
        for mailbox, payload in copies:
            deliver = wire.Deliver(msg_id, party.public.dh, self.now, payload)
            target = self.online.get(mailbox)
            if target is None:
                self.stored.setdefault(mailbox, []).append(deliver)
            else:
                self.push(target, [deliver])

    def frames_of(self, name: str, kind: type) -> list[wire.Frame]:
        return [f for who, f in self.sent if who == name and isinstance(f, kind)]


@pytest.fixture
def relay() -> MemoryRelay:
    return MemoryRelay()


@pytest.fixture
def make(tmp_path: Path, sc_home: Path) -> Iterator[object]:
    stores: list[ClientStore] = []

    def _make(name: str, **options: object) -> Party:
        ident = _identity(name)
        store = ClientStore(tmp_path / f"{name}.state.db", StoreKeys.of(ident))
        stores.append(store)
        return Party(name, ClientSession(ident, store, os.urandom, **options), store)  # type: ignore[arg-type]

    yield _make
    for store in stores:
        store.close()


def _conv(me: Party, *peers: Party) -> Conversation:
    return Conversation.with_peers(me.public, [p.public for p in peers])


def _restart(relay: MemoryRelay, party: Party) -> None:
    """The process restarts: a new session on the same store, connected again."""
    if party.session.link is LinkState.ONLINE:
        relay.disconnect(party)
    party.session = ClientSession(party.identity, party.store, os.urandom)
    relay.connect(party)


def _send(relay: MemoryRelay, party: Party, conv: Conversation, text: str) -> bytes:
    msg_id, out = party.session.send_text(conv, text, relay.now)
    relay.route(party, out)
    return msg_id


@pytest.fixture
def pair(make: object, relay: MemoryRelay) -> tuple[Party, Party]:
    """alice and bob online, both with prekeys published."""
    alice, bob = make("alice"), make("bob")  # type: ignore[operator]
    relay.connect(alice)
    relay.connect(bob)
    return alice, bob


@pytest.fixture
def trio(pair: tuple[Party, Party], make: object, relay: MemoryRelay) -> tuple[Party, ...]:
    """alice, bob and carol online, all with prekeys published."""
    carol = make("carol")  # type: ignore[operator]
    relay.connect(carol)
    return (*pair, carol)


# --- sending and receiving ----------------------------------------------------------------------


def test_a_message_goes_out_is_accepted_delivered_and_marked_end_to_end(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    msg_id = _send(relay, alice, _conv(alice, bob), "hello bob")
    assert bob.texts() == ["hello bob"]
    assert alice.marks(msg_id) == [Status.ACCEPTED, Status.DELIVERED]  # ✓ relay, ✓✓ device
    assert alice.session.pending() == 0 and bob.session.pending() == 0
    assert (alice.public.dh, msg_id) in relay.acked  # bob acknowledged it
    (entry,) = alice.session.history(_conv(alice, bob).conv_id, 10)
    assert entry["status"] == Status.DELIVERED and entry["text"] == "hello bob"
    # the receipt is a message of its own, never shown and never answered
    assert alice.texts() == [] and len(relay.frames_of("alice", wire.Send)) == 1


def test_the_first_message_waits_for_the_bundle_without_a_word(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    """Online, a message to a peer with no session asks for its bundle; no notice, no wait."""
    alice, bob = pair
    relay.silent.add(bob.public.dh)
    msg_id, out = alice.session.send_text(_conv(alice, bob), "first", relay.now)
    assert [type(f) for f in out.frames] == [wire.FetchPrekeys] and out.events == []
    assert alice.session.pending() == 1 and alice.store.held_count() == 1
    relay.route(alice, out)
    relay.silent.clear()
    signed, otks = relay.bundles[bob.public.dh]
    relay.push(alice, [wire.Prekeys(bob.public.dh, signed, otks[0])])
    assert bob.texts() == ["first"] and alice.store.held_count() == 0
    assert Status.DELIVERED in alice.marks(msg_id) and alice.notices() == []


def test_offline_sends_are_queued_and_the_outbox_goes_first_on_reconnect(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    _send(relay, alice, _conv(alice, bob), "online")
    relay.disconnect(alice)
    ids = [_send(relay, alice, _conv(alice, bob), f"offline {n}") for n in range(3)]
    assert alice.session.pending() == 3 and bob.texts() == ["online"]
    out = alice.session.connection_made(relay.now)
    assert [f.msg_id for f in out.frames if isinstance(f, wire.Send)] == ids  # in order
    relay.online[wire.mailbox_address(alice.public.dh)] = alice
    relay.route(alice, out)
    assert bob.texts() == ["online", "offline 0", "offline 1", "offline 2"]
    assert alice.session.pending() == 0


def test_a_resent_message_is_shown_once(pair: tuple[Party, Party], relay: MemoryRelay) -> None:
    """The relay may deliver twice (a reconnect before the Ack): the copy is acked, not shown."""
    alice, bob = pair
    _send(relay, alice, _conv(alice, bob), "once")
    deliver = next(f for who, f in relay.sent if who == "alice" and isinstance(f, wire.Send))
    assert isinstance(deliver, wire.Send)
    again = wire.Deliver(deliver.msg_id, alice.public.dh, relay.now, deliver.payload)
    out = bob.session.receive([again], relay.now)
    assert out.events == [] and bob.texts() == ["once"]
    assert wire.Ack(((alice.public.dh, deliver.msg_id),)) in out.frames


def test_nothing_is_acknowledged_before_it_is_committed(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    relay.disconnect(bob)
    _send(relay, alice, _conv(alice, bob), "keep me")
    (deliver,) = relay.stored[wire.mailbox_address(bob.public.dh)]
    add = bob.store.history_add

    def disk_full(*args: object, **kwargs: object) -> bool:
        raise StorageError("disk full")

    bob.store.history_add = disk_full  # type: ignore[method-assign]
    bob.session.connection_made(relay.now)
    with pytest.raises(StorageError):  # the pump dies with it: no Ack was returned
        bob.session.receive([deliver], relay.now)
    bob.store.history_add = add  # type: ignore[method-assign]
    restarted = ClientSession(bob.identity, bob.store, os.urandom)  # state as on disk
    restarted.connection_made(relay.now)
    out = restarted.receive([deliver], relay.now)  # the relay delivers it again
    assert [e.text for e in out.events if isinstance(e, MessageEvent)] == ["keep me"]
    assert wire.Ack(((alice.public.dh, deliver.msg_id),)) in out.frames


def test_a_send_only_client_leaves_messages_with_the_relay(
    make: object, relay: MemoryRelay
) -> None:
    alice, bob = make("alice"), make("bob", receive=False)  # type: ignore[operator]
    relay.connect(alice)
    relay.connect(bob)
    _send(relay, alice, _conv(alice, bob), "for later")
    assert bob.texts() == [] and relay.acked == []


def test_a_changed_key_is_refused_before_anything_is_stored(
    pair: tuple[Party, Party], relay: MemoryRelay, make: object
) -> None:
    alice, bob = pair
    _send(relay, alice, _conv(alice, bob), "hi")
    impostor = keys.generate_identity("bob", os.urandom(64)).public
    conv = Conversation.with_peers(alice.public, [impostor])
    with pytest.raises(PeerKeyChangedError) as refused:
        alice.session.send_text(conv, "to the impostor", relay.now)
    assert refused.value.hint and "securechat trust bob" in refused.value.hint
    assert alice.session.pending() == 0
    assert list(alice.session.check_peers([impostor])) == ["bob"]


def test_a_group_message_is_delivered_once_every_member_confirmed(
    trio: tuple[Party, ...], relay: MemoryRelay
) -> None:
    alice, bob, carol = trio
    relay.disconnect(carol)
    msg_id = _send(relay, alice, _conv(alice, bob, carol), "hello group")
    assert bob.texts() == ["hello group"]
    assert alice.marks(msg_id) == [Status.ACCEPTED]  # bob's receipt alone is not enough
    relay.connect(carol)
    assert carol.texts() == ["hello group"]
    assert alice.marks(msg_id) == [Status.ACCEPTED, Status.DELIVERED]
    group = next(e for e in bob.events if isinstance(e, MessageEvent))
    assert group.group and group.conv == _conv(alice, bob, carol).conv_id


# --- no silent downgrade: prekeys ------------------------------------------------------------


def test_no_bundle_for_a_peer_never_seen_with_one_is_the_documented_start(
    make: object, relay: MemoryRelay
) -> None:
    alice, bob = make("alice"), make("bob")  # type: ignore[operator]
    relay.connect(alice)  # bob never connected: he has no prekeys at the relay
    _send(relay, alice, _conv(alice, bob), "no-prekey start")
    assert alice.store.held_count() == 0 and len(relay.frames_of("alice", wire.Send)) == 1
    relay.connect(bob)
    assert bob.texts() == ["no-prekey start"]
    assert any("without your prekeys" in n for n in bob.notices())  # bob had published


def test_a_peer_seen_with_prekeys_is_never_started_without(
    pair: tuple[Party, Party], relay: MemoryRelay, make: object
) -> None:
    alice, bob = pair
    carol = make("carol")  # type: ignore[operator]
    relay.connect(carol)
    _send(relay, alice, _conv(alice, carol), "seen")  # alice fetches carol's bundle once
    assert alice.store.get_json(PREKEY_PEERS) == [carol.public.dh.hex()]
    # As if an earlier run had fetched bob's bundle too (the set is kept in the store).
    alice.store.put_json(PREKEY_PEERS, [carol.public.dh.hex(), bob.public.dh.hex()])
    _restart(relay, alice)
    relay.withhold.add(bob.public.dh)
    _send(relay, alice, _conv(alice, bob), "not without your prekeys")
    assert any("holding the message" in n for n in alice.notices())
    assert alice.store.held_count() == 1 and bob.texts() == []
    relay.tick(alice, session.HELD_RETRY)  # still withheld: asked again, still held
    assert alice.store.held_count() == 1
    assert sum("holding" in n for n in alice.notices()) == 1  # told once, not every retry
    relay.withhold.clear()
    relay.tick(alice, session.HELD_RETRY)
    assert bob.texts() == ["not without your prekeys"] and alice.store.held_count() == 0
    assert not any("without your prekeys" in n for n in bob.notices())


def test_a_forged_bundle_holds_the_message(pair: tuple[Party, Party], relay: MemoryRelay) -> None:
    alice, bob = pair
    relay.silent.add(bob.public.dh)
    _send(relay, alice, _conv(alice, bob), "forged?")
    mallory = E2EState.new(_identity("mallory"))
    signed, _ = mallory.make_prekeys(os.urandom, relay.now, one_time=0)
    relay.push(alice, [wire.Prekeys(bob.public.dh, signed, None)])  # not signed by bob
    assert any("did not sign" in n for n in alice.notices())
    assert alice.store.held_count() == 1 and bob.texts() == []


def test_a_relay_that_does_not_answer_is_reported_and_asked_again(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    relay.silent.add(bob.public.dh)
    _send(relay, alice, _conv(alice, bob), "anyone?")
    relay.tick(alice, FETCH_TIMEOUT - 0.5)
    assert alice.notices() == []
    relay.tick(alice, 1.0)
    assert alice.notices() == ["waiting to send: the relay did not answer for bob's prekeys"]
    relay.silent.clear()
    relay.tick(alice, session.HELD_RETRY)
    assert bob.texts() == ["anyone?"]


def test_a_bundle_nobody_asked_for_is_ignored(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    signed, otks = relay.bundles[bob.public.dh]
    out = alice.session.receive([wire.Prekeys(bob.public.dh, signed, otks[0])], relay.now)
    assert out.frames == [] and out.events == []
    assert alice.store.get_json(PREKEY_PEERS) is None  # not even "seen"
    _send(relay, alice, _conv(alice, bob), "hi")  # and not kept: a message asks for its own
    assert len(relay.frames_of("alice", wire.FetchPrekeys)) == 1


def test_a_conversation_keeps_its_order_and_does_not_block_another(
    trio: tuple[Party, ...], relay: MemoryRelay
) -> None:
    alice, bob, carol = trio
    relay.silent.add(bob.public.dh)
    _send(relay, alice, _conv(alice, bob), "bob 1")
    _send(relay, alice, _conv(alice, bob), "bob 2")  # behind bob 1, silently
    _send(relay, alice, _conv(alice, carol), "carol 1")  # another conversation: not blocked
    assert carol.texts() == ["carol 1"] and bob.texts() == []
    assert alice.notices() == []
    relay.silent.clear()
    relay.tick(alice, session.HELD_RETRY)
    assert bob.texts() == ["bob 1", "bob 2"]


def test_a_whole_group_is_asked_at_once_within_the_bound(make: object, relay: MemoryRelay) -> None:
    alice = make("alice")  # type: ignore[operator]
    relay.connect(alice)
    members = [keys.generate_identity(f"m{i}", os.urandom(64)).public for i in range(63)]
    others = [keys.generate_identity(f"o{i}", os.urandom(64)).public for i in range(10)]
    for peer in [*members, *others]:
        relay.silent.add(peer.dh)
    _send(relay, alice, Conversation.with_peers(alice.public, members), "group")
    _send(relay, alice, Conversation.with_peers(alice.public, others), "others")
    fetches = relay.frames_of("alice", wire.FetchPrekeys)
    assert len(fetches) == MAX_IN_FLIGHT  # 63 + 1: the rest wait for answers


def test_an_offline_send_says_why_once(make: object, relay: MemoryRelay) -> None:
    alice, bob = make("alice"), make("bob")  # type: ignore[operator]
    for text in ("one", "two"):
        _send(relay, alice, _conv(alice, bob), text)
    assert alice.notices() == ["waiting to send: offline: the message to bob waits for the relay"]
    assert alice.session.pending() == 2


# --- receipts owed, forgeries -----------------------------------------------------------------


def test_a_forgery_is_reported_acked_and_answered_at_most_once_a_minute(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    _send(relay, alice, _conv(alice, bob), "a real one")  # bob has a session with alice
    (real,) = [f.msg_id for f in relay.frames_of("alice", wire.Send)]
    # The relay reuses the real id with junk bytes, then makes up four more.
    forged = [wire.Deliver(real, alice.public.dh, relay.now, b"\x00" * 200)] + [
        wire.Deliver(os.urandom(16), alice.public.dh, relay.now, b"\x00" * 200) for _ in range(4)
    ]
    before = len(relay.frames_of("bob", wire.Send))
    relay.push(bob, forged)
    assert sum("rejected a message claiming to be from" in n for n in bob.notices()) == 5
    assert all((alice.public.dh, f.msg_id) in relay.acked for f in forged)
    assert len(relay.frames_of("bob", wire.Send)) == before + 1  # one REJECTED, not five
    assert any("could not open your message" in n for n in alice.notices())
    relay.now += int(receipts.REJECT_INTERVAL * 1000)
    relay.push(bob, [wire.Deliver(os.urandom(16), alice.public.dh, relay.now, b"\x01" * 200)])
    assert len(relay.frames_of("bob", wire.Send)) == before + 2  # a minute later: one more


def test_a_stranger_gets_no_answer_for_a_forgery(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    _, bob = pair
    stranger = _identity("stranger").public.dh
    relay.push(bob, [wire.Deliver(os.urandom(16), stranger, relay.now, b"junk" * 40)])
    assert any("unknown key" in n for n in bob.notices())
    assert relay.frames_of("bob", wire.Send) == []  # no session to say it through


def test_receipts_for_messages_we_did_not_send_them_are_ignored(
    trio: tuple[Party, ...], relay: MemoryRelay
) -> None:
    """bob confirms a message alice sent to carol only: it does not become ✓✓."""
    alice, bob, carol = trio
    relay.disconnect(carol)
    to_carol = _send(relay, alice, _conv(alice, carol), "for carol")
    _send(relay, bob, _conv(bob, alice), "bob opens a session")
    receipt = envelope.control(envelope.CONTENT_RECEIPT, os.urandom(16), relay.now, [to_carol])
    payload = bob.session.state.encrypt(alice.public, receipt, os.urandom, relay.now)
    relay.push(alice, [wire.Deliver(receipt.msg_id, bob.public.dh, relay.now, payload)])
    assert alice.marks(to_carol) == [Status.ACCEPTED]


# --- the relay's words -------------------------------------------------------------------------


def test_prekeys_are_published_once_per_connection_then_only_when_low(
    make: object, relay: MemoryRelay
) -> None:
    alice = make("alice")  # type: ignore[operator]
    relay.connect(alice)
    assert len(relay.frames_of("alice", wire.PublishPrekeys)) == 1  # the first count: 0 < 20
    relay.push(alice, [wire.PrekeyCount(session.PREKEY_LOW_WATER)])
    assert len(relay.frames_of("alice", wire.PublishPrekeys)) == 1  # enough: no answer
    relay.push(alice, [wire.PrekeyCount(session.PREKEY_LOW_WATER - 1)])
    (*_, last) = relay.frames_of("alice", wire.PublishPrekeys)
    assert isinstance(last, wire.PublishPrekeys)
    assert len(last.one_time_prekeys) == session.PREKEY_TARGET - session.PREKEY_LOW_WATER + 1
    relay.disconnect(alice)
    relay.connect(alice)  # a new connection publishes again, once
    assert len(relay.frames_of("alice", wire.PublishPrekeys)) == 3


def test_an_idle_client_writes_nothing(pair: tuple[Party, Party], relay: MemoryRelay) -> None:
    alice, _ = pair
    writes: list[object] = []
    begin = alice.store.transaction

    def spy() -> object:
        writes.append(1)
        return begin()

    alice.store.transaction = spy  # type: ignore[method-assign]
    sent = len(relay.sent)
    for _ in range(100):
        relay.tick(alice, 0.2)  # the pump's poll interval, 20 s idle
    assert writes == [] and len(relay.sent) == sent


def test_the_signed_prekey_is_rotated_when_due(make: object, relay: MemoryRelay) -> None:
    alice = make("alice")  # type: ignore[operator]
    relay.connect(alice)
    published = len(relay.frames_of("alice", wire.PublishPrekeys))
    relay.tick(alice, session.ROTATION_CHECK)  # checked hourly, not due yet
    assert len(relay.frames_of("alice", wire.PublishPrekeys)) == published
    relay.now += 8 * 24 * 3600 * 1000
    relay.tick(alice, session.ROTATION_CHECK)
    assert len(relay.frames_of("alice", wire.PublishPrekeys)) == published + 1


def test_replaced_is_fatal(pair: tuple[Party, Party], relay: MemoryRelay) -> None:
    alice, _ = pair
    relay.push(alice, [wire.Error(wire.REPLACED, wire.NO_ID, "replaced")])
    assert isinstance(alice.session.fatal, InUseError)
    assert alice.session.fatal.hint and "one client per identity" in alice.session.fatal.hint


def test_too_large_leaves_the_outbox_and_is_remembered(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    _send(relay, alice, _conv(alice, bob), "a session first")
    relay.disconnect(alice)
    msg_id = _send(relay, alice, _conv(alice, bob), "big")
    alice.session.connection_made(relay.now)
    relay.push(alice, [wire.Error(wire.TOO_LARGE, msg_id, "payload too large")])
    assert alice.session.pending() == 0 and alice.session.refused[msg_id] == "payload too large"
    assert any("too large" in n for n in alice.notices())


def test_a_refusal_keeps_the_message_and_resends_it_later(
    pair: tuple[Party, Party], relay: MemoryRelay
) -> None:
    alice, bob = pair
    _send(relay, alice, _conv(alice, bob), "a session first")
    relay.disconnect(alice)
    msg_id = _send(relay, alice, _conv(alice, bob), "try again")
    alice.session.connection_made(relay.now)  # (the resend of this connection is lost)
    relay.online[wire.mailbox_address(alice.public.dh)] = alice
    relay.push(alice, [wire.Error(wire.RATE_LIMITED, msg_id, "slow down")])
    assert alice.session.pending() == 1 and bob.texts() == ["a session first"]
    relay.tick(alice, session.RETRY_AFTER_REFUSAL - 0.5)
    assert bob.texts() == ["a session first"]
    relay.tick(alice, 1.0)
    assert bob.texts() == ["a session first", "try again"] and alice.session.pending() == 0


def test_presence_is_reported_for_watched_peers_only(make: object, relay: MemoryRelay) -> None:
    bob = _identity("bob").public
    alice = make("alice", watch=[bob])  # type: ignore[operator]
    out = alice.session.connection_made(relay.now)
    assert out.frames[0] == wire.PresenceSubscribe((bob.dh,))
    stranger = _identity("stranger").public.dh
    out = alice.session.receive([wire.Presence(bob.dh, True), wire.Presence(stranger, True)], 0)
    assert out.events == [PresenceEvent("bob", True)]
    assert alice.session.watch([]).frames == [wire.PresenceSubscribe(())]


def test_a_relay_cannot_forge_delivered(pair: tuple[Party, Party], relay: MemoryRelay) -> None:
    """Accepted(DELIVERED) from the relay, and the frame dropped: ✓ only."""
    alice, bob = pair
    relay.drop_sends = True
    msg_id = _send(relay, alice, _conv(alice, bob), "lost")
    relay.push(alice, [wire.Accepted(msg_id, wire.STATUS_DELIVERED), wire.Delivered(msg_id, b"")])
    assert alice.marks(msg_id) == [Status.ACCEPTED]


def test_a_group_too_big_for_one_frame_is_refused_with_a_hint(
    make: object, relay: MemoryRelay
) -> None:
    alice = make("alice")  # type: ignore[operator]
    members = [keys.generate_identity(f"m{i}", os.urandom(64)).public for i in range(63)]
    with pytest.raises(UsageError, match=r"at most \d+ bytes") as refused:
        alice.session.send_text(
            Conversation.with_peers(alice.public, members), "x" * 16_000, relay.now
        )
    assert refused.value.hint and alice.session.pending() == 0


# --- helpers of the rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "now", "expected"),
    [(1000, 1999, False), (1000, 2000, True), (1000, 999, True)],  # a clock that went back: due
)
def test_due_counts_a_clock_that_went_back_as_due(last: int, now: int, expected: bool) -> None:
    assert receipts.due(last, 1.0, now) is expected


def test_every_event_is_json_with_a_stable_type() -> None:
    samples: list[Event] = [
        MessageEvent("dm-1", b"\x01" * 16, "bob", "fp", True, T0, "hi", False),
        StatusEvent(b"\x02" * 16, Status.DELIVERED),
        ConnectionEvent(True, "connected"),
        NoticeEvent("careful", error=True),
        PresenceEvent("bob", False),
    ]
    assert {type(e) for e in samples} == set(EVENT_TYPES)
    dicts = [json.loads(json.dumps(event_dict(e))) for e in samples]
    assert [d["type"] for d in dicts] == ["message", "status", "connection", "notice", "presence"]
    assert dicts[0]["msg_id"] == "01" * 16 and dicts[1]["status"] == "delivered"


SANS_IO = ("session", "outgoing", "prekeys", "receipts", "events", "e2e_store")
WORLD = {"socket", "selectors", "threading", "asyncio", "time", "random", "subprocess", "signal"}


@pytest.mark.parametrize("name", SANS_IO)
def test_the_session_modules_touch_no_socket_thread_or_clock(name: str) -> None:
    """The rules take the store, the time and the randomness from their caller."""
    tree = ast.parse((REPO / "securechat" / "client" / f"{name}.py").read_text())
    found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m.split(".")[0] for m in found} & WORLD, found
