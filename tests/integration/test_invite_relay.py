"""The relay's invite rendezvous: its rules in memory, then against the real relay.

The rules (``relay/rendezvous.py``) are tested on plain objects standing for
connections; the live tests drive a relay subprocess with raw frames, as an
attacker would (joins from throwaway identities on other loopback networks).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat.core import wire
from securechat.relay.guard import Budgets
from securechat.relay.limits import INVITE_MESSAGES_PER_PARTY, RelayConfig
from securechat.relay.rendezvous import Rendezvous

from relay_fixture import RelayProcess
from relayclient import RelayClient, new_identity

pytestmark = pytest.mark.timeout(90)

CLOSED = wire.InviteClosed


def rules(**limits: float) -> Rendezvous[str]:
    return Rendezvous(dataclasses.replace(RelayConfig(), **limits))


def opened(r: Rendezvous[str], conn: str, identity: bytes = b"", prefix: str = "p",
           now: float = 0.0) -> int:  # fmt: skip
    ((who, frame),) = r.open(conn, identity or conn.encode(), prefix, now)
    assert who == conn and isinstance(frame, wire.InviteOpened)
    return frame.nameplate


def paired(r: Rendezvous[str], opener: str = "A", joiner: str = "B") -> int:
    plate = opened(r, opener)
    assert r.join(joiner, plate) == []
    return plate


# --- nameplates --------------------------------------------------------------------------------


def test_nameplates_are_the_smallest_free_numbers_from_one() -> None:
    r = rules()
    assert [opened(r, c) for c in "abc"] == [1, 2, 3]
    r.dropped("b")
    assert opened(r, "d") == 2  # 2 was freed: the codes stay short
    assert opened(r, "e") == 4


def test_a_join_consumes_the_nameplate_right_code_or_not() -> None:
    r = rules()
    plate = paired(r, "A", "B")
    assert r.join("C", plate) == [("C", CLOSED(plate, wire.INVITE_USED))]
    assert r.join("C", 99) == [("C", CLOSED(99, wire.INVITE_NO_SUCH))]
    assert r.join("A", opened(r, "A")) == [("A", CLOSED(2, wire.INVITE_NO_SUCH))]  # own invite


# --- forwarding ----------------------------------------------------------------------------------


def test_data_goes_to_the_other_party_and_the_exchange_ends_the_invite() -> None:
    r = rules()
    plate = paired(r)
    assert r.data("B", plate, b"b1") == [("A", wire.InviteData(plate, b"b1"))]
    assert r.data("A", plate, b"a1") == [("B", wire.InviteData(plate, b"a1"))]
    assert r.data("A", plate, b"a2") == [("B", wire.InviteData(plate, b"a2"))]
    assert len(r) == 1
    assert r.data("B", plate, b"b2") == [("A", wire.InviteData(plate, b"b2"))]
    assert len(r) == 0  # complete: forgotten, nameplate free, nobody told
    assert r.data("B", plate, b"b3") == []
    assert opened(r, "C") == plate


def test_data_from_outsiders_or_before_the_join_is_ignored() -> None:
    r = rules()
    plate = opened(r, "A")
    assert r.data("A", plate, b"early") == []
    assert r.join("B", plate) == []
    assert r.data("M", plate, b"outsider") == []
    assert r.data("B", plate + 1, b"wrong plate") == []


def test_a_party_over_its_message_count_closes_the_invite_for_both() -> None:
    r = rules()
    plate = paired(r)
    for i in range(INVITE_MESSAGES_PER_PARTY):
        assert r.data("B", plate, bytes([i])) == [("A", wire.InviteData(plate, bytes([i])))]
    assert r.data("B", plate, b"more") == [
        ("A", CLOSED(plate, wire.INVITE_VIOLATION)),
        ("B", CLOSED(plate, wire.INVITE_VIOLATION)),
    ]
    assert len(r) == 0


# --- ends ---------------------------------------------------------------------------------


def test_a_party_leaving_tells_the_other() -> None:
    r = rules()
    plate = paired(r)
    assert r.dropped("B") == [("A", CLOSED(plate, wire.INVITE_PEER_LEFT))]
    assert len(r) == 0 and r.dropped("A") == []
    lone = opened(r, "C")
    assert r.dropped("C") == []  # nobody to tell
    assert r.join("D", lone) == [("D", CLOSED(lone, wire.INVITE_NO_SUCH))]


def test_expiry_closes_old_invites_for_both_parties_only() -> None:
    r = rules(invite_ttl=600.0)
    old = opened(r, "A", now=0.0)
    assert r.join("B", old) == []
    young = opened(r, "C", now=300.0)
    assert r.expire(599.0) == []
    assert r.expire(600.0) == [
        ("A", CLOSED(old, wire.INVITE_EXPIRED)),
        ("B", CLOSED(old, wire.INVITE_EXPIRED)),
    ]
    assert len(r) == 1 and r.expire(899.0) == []
    assert r.expire(900.0) == [("C", CLOSED(young, wire.INVITE_EXPIRED))]


# --- bounds -------------------------------------------------------------------------------


def test_open_invites_are_bounded_per_identity_prefix_and_in_all() -> None:
    too_many = [("x", CLOSED(0, wire.INVITE_TOO_MANY))]
    r = rules(invite_max_open_per_identity=2, invite_max_open_per_prefix=3, invite_max_open=5)
    opened(r, "a1", b"alice", "net1")
    opened(r, "a2", b"alice", "net1")
    assert r.open("x", b"alice", "net1", 0.0) == too_many  # identity
    opened(r, "b1", b"bob", "net1")
    assert r.open("x", b"carol", "net1", 0.0) == too_many  # prefix
    opened(r, "c1", b"carol", "net2")
    opened(r, "d1", b"dave", "net3")
    assert r.open("x", b"erin", "net4", 0.0) == too_many  # relay
    r.dropped("a1")
    opened(r, "e1", b"erin", "net4")  # a slot came back
    assert len(r) == 5


def test_join_budget_is_per_identity_and_per_prefix_and_outlives_connections() -> None:
    cfg = dataclasses.replace(
        RelayConfig(), invite_join_rate=0.05, invite_join_burst=5.0, prefix_factor=4.0
    )
    budgets = Budgets(cfg)
    ident = [budgets.charge("join", b"mallory", "net", 1.0, 0.0) for _ in range(6)]
    assert ident[:5] == [0.0] * 5 and ident[5] > 0  # burst 5 per identity
    spread = [budgets.charge("join", bytes([i]), "net", 1.0, 0.0) for i in range(20)]
    assert spread.count(0.0) == 15 and spread[-1] > 0  # prefix: 4 x 5 = 20 in all
    assert budgets.charge("join", b"fresh", "other-net", 1.0, 0.0) == 0.0


# --- the real relay ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("invite"))
    yield proc
    code, err = proc.stop()
    assert code == 0, err
    assert "Traceback" not in err, err


def authed(relay: RelayProcess, **kw: object) -> RelayClient:
    client = relay.connect(new_identity()[0], **kw)
    client.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
    return client


def invite_frame(client: RelayClient, timeout: float = 5.0) -> wire.Frame:
    frame, _ = client.recv_until(
        lambda f: isinstance(f, (wire.InviteOpened, wire.InviteData, wire.InviteClosed)), timeout
    )
    return frame


def open_invite(relay: RelayProcess, **kw: object) -> tuple[RelayClient, int]:
    opener = authed(relay, **kw)
    opener.send_frame(wire.InviteOpen())
    frame = invite_frame(opener)
    assert isinstance(frame, wire.InviteOpened)
    return opener, frame.nameplate


def test_live_pairing_forwards_both_ways_and_refuses_a_second_join(relay: RelayProcess) -> None:
    opener, plate = open_invite(relay)
    with opener, authed(relay) as joiner, authed(relay, source="127.50.0.1") as late:
        joiner.send_frames([wire.InviteJoin(plate), wire.InviteData(plate, b"pake-b")])
        assert invite_frame(opener) == wire.InviteData(plate, b"pake-b")
        opener.send_frames([wire.InviteData(plate, b"pake-a"), wire.InviteData(plate, b"id-a")])
        assert invite_frame(joiner) == wire.InviteData(plate, b"pake-a")
        assert invite_frame(joiner) == wire.InviteData(plate, b"id-a")
        late.send_frame(wire.InviteJoin(plate))
        assert invite_frame(late) == CLOSED(plate, wire.INVITE_USED)
        joiner.send_frame(wire.InviteData(plate, b"id-b"))
        assert invite_frame(opener) == wire.InviteData(plate, b"id-b")


def test_live_a_leaving_joiner_is_reported_to_the_opener(relay: RelayProcess) -> None:
    opener, plate = open_invite(relay)
    with opener:
        joiner = authed(relay)
        joiner.send_frame(wire.InviteJoin(plate))
        joiner.send_frame(wire.Ping(1))
        joiner.recv_until(lambda f: isinstance(f, wire.Pong))  # the join was handled
        joiner.close()
        assert invite_frame(opener) == CLOSED(plate, wire.INVITE_PEER_LEFT)


def test_live_an_invite_expires_on_the_relays_tick(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path / "relay", "--invite-ttl", "2")
    try:
        opener, plate = open_invite(relay)
        with opener:
            t0 = time.monotonic()
            assert invite_frame(opener, timeout=6) == CLOSED(plate, wire.INVITE_EXPIRED)
            assert 1.5 < time.monotonic() - t0 < 5.0
            with authed(relay) as joiner:
                joiner.send_frame(wire.InviteJoin(plate))
                assert invite_frame(joiner) == CLOSED(plate, wire.INVITE_NO_SUCH)
    finally:
        assert relay.stop()[0] == 0


def test_live_a_flood_of_joins_from_throwaway_identities_is_held(relay: RelayProcess) -> None:
    """Guessing nameplates costs the attacker's network its join budget: after the burst
    (5 per identity, 20 per prefix) its joins wait, and each reconnect with a fresh
    identity starts from the prefix's empty budget. An honest invite elsewhere works."""
    honest, plate = open_invite(relay)
    answered = 0
    with honest:
        for round_ in range(5):  # 5 fresh identities x 6 joins, from one network
            with authed(relay, source="127.60.0.1") as mallory:
                mallory.send_frames([wire.InviteJoin(10_000 + round_ * 6 + i) for i in range(6)])
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    try:
                        frame = mallory.recv_frame(timeout=deadline - time.monotonic())
                    except TimeoutError:
                        break
                    answered += isinstance(frame, wire.InviteClosed)
        assert 15 <= answered <= 21  # the prefix's burst of 20 (+1 refilled), not 30
        with authed(relay, source="127.61.0.1") as friend:
            friend.send_frames([wire.InviteJoin(plate), wire.InviteData(plate, b"pake")])
            assert invite_frame(honest) == wire.InviteData(plate, b"pake")


def test_live_open_invites_per_identity_are_capped(relay: RelayProcess) -> None:
    with authed(relay, source="127.70.0.1") as c:
        c.send_frames([wire.InviteOpen()] * 3)
        frames = [invite_frame(c) for _ in range(3)]
        assert [type(f) for f in frames] == [wire.InviteOpened, wire.InviteOpened, CLOSED]
        assert frames[2] == CLOSED(0, wire.INVITE_TOO_MANY)


def test_live_pairs_across_two_workers(tmp_path: Path) -> None:
    """With --workers 2 the two parties are often on different worker threads: frames cross
    over by the workers' queues, in order, and a leaving party is still reported."""
    relay = RelayProcess.start(tmp_path / "relay", "--workers", "2")
    try:
        for round_ in range(6):
            opener, plate = open_invite(relay)
            with opener, authed(relay) as joiner:
                joiner.send_frames([wire.InviteJoin(plate), wire.InviteData(plate, b"b1")])
                assert invite_frame(opener) == wire.InviteData(plate, b"b1")
                opener.send_frames([wire.InviteData(plate, b"a1"), wire.InviteData(plate, b"a2")])
                assert [invite_frame(joiner), invite_frame(joiner)] == [
                    wire.InviteData(plate, b"a1"),
                    wire.InviteData(plate, b"a2"),
                ]
                if round_ % 2:
                    joiner.close()
                    assert invite_frame(opener) == CLOSED(plate, wire.INVITE_PEER_LEFT)
    finally:
        code, err = relay.stop()
        assert code == 0 and "Traceback" not in err, err
