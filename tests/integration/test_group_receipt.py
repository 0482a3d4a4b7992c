"""A group member's receipt must not take a group message out of the sender's outbox.

Regression test for the soak's "lost: fay|g|N never shown to eve": the relay sends
``Delivered(msg_id, mailbox)`` as soon as ONE recipient acknowledges its copy of a
SendMulti, while another copy may still be only in a recipient's hands (live, unacked)
or waiting in the store queue. The client used to treat that receipt like ``Accepted``
and drop the outbox entry, so a relay crash before the other copy was safe lost it for
good: no copy in the relay, nothing left to resend.
"""

from __future__ import annotations

import contextlib
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from securechat.client.app import open_client
from securechat.client.events import STATUS_DELIVERED, Event, StatusEvent
from securechat.core import keys, wire
from securechat.errors import ConnectionClosedError

from relay_fixture import RelayProcess
from relayclient import RelayClient

TIMEOUT_S = 10.0


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    # A long ack timeout: carol's unacked live copy stays in the relay's memory only.
    r = RelayProcess.start(tmp_path / "relay", "--ack-timeout", "60")
    yield r
    r.stop()


def _people() -> tuple[keys.Identity, keys.Identity, keys.Identity]:
    alice, bob, carol = (
        keys.generate_identity(n, os.urandom(keys.SEED_SIZE)) for n in ("alice", "bob", "carol")
    )
    return alice, bob, carol


def _status_sink(statuses: queue.Queue[int]) -> Callable[[Event], None]:
    """alice's event handler: the delivery marks she would see, in order."""

    def on_event(event: Event) -> None:
        if isinstance(event, StatusEvent):
            statuses.put(event.status)

    return on_event


def _wait_deliver(conn: RelayClient, msg_id: bytes, deadline: float) -> bool:
    """True once ``conn`` gets a Deliver of ``msg_id`` (it never acks it)."""
    try:
        conn.recv_until(
            lambda f: isinstance(f, wire.Deliver) and f.msg_id == msg_id,
            timeout=max(deadline - time.monotonic(), 0.01),
        )
    except (TimeoutError, ConnectionClosedError):
        return False
    return True


def test_one_members_receipt_keeps_group_message_queued(relay: RelayProcess, sc_home: Path) -> None:
    address = f"{relay.host}:{relay.port}"
    alice, bob, carol = _people()
    statuses: queue.Queue[int] = queue.Queue()
    on_alice = _status_sink(statuses)

    carol_raw = relay.connect(carol.dh_private)  # receives, never acks
    carol_raw.recv_until(lambda f: isinstance(f, wire.Synced), timeout=TIMEOUT_S)
    with (
        open_client(None, address, None, lambda e: None, identity=bob) as b,
        open_client(None, address, None, on_alice, identity=alice) as a,
    ):
        assert b.messenger.wait_connected(TIMEOUT_S) and b.messenger.synced.wait(TIMEOUT_S)
        assert a.messenger.wait_connected(TIMEOUT_S)
        msg_id = a.messenger.send_text(a.conversation([bob.public, carol.public]), "hello")
        assert _wait_deliver(carol_raw, msg_id, time.monotonic() + TIMEOUT_S)
        # bob acks his copy: alice gets the relay's receipt for it ...
        deadline = time.monotonic() + TIMEOUT_S
        while b.messenger.received_count < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b.messenger.received_count == 1
        time.sleep(0.5)  # bob's Ack -> the relay -> alice's Delivered receipt
        # ... but carol's copy is neither acked nor stored: the message must stay queued,
        # and it is not "delivered" to the group while one member's device lacks it.
        assert a.messenger.pending() == 1, "a receipt from one member dequeued the group message"
        seen = []
        while not statuses.empty():
            seen.append(statuses.get())
        assert STATUS_DELIVERED not in seen, "one member's receipt marked the group delivered"
        carol_raw.close()
        relay.kill()  # carol's copy was only in the relay's memory
        restarted = relay.restart()
        try:
            # alice reconnects and resends; carol gets the message after all
            deadline = time.monotonic() + TIMEOUT_S
            assert a.messenger.wait_all_accepted(TIMEOUT_S)
            with restarted.connect(carol.dh_private) as carol_again:
                assert _wait_deliver(carol_again, msg_id, deadline), "carol's copy was lost"
        finally:
            restarted.stop()


def test_group_message_delivered_once_every_member_has_it(
    relay: RelayProcess, sc_home: Path
) -> None:
    address = f"{relay.host}:{relay.port}"
    alice, bob, carol = _people()
    statuses: queue.Queue[int] = queue.Queue()
    on_alice = _status_sink(statuses)

    with (
        open_client(None, address, None, lambda e: None, identity=bob) as b,
        open_client(None, address, None, lambda e: None, identity=carol) as c,
        open_client(None, address, None, on_alice, identity=alice) as a,
    ):
        for member in (b, c):
            assert member.messenger.wait_connected(TIMEOUT_S)
            assert member.messenger.synced.wait(TIMEOUT_S)
        assert a.messenger.wait_connected(TIMEOUT_S)
        a.messenger.send_text(a.conversation([bob.public, carol.public]), "all of you")
        assert a.messenger.wait_all_accepted(TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        seen: list[int] = []
        while STATUS_DELIVERED not in seen and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(statuses.get(timeout=0.1))
        assert STATUS_DELIVERED in seen
