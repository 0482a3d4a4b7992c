"""The relay's delivery rules in memory, one test per rule (``relay/delivery.py``).

No process, no socket, no thread: ``relay_memory.MemoryRelay`` runs the real rules
against an in-memory loop and store. The store's requests are data, answered when
the test says (``commit``, or ``store.answer`` with a refusal), and time moves only
with ``turn``. The same rules run through a real relay in
``tests/integration/test_relay_delivery.py``.
"""

from __future__ import annotations

import os

import pytest
from securechat.core import dh, wire
from securechat.relay.conn import LIVE, OPEN, STORE, SYNCING, Conn, DeliveryMode
from securechat.relay.delivery import MAX_INFLIGHT_BYTES, STALL_AFTER_S, STALL_TURNS
from securechat.relay.limits import FETCH_BATCH
from securechat.relay.mailboxes import Delete, Fetch, Insert, InsertResult

from relay_memory import START_MS, MemoryRelay, frames_of, mid

PAYLOAD = b"ciphertext"


def identity() -> tuple[bytes, bytes, bytes]:
    """A client's private key, identity key and mailbox address."""
    private = os.urandom(32)
    key = dh.public_key(private)
    return private, key, wire.mailbox_address(key)


def online(relay: MemoryRelay, private: bytes | None = None, **kw: object) -> Conn:
    """A connected client whose greeting (Synced, PrekeyCount) has been read."""
    conn = relay.connect(private, **kw)  # type: ignore[arg-type]
    relay.commit()
    relay.received(conn)
    return conn


def ack(relay: MemoryRelay, conn: Conn, *delivers: wire.Deliver) -> None:
    relay.send(conn, wire.Ack(tuple((d.sender_key, d.msg_id) for d in delivers)))


def settle_store(relay: MemoryRelay) -> None:
    """Commit until the rules ask the store for nothing more (fetch after fetch)."""
    for _ in range(50):
        if not relay.store.pending:
            return
        relay.commit()
    raise AssertionError("the store never went quiet")


# --- connecting --------------------------------------------------------------------------------
def test_an_empty_mailbox_goes_live_at_once_without_asking_the_store() -> None:
    relay = MemoryRelay()
    bob = relay.connect()
    assert [type(f) for f in relay.received(bob)] == [wire.Synced, wire.PrekeyCount]
    assert bob.mode == LIVE
    assert relay.store.of(Fetch) == []  # no round trip to the store thread per connection


def test_on_connect_the_backlog_then_synced_then_the_prekey_count() -> None:
    relay = MemoryRelay()
    alice = online(relay)
    bob_private, bob_key, bob_box = identity()
    relay.store.backend.publish_prekeys(bob_key, b"spk", (b"k" * 36,) * 3)
    relay.send(alice, wire.Send(mid(1), bob_box, b"one"), wire.Send(mid(2), bob_box, b"two"))
    relay.commit()
    bob = relay.connect(bob_private)
    assert bob.mode == SYNCING and relay.received(bob) == []
    (fetch,) = relay.store.of(Fetch)
    assert (fetch.mailbox, fetch.seq, fetch.limit) == (bob_box, 0, FETCH_BATCH)
    relay.commit()
    assert relay.received(bob) == [
        wire.Deliver(mid(1), alice.identity, START_MS, b"one"),
        wire.Deliver(mid(2), alice.identity, START_MS, b"two"),
        wire.Synced(),
        wire.PrekeyCount(3),
    ]
    assert bob.mode == LIVE


def test_the_backlog_is_fetched_in_batches() -> None:
    relay = MemoryRelay()
    alice = online(relay)
    bob_private, _, bob_box = identity()
    for n in range(FETCH_BATCH + 10):
        relay.store.backend.insert(bob_box, alice.identity or b"", mid(n), 0, b"p", force=False)
    bob = relay.connect(bob_private)
    relay.commit()
    first = relay.received(bob)
    assert len(first) == FETCH_BATCH and not frames_of(first, wire.Synced)
    (fetch,) = relay.store.of(Fetch)
    assert fetch.seq == FETCH_BATCH  # the cursor: the next batch starts after the last row
    relay.commit()
    rest = relay.received(bob)
    assert [f.msg_id for f in frames_of(rest, wire.Deliver)] == [
        mid(n) for n in range(FETCH_BATCH, FETCH_BATCH + 10)
    ]
    assert isinstance(rest[-2], wire.Synced)


def test_a_failed_fetch_closes_the_connection_with_store_failed() -> None:
    relay = MemoryRelay()
    bob_private, _, bob_box = identity()
    relay.store.backend.insert(bob_box, b"s" * 32, mid(1), 0, b"p", force=False)
    bob = relay.connect(bob_private)
    (fetch,) = relay.store.of(Fetch)
    relay.store.answer(fetch, None)
    relay.run()
    (error,) = relay.received(bob)
    assert isinstance(error, wire.Error) and error.code == wire.STORE_FAILED
    assert bob.state != OPEN


# --- rule 1: acknowledged recently -------------------------------------------------------------
def test_rule1_a_copy_acked_recently_is_accepted_again_and_not_delivered_twice() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD))
    (deliver,) = relay.received(bob)
    ack(relay, bob, deliver)
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_DELIVERED)]
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD))  # the sender's retry
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_DELIVERED)]
    assert relay.received(bob) == []
    assert relay.store.pending == []


# --- rule 2: recipient offline -----------------------------------------------------------------
def test_rule2_a_copy_for_an_offline_recipient_is_accepted_only_after_commit() -> None:
    relay = MemoryRelay()
    alice = online(relay, ip="10.1.2.3")
    _, _, bob_box = identity()
    relay.send(alice, wire.Send(mid(1), bob_box, PAYLOAD))
    (insert,) = relay.store.of(Insert)
    assert (insert.mailbox, insert.sender, insert.msg_id, insert.payload) == (
        bob_box,
        alice.identity,
        mid(1),
        PAYLOAD,
    )
    assert not insert.force  # quotas apply to a new copy
    assert insert.origin == b"10.1.2.0/24"  # charged to the sender's network too
    assert relay.received(alice) == []  # nothing is promised before the disk has it
    relay.commit()
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]


@pytest.mark.parametrize(
    ("result", "code", "words"),
    [
        (InsertResult.OVER_QUOTA, wire.QUOTA_EXCEEDED, "mailbox is full"),
        (InsertResult.UNKNOWN_OVER_QUOTA, wire.QUOTA_EXCEEDED, "never connected"),
        (InsertResult.SENDER_OVER_QUOTA, wire.QUOTA_EXCEEDED, "your share"),
        (InsertResult.PREFIX_OVER_QUOTA, wire.QUOTA_EXCEEDED, "your network"),
        (InsertResult.LOW_SPACE, wire.STORE_FAILED, "store failed"),
        (InsertResult.STORE_FULL, wire.STORE_FAILED, "storage is full"),
        (None, wire.STORE_FAILED, "store failed"),
    ],
)
def test_rule2_a_refused_copy_is_an_error_never_a_silent_drop(
    result: InsertResult | None, code: int, words: str
) -> None:
    relay = MemoryRelay()
    alice = online(relay)
    relay.send(alice, wire.Send(mid(7), identity()[2], PAYLOAD))
    (insert,) = relay.store.of(Insert)
    relay.store.answer(insert, result)
    relay.run()
    (error,) = relay.received(alice)
    assert isinstance(error, wire.Error)
    assert (error.code, error.msg_id) == (code, mid(7)) and words in error.reason


# --- rule 3: recipient live ----------------------------------------------------------------------
def test_rule3_a_live_copy_is_delivered_at_once_and_accepted_when_acked() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD))
    assert relay.received(bob) == [wire.Deliver(mid(1), alice.identity, START_MS, PAYLOAD)]
    assert relay.received(alice) == []  # Accepted(2) waits for the recipient's Ack
    assert relay.store.pending == []  # a live copy costs the store nothing
    ack(relay, bob, wire.Deliver(mid(1), alice.identity or b"", 0, PAYLOAD))
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_DELIVERED)]
    assert relay.store.pending == []  # nothing to delete either
    assert not frames_of(relay.received(alice), wire.Delivered)  # deprecated: never sent


def test_rule3_a_live_copy_not_acked_in_time_is_stored_then_accepted_as_stored() -> None:
    relay = MemoryRelay(ack_timeout=3.0)
    alice, bob = online(relay), online(relay)
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD))
    (deliver,) = relay.received(bob)
    relay.turn(2.9)
    assert relay.store.pending == []
    relay.turn(0.2)
    (insert,) = relay.store.of(Insert)
    assert insert.force  # it was accepted for delivery: no quota may refuse it now
    assert relay.received(alice) == []
    settle_store(relay)  # committed; the new row is fetched and found already sent
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]
    assert relay.received(bob) == []  # not sent twice on this connection
    ack(relay, bob, deliver)  # the device had it: the late Ack deletes the stored copy
    (delete,) = relay.store.of(Delete)
    assert (delete.mailbox, delete.keys) == (bob.mailbox, [(alice.identity, mid(1))])


def test_rule3_a_live_copy_whose_recipient_leaves_unacked_is_stored() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD))
    relay.close(bob)
    (insert,) = relay.store.of(Insert)
    assert insert.force and insert.mailbox == bob.mailbox
    relay.commit()
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]


def test_rule3_a_retry_while_the_first_delivery_awaits_its_ack_is_not_delivered_twice() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    send = wire.Send(mid(1), bob.mailbox or b"", PAYLOAD)
    relay.send(alice, send)
    relay.send(alice, send)  # the sender reconnected and resent its outbox, say
    (deliver,) = relay.received(bob)
    ack(relay, bob, deliver)
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_DELIVERED)] * 2


def test_rule3_a_retry_of_a_copy_already_sent_from_the_store_is_not_sent_again() -> None:
    relay = MemoryRelay()
    alice = online(relay)
    bob_private, _, bob_box = identity()
    send = wire.Send(mid(1), bob_box, PAYLOAD)
    relay.send(alice, send)
    relay.commit()
    bob = online(relay, bob_private)  # gets it from the store, does not ack yet
    assert bob.mode == LIVE
    relay.received(alice)
    relay.send(alice, send)  # the sender's retry
    assert relay.received(bob) == []
    assert len(relay.store.of(Insert)) == 1  # a no-op insert: it is stored already
    relay.commit()
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]


# --- rule 4: recipient catching up or out of room -------------------------------------------------
def test_rule4_copies_for_a_recipient_catching_up_go_through_the_store_in_order() -> None:
    relay = MemoryRelay()
    alice = online(relay)
    bob_private, _, bob_box = identity()
    relay.send(alice, wire.Send(mid(1), bob_box, b"1"))
    relay.commit()
    bob = relay.connect(bob_private)  # its backlog fetch is queued, not answered
    relay.send(alice, wire.Send(mid(2), bob_box, b"2"), wire.Send(mid(3), bob_box, b"3"))
    assert bob.mode == SYNCING
    assert [r.msg_id for r in relay.store.of(Insert)] == [mid(2), mid(3)]
    settle_store(relay)
    got = relay.received(bob)
    assert [f.msg_id for f in frames_of(got, wire.Deliver)] == [mid(1), mid(2), mid(3)]
    assert got.index(wire.Synced()) == 1  # the backlog found at connect time, then Synced
    assert frames_of(relay.received(alice), wire.Accepted) == [
        wire.Accepted(mid(1), wire.STATUS_STORED),
        wire.Accepted(mid(2), wire.STATUS_STORED),
        wire.Accepted(mid(3), wire.STATUS_STORED),
    ]
    assert bob.mode == LIVE  # caught up: the next copy goes live
    relay.send(alice, wire.Send(mid(4), bob_box, b"4"))
    assert [f.msg_id for f in relay.received(bob)] == [mid(4)]


def test_rule4_a_recipient_out_of_room_turns_to_store_mode_until_caught_up() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    box = bob.mailbox or b""
    big = bytes(wire.MAX_PAYLOAD)
    count = MAX_INFLIGHT_BYTES // len(big)
    for n in range(count):  # unacked live payload up to its per-recipient cap
        relay.send(alice, wire.Send(mid(n), box, big))
    assert len(relay.received(bob)) == count and bob.mode == LIVE
    relay.send(alice, wire.Send(mid(count), box, b"next"))
    assert bob.mode == STORE  # from now on in order through the store
    assert relay.received(bob) == []
    (insert,) = relay.store.of(Insert)
    assert not insert.force
    relay.send(bob, wire.Ack(tuple((alice.identity or b"", mid(n)) for n in range(count))))
    settle_store(relay)
    assert [f.msg_id for f in relay.received(bob)] == [mid(count)]
    assert bob.mode == LIVE


def test_rule4_a_loop_holding_too_much_output_sends_new_copies_to_the_store() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    relay.loops[0].held_bytes = relay.config.worker_high_water  # slow readers elsewhere
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD))
    assert relay.received(bob) == [] and bob.mode == STORE
    assert len(relay.store.of(Insert)) == 1


def test_rule4_a_reader_that_stopped_reading_is_stalled_but_one_that_reads_is_not() -> None:
    relay = MemoryRelay()
    alice, silent, busy = online(relay), online(relay), online(relay)
    relay.turn(0.01)  # what they sent at connect time is older than what they get now
    chunk = bytes(48 * 1024)  # three of them: more unacked than STALL_INFLIGHT_BYTES
    for reader in (silent, busy):
        for n in range(3):
            relay.send(alice, wire.Send(mid(n), reader.mailbox or b"", chunk))
    for _ in range(STALL_TURNS + 1):
        relay.turn(STALL_AFTER_S / STALL_TURNS)
        relay.send(busy, wire.Ping(1))  # it reads (and would ack soon)
    for reader in (silent, busy):
        relay.send(alice, wire.Send(mid(9), reader.mailbox or b"", b"x"))
    assert silent.mode == STORE and busy.mode == LIVE
    assert [r.mailbox for r in relay.store.of(Insert)] == [silent.mailbox]


# --- SendMulti ----------------------------------------------------------------------------------
def test_send_multi_is_answered_once_with_the_lowest_status_of_its_copies() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    _, _, carol_box = identity()  # offline
    relay.send(alice, wire.SendMulti(mid(1), ((bob.mailbox or b"", b"b"), (carol_box, b"c"))))
    (deliver,) = relay.received(bob)
    ack(relay, bob, deliver)
    assert relay.received(alice) == []  # carol's copy is not safe yet
    relay.commit()
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]


def test_send_multi_is_refused_as_soon_as_one_copy_is() -> None:
    relay = MemoryRelay()
    alice, bob = online(relay), online(relay)
    _, _, carol_box = identity()
    relay.send(alice, wire.SendMulti(mid(1), ((bob.mailbox or b"", b"b"), (carol_box, b"c"))))
    (deliver,) = relay.received(bob)
    relay.store.answer(relay.store.of(Insert)[0], InsertResult.OVER_QUOTA)
    relay.run()
    (error,) = relay.received(alice)
    assert isinstance(error, wire.Error) and error.code == wire.QUOTA_EXCEEDED
    ack(relay, bob, deliver)
    assert relay.received(alice) == []  # one answer per submission


# --- Ack -----------------------------------------------------------------------------------------
def test_an_ack_counts_only_for_copies_given_on_this_connection() -> None:
    """The attack: acks for copies a connection was never given cost no store work."""
    relay = MemoryRelay()
    alice, eve = online(relay), online(relay)
    bob_private, _, bob_box = identity()
    relay.send(alice, wire.Send(mid(0), bob_box, b"stored"))
    relay.commit()
    relay.received(alice)
    bob = relay.connect(bob_private)
    relay.commit()
    relay.send(alice, wire.Send(mid(1), bob_box, b"live"))
    stored, live = frames_of(relay.received(bob), wire.Deliver)
    ack(relay, eve, stored, live)  # someone else's copies
    ack(relay, bob, wire.Deliver(mid(5), alice.identity or b"", 0, b"invented"))
    assert relay.store.pending == [] and relay.received(alice) == []
    ack(relay, bob, live)
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_DELIVERED)]
    assert relay.store.pending == []  # a live copy was never stored
    ack(relay, bob, stored)
    (delete,) = relay.store.pending
    assert isinstance(delete, Delete)
    assert (delete.mailbox, delete.keys) == (bob_box, [(alice.identity, mid(0))])
    ack(relay, bob, stored)  # again: it is no longer this connection's to acknowledge
    assert relay.store.pending == [delete]


def test_an_ack_of_many_entries_costs_more_of_the_frame_budget() -> None:
    relay = MemoryRelay(rate_frames=10.0, burst_frames=300.0)
    bob = online(relay)
    junk = tuple((os.urandom(32), mid(n)) for n in range(wire.MAX_ACKS))
    relay.send(bob, wire.Ack(junk[:3]))  # 1 + 3 // 4 = 1
    assert not relay.loops[0].intake.indebted
    relay.send(bob, wire.Ack(junk))  # 1 + 1024 // 4 = 257, and the 300 are nearly spent
    relay.send(bob, wire.Ack(junk))
    assert bob in relay.loops[0].intake.indebted


# --- replacement, closing, loops ----------------------------------------------------------------
def test_a_newer_connection_replaces_the_old_one_and_inherits_its_unacked_copies() -> None:
    relay = MemoryRelay()
    alice, carol = online(relay), online(relay)
    bob_private, bob_key, bob_box = identity()
    relay.send(carol, wire.PresenceSubscribe((bob_key,)))
    relay.received(carol)
    old = online(relay, bob_private)
    assert relay.received(carol) == [wire.Presence(bob_key, True)]
    relay.send(alice, wire.Send(mid(1), bob_box, PAYLOAD))
    relay.received(old)
    new = relay.connect(bob_private)
    (error,) = relay.received(old)
    assert isinstance(error, wire.Error) and error.code == wire.REPLACED
    assert old.state != OPEN and relay.router.online[bob_box] is new
    (insert,) = relay.store.of(Insert)  # the old connection's unacked live copy
    assert insert.force and insert.msg_id == mid(1)
    settle_store(relay)
    assert frames_of(relay.received(new), wire.Deliver)[0].msg_id == mid(1)
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]
    assert relay.received(carol) == []  # still online: watchers see no flap


def test_a_copy_for_a_connection_that_closed_on_its_way_is_stored() -> None:
    relay = MemoryRelay(loops=2)
    alice = online(relay, loop=0)
    bob = online(relay, loop=1)
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD), settle=False)
    with relay.running(relay.loops[1]):  # bob leaves before its loop runs the hand-off
        relay.loops[1].close(bob, "peer closed the connection")
    relay.run()
    (insert,) = relay.store.of(Insert)
    assert not insert.force  # never delivered: a new copy, quotas apply
    relay.commit()
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_STORED)]


def test_copies_and_outcomes_cross_loops_as_posted_calls() -> None:
    relay = MemoryRelay(loops=2)
    alice = online(relay, loop=0)
    bob = online(relay, loop=1)
    relay.send(alice, wire.Send(mid(1), bob.mailbox or b"", PAYLOAD), settle=False)
    assert relay.received(bob) == [] and relay.loops[1].posted  # handed to bob's loop
    relay.run()
    (deliver,) = relay.received(bob)
    relay.send(bob, wire.Ack(((deliver.sender_key, deliver.msg_id),)), settle=False)
    assert relay.received(alice) == [] and relay.loops[0].posted  # counted on alice's loop
    relay.run()
    assert relay.received(alice) == [wire.Accepted(mid(1), wire.STATUS_DELIVERED)]


def test_states_and_modes_move_only_along_their_tables() -> None:
    relay = MemoryRelay()
    bob = relay.connect()
    assert bob.mode == LIVE
    with pytest.raises(AssertionError, match="LIVE -> SYNCING"):
        bob.switch(DeliveryMode.SYNCING)
    relay.close(bob)
    with pytest.raises(AssertionError, match="CLOSED -> OPEN"):
        bob.enter(OPEN)
