"""What a connection's frames may cost before the rules see them (``relay/intake.py``).

Each budget is an attack written as a test: a flood is slowed or held, never a
reason for the relay to buffer more, and an honest burst is only delayed.
"""

from __future__ import annotations

import os

from securechat.core import dh, wire
from securechat.relay.conn import B_BACKLOG, B_CONN_STORE, B_DEBT, B_HOLD, B_STORE, OPEN, Conn
from securechat.relay.limits import (
    DECODE_LIMIT,
    HOLD_MAX_S,
    MAX_CONN_STORE_COST,
    STORE_REQUEST_COST,
)
from securechat.relay.mailboxes import Delete, Insert

from relay_memory import MemoryRelay, mid


def online(relay: MemoryRelay, **kw: object) -> Conn:
    conn = relay.connect(**kw)  # type: ignore[arg-type]
    relay.commit()
    relay.received(conn)
    return conn


def test_frames_beyond_the_frame_budget_are_handled_then_reading_waits_for_the_debt() -> None:
    relay = MemoryRelay(rate_frames=100.0, burst_frames=10.0)
    bob = online(relay)
    relay.send(bob, *(wire.Ping(n) for n in range(30)))  # 20 over a budget of 10
    assert len(relay.received(bob)) == 30  # what was read is handled, not dropped
    assert bob.blocks & B_DEBT  # and nothing more is read from it ...
    relay.turn(0.1)
    assert bob.blocks & B_DEBT
    relay.turn(0.15)  # ... until 20 frames' worth has come back at 100 a second
    assert not bob.blocks & B_DEBT


def test_a_frame_over_its_shared_budget_holds_it_and_those_behind_it_in_order() -> None:
    relay = MemoryRelay(fetch_rate=1.0, fetch_burst=1.0)
    bob = online(relay)
    target = dh.public_key(os.urandom(32))
    relay.send(bob, wire.FetchPrekeys(target), wire.FetchPrekeys(target), wire.Ping(1))
    relay.commit()
    assert relay.received(bob) == [wire.Prekeys(target, b"", None)]  # the second waits
    assert bob.blocks & B_HOLD and bob.held_frames == [wire.FetchPrekeys(target), wire.Ping(1)]
    relay.turn(0.5)
    assert bob.blocks & B_HOLD  # the budget allows one a second
    relay.turn(0.6)
    relay.commit()
    assert relay.received(bob) == [wire.Pong(1), wire.Prekeys(target, b"", None)]
    assert not bob.blocks & B_HOLD and bob.held_frames is None


def test_a_hold_is_asked_again_after_at_most_hold_max() -> None:
    relay = MemoryRelay(publish_rate=0.0001, publish_burst=1.0)
    bob = online(relay)
    relay.send(bob, wire.PublishPrekeys(b"a", ()), wire.PublishPrekeys(b"b", ()))
    assert bob.hold_until - relay.loops[0].now == HOLD_MAX_S  # not the budget's hours
    relay.turn(HOLD_MAX_S)
    assert bob.blocks & B_HOLD  # asked again, still over: held again


def test_at_most_decode_limit_bytes_of_frames_are_decoded_per_turn() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    stranger = wire.mailbox_address(dh.public_key(os.urandom(32)))
    sends = [wire.encode(wire.Send(mid(n), stranger, bytes(wire.MAX_PAYLOAD))) for n in range(6)]
    assert len(b"".join(sends)) > DECODE_LIMIT
    relay.feed(bob, b"".join(sends))
    first = len(relay.store.of(Insert))
    assert 0 < first < 6 and bob.blocks & B_BACKLOG  # the rest waits, undecoded
    relay.turn()
    assert len(relay.store.of(Insert)) == 6
    assert not bob.blocks & B_BACKLOG


def test_a_connection_with_too_much_store_work_outstanding_is_not_read() -> None:
    """The attack: a flood of stored sends waits in its own kernel buffer, not the store's."""
    relay = MemoryRelay()
    alice = online(relay)
    stranger = wire.mailbox_address(dh.public_key(os.urandom(32)))
    payload = bytes(wire.MAX_PAYLOAD)
    n = MAX_CONN_STORE_COST // len(payload)
    relay.send(alice, *(wire.Send(mid(i), stranger, payload) for i in range(n - 1)))
    assert not alice.blocks & B_CONN_STORE
    relay.send(alice, wire.Send(mid(n), stranger, payload))
    assert alice.blocks & B_CONN_STORE
    relay.commit()  # answered: reading resumes
    assert not alice.blocks & B_CONN_STORE and alice.store_out == 0


def test_every_kind_of_store_request_counts_against_the_connections_store_work() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    intake = relay.loops[0].intake
    each = STORE_REQUEST_COST  # a request without payload is not free
    for n in range(MAX_CONN_STORE_COST // each - 1):
        intake.store_request(Delete(relay.loops[0], None, bob.mailbox or b"", [(b"", mid(n))]), bob)
    assert not bob.blocks & B_CONN_STORE
    intake.store_request(Delete(relay.loops[0], None, bob.mailbox or b"", []), bob)
    assert bob.blocks & B_CONN_STORE
    relay.commit()
    assert not bob.blocks & B_CONN_STORE and bob.store_out == 0


def test_deadlines_close_idle_slow_and_unfinished_connections_but_not_held_ones() -> None:
    relay = MemoryRelay(idle_timeout=300.0, frame_timeout=20.0)
    idle, held, slow = online(relay), online(relay), online(relay)
    intake = relay.loops[0].intake
    held.blocks |= B_STORE  # the relay is the one not reading it
    relay.feed(slow, wire.encode(wire.Ping(1))[:5])  # a frame started ...
    now = relay.loops[0].now
    assert intake.overdue(now + 21.0, [idle, held, slow]) == [
        (slow, "frame not completed in time")  # ... and not finished
    ]
    late = dict(intake.overdue(now + 301.0, [idle, held, slow]))
    assert late[idle] == "idle timeout" and held not in late


def test_a_frame_type_a_client_may_not_send_closes_the_connection() -> None:
    relay = MemoryRelay()
    bob = online(relay)
    relay.send(bob, wire.Deliver(mid(1), bytes(32), 0, b"x"))
    (error,) = relay.received(bob)
    assert isinstance(error, wire.Error) and error.code == wire.BAD_FRAME
    assert bob.state != OPEN


def test_malformed_or_oversized_frames_close_the_connection_with_their_code() -> None:
    relay = MemoryRelay()
    bad, huge = online(relay), online(relay)
    relay.feed(bad, b"\x00\x00\x00\x02\x09\x10")  # version 9
    relay.feed(huge, (wire.MAX_FRAME + 1).to_bytes(4, "big"))
    assert [f.code for f in relay.received(bad)] == [wire.BAD_FRAME]  # type: ignore[attr-defined]
    assert [f.code for f in relay.received(huge)] == [wire.TOO_LARGE]  # type: ignore[attr-defined]


def test_partial_frames_beyond_the_networks_budget_close_the_connection() -> None:
    """The attack: start big frames and never finish them."""
    relay = MemoryRelay(partial_bytes_per_prefix=1000)
    honest = online(relay, ip="10.0.0.1")
    first, second = online(relay, ip="10.9.9.1"), online(relay, ip="10.9.9.2")
    start = (wire.MAX_PAYLOAD).to_bytes(4, "big") + bytes(600)
    relay.feed(first, start)
    relay.feed(honest, start)  # another network: its own budget
    relay.feed(second, start)  # its network would hold 1,200 bytes
    assert first.state == OPEN and honest.state == OPEN
    assert second.state != OPEN
