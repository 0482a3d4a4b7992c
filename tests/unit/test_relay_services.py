"""The relay's prekey, presence, keep-alive and invite rules in memory (``relay/services.py``).

Budgets here are the shared ones (``guard.Budgets``, per identity and per prefix):
a frame over its budget is held, not refused; ``test_relay_intake.py`` has how a
hold runs out.
"""

from __future__ import annotations

import os

from securechat.core import dh, wire
from securechat.relay.conn import OPEN, Conn
from securechat.relay.mailboxes import Publish, TakePrekeys

from relay_memory import MemoryRelay

OTK = b"o" * wire.ONE_TIME_PREKEY_SIZE


def online(relay: MemoryRelay, private: bytes | None = None, **kw: object) -> Conn:
    conn = relay.connect(private, **kw)  # type: ignore[arg-type]
    relay.commit()
    relay.received(conn)
    return conn


def otks(n: int) -> tuple[bytes, ...]:
    return tuple(i.to_bytes(4, "big") + bytes(32) for i in range(n))


# --- PublishPrekeys -------------------------------------------------------------------------------
def test_publish_answers_the_count_only_when_something_changed() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    relay.send(bob, wire.PublishPrekeys(b"spk", otks(3)))
    (publish,) = relay.store.of(Publish)
    assert (publish.identity, publish.spk, publish.otks) == (bob.identity, b"spk", otks(3))
    assert relay.received(bob) == []  # after COMMIT, not before
    relay.commit()
    assert relay.received(bob) == [wire.PrekeyCount(3)]
    relay.send(bob, wire.PublishPrekeys(b"spk", ()))  # the same bundle again
    relay.commit()
    assert relay.received(bob) == []  # no answer: a client publishing on every count stops


def test_one_time_prekeys_without_a_signed_prekey_close_the_connection() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    relay.send(bob, wire.PublishPrekeys(b"", otks(2)))
    relay.commit()
    (error,) = relay.received(bob)
    assert isinstance(error, wire.Error) and error.code == wire.BAD_FRAME
    assert bob.state != OPEN
    assert relay.store.prekey_count(bob.identity or b"") == 0


def test_a_publish_the_store_could_not_commit_is_an_error() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    relay.send(bob, wire.PublishPrekeys(b"spk", otks(1)))
    relay.store.answer(relay.store.of(Publish)[0], None)
    relay.run()
    (error,) = relay.received(bob)
    assert isinstance(error, wire.Error) and error.code == wire.STORE_FAILED


# --- FetchPrekeys ---------------------------------------------------------------------------------
def test_fetch_hands_out_one_time_prekeys_within_the_targets_budget_then_the_signed_one() -> None:
    """The attack: one requester cannot drain someone's one-time prekeys."""
    relay = MemoryRelay(otk_burst=2.0, otk_per_hour=1.0)
    owner_key = dh.public_key(os.urandom(32))
    relay.store.backend.publish_prekeys(owner_key, b"spk", otks(10))
    asker = online(relay)
    for _ in range(3):
        relay.send(asker, wire.FetchPrekeys(owner_key))
    assert [r.one_time for r in relay.store.of(TakePrekeys)] == [True, True, False]
    relay.commit()
    bundles = relay.received(asker)
    assert [b.one_time_prekey is not None for b in bundles] == [True, True, False]
    assert all(b.signed_prekey == b"spk" for b in bundles)  # never "no bundle"


def test_an_identity_without_prekeys_gets_no_bundle() -> None:
    relay = MemoryRelay()
    asker = online(relay)
    nobody = dh.public_key(os.urandom(32))
    relay.send(asker, wire.FetchPrekeys(nobody))
    relay.commit()
    assert relay.received(asker) == [wire.Prekeys(nobody, b"", None)]


def test_the_owner_hears_when_a_hand_out_crosses_a_low_mark() -> None:
    relay = MemoryRelay()
    owner_private = os.urandom(32)
    owner_key = dh.public_key(owner_private)
    relay.store.backend.publish_prekeys(owner_key, b"spk", otks(21))
    owner = online(relay, owner_private)
    asker = online(relay)
    for _ in range(3):  # 21 -> 20 -> 19 -> 18: only the step below 20 is a mark
        relay.send(asker, wire.FetchPrekeys(owner_key))
        relay.commit()
    assert relay.received(owner) == [wire.PrekeyCount(19)]


# --- presence ------------------------------------------------------------------------------------
def test_subscribe_answers_each_key_and_watchers_hear_arrivals_and_departures() -> None:
    relay = MemoryRelay()
    carol = online(relay)
    bob_private = os.urandom(32)
    bob_key = dh.public_key(bob_private)
    dave_key = dh.public_key(os.urandom(32))
    bob = online(relay, bob_private)
    relay.send(carol, wire.PresenceSubscribe((bob_key, dave_key)))
    assert relay.received(carol) == [wire.Presence(bob_key, True), wire.Presence(dave_key, False)]
    relay.close(bob)
    assert relay.received(carol) == [wire.Presence(bob_key, False)]
    relay.send(carol, wire.PresenceSubscribe(()))  # replaces the list: no more news of bob
    online(relay, bob_private)
    assert relay.received(carol) == []


def test_a_subscribe_costs_one_plus_a_sixteenth_of_its_keys() -> None:
    relay = MemoryRelay(subscribe_rate=0.001, subscribe_burst=3.0)
    carol = online(relay)
    keys = tuple(dh.public_key(os.urandom(32)) for _ in range(32))
    relay.send(carol, wire.PresenceSubscribe(keys))  # 1 + 32 // 16 = 3: the whole burst
    assert len(relay.received(carol)) == 32
    relay.send(carol, wire.PresenceSubscribe(keys[:1]))  # 1 more: held, not refused
    assert relay.received(carol) == [] and carol.held_frames is not None


def test_ping_is_answered_and_pong_is_only_a_sign_of_life() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    relay.send(bob, wire.Ping(42), wire.Pong(7))
    assert relay.received(bob) == [wire.Pong(42)]


# --- invites (the rendezvous's own rules: test_invite_relay.py) -----------------------------------
def test_invite_frames_reach_the_rendezvous_and_its_answers_reach_the_parties() -> None:
    relay = MemoryRelay(loops=2)
    opener = online(relay, loop=0)
    joiner = online(relay, loop=1)
    relay.send(opener, wire.InviteOpen())
    (opened,) = relay.received(opener)
    assert isinstance(opened, wire.InviteOpened)
    plate = opened.nameplate
    relay.send(joiner, wire.InviteJoin(plate), wire.InviteData(plate, b"pake"))
    assert relay.received(opener) == [wire.InviteData(plate, b"pake")]  # across loops
    relay.close(joiner)
    assert relay.received(opener) == [wire.InviteClosed(plate, wire.INVITE_PEER_LEFT)]


def test_invite_joins_are_held_beyond_their_budget() -> None:
    """The attack: guessing nameplates costs the guesser's identity and network."""
    relay = MemoryRelay(invite_join_rate=0.001, invite_join_burst=1.0)
    guesser = online(relay)
    relay.send(guesser, wire.InviteJoin(5), wire.InviteJoin(6))
    assert relay.received(guesser) == [wire.InviteClosed(5, wire.INVITE_NO_SUCH)]
    assert guesser.held_frames == [wire.InviteJoin(6)]
