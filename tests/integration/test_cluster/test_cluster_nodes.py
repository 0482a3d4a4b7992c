"""Relays sharing their mailboxes through Redis (issue 16): real nodes, real Redis, loopback.

Each test says what it shows; every wait is bounded. The raw client
(``relayclient.RelayClient``) plays the clients so the tests see the relay's own
frames; ``test_cluster_cli.py`` has real users talking across nodes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from securechat.core import wire
from securechat.errors import ConnectionClosedError

from relay_fixture import RelayProcess, run_cli
from relayclient import RelayClient, new_identity
from test_cluster.nodes import Cluster, RedisServer, free_port, redis_available

pytestmark = pytest.mark.timeout(90)


def connect(node: RelayProcess, private: bytes) -> RelayClient:
    """Connected and synced (the backlog, Synced, PrekeyCount read up to Synced)."""
    client = node.connect(private)
    client.recv_until(lambda f: isinstance(f, wire.Synced), timeout=10)
    client.recv_until(lambda f: isinstance(f, wire.PrekeyCount), timeout=10)
    return client


def send(client: RelayClient, to_public: bytes, payload: bytes) -> bytes:
    msg_id = os.urandom(wire.ID_SIZE)
    client.send_frame(wire.Send(msg_id, wire.mailbox_address(to_public), payload))
    return msg_id


def accepted(client: RelayClient, msg_id: bytes, timeout: float = 10) -> wire.Accepted:
    frame, _ = client.recv_until(
        lambda f: isinstance(f, wire.Accepted | wire.Error) and f.msg_id == msg_id, timeout
    )
    assert isinstance(frame, wire.Accepted), frame
    return frame


def deliveries(client: RelayClient, count: int, timeout: float = 10) -> list[wire.Deliver]:
    got: list[wire.Deliver] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        frame, _ = client.recv_until(
            lambda f: isinstance(f, wire.Deliver), max(deadline - time.monotonic(), 0.01)
        )
        assert isinstance(frame, wire.Deliver)
        got.append(frame)
    return got


def ack(client: RelayClient, frames: list[wire.Deliver]) -> None:
    client.send_frame(wire.Ack(tuple((f.sender_key, f.msg_id) for f in frames)))


def presence(client: RelayClient, identity: bytes, timeout: float = 8) -> bool:
    frame, _ = client.recv_until(
        lambda f: isinstance(f, wire.Presence) and f.identity_key == identity, timeout
    )
    assert isinstance(frame, wire.Presence)
    return frame.online


def test_alice_on_node1_and_bob_on_node2_talk_online_and_offline(cluster: Cluster) -> None:
    n1, n2, _ = cluster.nodes
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    alice = connect(n1, a_priv)
    bob = connect(n2, b_priv)
    # Online, across nodes: stored first (Accepted 1), then bob's node is told and delivers.
    ids = [send(alice, b_pub, f"online {i}".encode()) for i in range(20)]
    for msg_id in ids:
        assert accepted(alice, msg_id).status == wire.STATUS_STORED
    got = deliveries(bob, 20)
    assert [f.payload for f in got] == [f"online {i}".encode() for i in range(20)]  # in order
    assert all(f.sender_key == a_pub for f in got)
    ack(bob, got)
    # And back, bob to alice.
    reply = send(bob, a_pub, b"hi alice")
    accepted(bob, reply)
    assert deliveries(alice, 1)[0].payload == b"hi alice"
    # Offline: bob leaves; alice's messages wait in Redis; bob comes back on node 3.
    bob.close()
    offline = [send(alice, b_pub, f"offline {i}".encode()) for i in range(5)]
    for msg_id in offline:
        assert accepted(alice, msg_id).status == wire.STATUS_STORED
    bob = cluster.nodes[2].connect(b_priv)
    got = deliveries(bob, 5)
    assert [f.payload for f in got] == [f"offline {i}".encode() for i in range(5)]
    ack(bob, got)
    bob.close()
    # Acknowledged frames are deleted from Redis (the acks of the first 20 too).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if cluster.redis.command("ZCARD", _queue_key(b_pub)) == "0":
            break
        time.sleep(0.1)
    assert cluster.redis.command("ZCARD", _queue_key(b_pub)) == "0"
    alice.close()


def _queue_key(identity: bytes) -> str:
    return "sc:{" + wire.mailbox_address(identity).hex() + "}:q"


def test_same_node_live_delivery_keeps_its_fast_path(cluster: Cluster) -> None:
    n1 = cluster.nodes[0]
    a_priv, _ = new_identity()
    b_priv, b_pub = new_identity()
    alice = connect(n1, a_priv)
    bob = connect(n1, b_priv)
    msg_id = send(alice, b_pub, b"same node")
    (frame,) = deliveries(bob, 1)
    ack(bob, [frame])
    assert accepted(alice, msg_id).status == wire.STATUS_DELIVERED  # live, never stored
    assert cluster.redis.command("EXISTS", _queue_key(b_pub)) == "0"
    alice.close()
    bob.close()


def test_a_group_spread_over_three_nodes(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    privs = {name: new_identity() for name in ("ann", "ben", "cat", "dan", "eve")}
    ann = connect(n1, privs["ann"][0])
    ben = connect(n2, privs["ben"][0])
    cat = connect(n3, privs["cat"][0])
    dan = connect(n1, privs["dan"][0])  # same node as the sender: live
    # eve is offline
    msg_id = os.urandom(wire.ID_SIZE)
    members = ("ben", "cat", "dan", "eve")
    recipients = tuple((wire.mailbox_address(privs[n][1]), f"for {n}".encode()) for n in members)
    ann.send_frame(wire.SendMulti(msg_id, recipients))
    for name, client in (("ben", ben), ("cat", cat), ("dan", dan)):
        (frame,) = deliveries(client, 1)
        assert frame.payload == f"for {name}".encode() and frame.msg_id == msg_id
        ack(client, [frame])
    assert accepted(ann, msg_id).status == wire.STATUS_STORED  # eve's copy is stored
    eve = n2.connect(privs["eve"][0])
    (frame,) = deliveries(eve, 1)
    assert frame.payload == b"for eve"
    for c in (ann, ben, cat, dan, eve):
        c.close()


def test_presence_across_nodes(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    w_priv, _ = new_identity()
    b_priv, b_pub = new_identity()
    watcher = connect(n1, w_priv)
    watcher.send_frame(wire.PresenceSubscribe((b_pub,)))
    assert presence(watcher, b_pub) is False
    bob = connect(n2, b_priv)
    assert presence(watcher, b_pub) is True  # bob came online on another node
    # A second watcher on a third node asks after bob came online: it is told at once.
    w2_priv, _ = new_identity()
    watcher2 = connect(n3, w2_priv)
    watcher2.send_frame(wire.PresenceSubscribe((b_pub,)))
    assert presence(watcher2, b_pub) is True
    bob.close()
    assert presence(watcher, b_pub) is False
    assert presence(watcher2, b_pub) is False
    watcher.close()
    watcher2.close()


def test_the_same_identity_on_two_nodes_the_older_is_replaced(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    b_priv, b_pub = new_identity()
    w_priv, _ = new_identity()
    a_priv, _ = new_identity()
    watcher = connect(n3, w_priv)
    watcher.send_frame(wire.PresenceSubscribe((b_pub,)))
    assert presence(watcher, b_pub) is False
    older = connect(n1, b_priv)
    assert presence(watcher, b_pub) is True
    newer = connect(n2, b_priv)
    seen = older.expect_closed(timeout=8)
    errors = [f for f in seen if isinstance(f, wire.Error)]
    assert errors and errors[-1].code == wire.REPLACED
    # A replacement is neither offline nor online for watchers.
    with pytest.raises(TimeoutError):
        presence(watcher, b_pub, timeout=1.5)
    # New messages reach the newer connection (node 2), whichever node they enter by.
    alice = connect(n1, a_priv)
    msg_id = send(alice, b_pub, b"to the newer one")
    accepted(alice, msg_id)
    assert deliveries(newer, 1)[0].payload == b"to the newer one"
    for c in (watcher, newer, alice):
        c.close()


def test_a_one_time_prekey_is_handed_out_once_across_nodes(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    o_priv, o_pub = new_identity()
    owner = connect(n1, o_priv)
    otks = tuple(bytes([i]) * wire.ONE_TIME_PREKEY_SIZE for i in range(1, 7))
    owner.send_frame(wire.PublishPrekeys(b"signed-prekey", otks))
    frame, _ = owner.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
    assert isinstance(frame, wire.PrekeyCount) and frame.remaining == 6
    # Four fetchers on the other two nodes, three bundles each, at the same time.
    handed: list[bytes | None] = []
    lock = threading.Lock()
    failures: list[BaseException] = []

    def fetch(node: RelayProcess) -> None:
        try:
            client = connect(node, new_identity()[0])
            for _ in range(3):
                client.send_frame(wire.FetchPrekeys(o_pub))
                got, _ = client.recv_until(lambda f: isinstance(f, wire.Prekeys), timeout=10)
                assert isinstance(got, wire.Prekeys) and got.signed_prekey == b"signed-prekey"
                with lock:
                    handed.append(got.one_time_prekey)
            client.close()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=fetch, args=(n,)) for n in (n2, n3, n2, n3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures, failures
    given = [k for k in handed if k is not None]
    assert len(handed) == 12
    assert sorted(given) == sorted(otks)  # every one handed out, and none twice
    owner.close()


def test_a_strangers_mailbox_quota_holds_across_nodes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Attack: fill a mailbox nobody ever connected for through every node at once.
    The small quota of an unknown mailbox is one quota for the cluster, not one per node."""
    c = Cluster(tmp_path, redis_server, "--unknown-quota-frames", "6")
    try:
        nodes = [c.start_node(), c.start_node()]
        _, victim = new_identity()
        attackers = [connect(n, new_identity()[0]) for n in nodes for _ in range(2)]
        results: list[str] = []
        for i in range(6):
            for a in attackers:
                msg_id = send(a, victim, f"junk {i}".encode())
                frame, _ = a.recv_until(
                    lambda f, m=msg_id: isinstance(f, wire.Accepted | wire.Error) and f.msg_id == m
                )
                results.append(type(frame).__name__)
        assert results.count("Accepted") == 6
        assert results.count("Error") == 24 - 6
        for a in attackers:
            a.close()
    finally:
        for text in c.stop():
            assert "Traceback" not in text


def test_shared_budgets_hold_across_nodes(tmp_path: Path, redis_server: RedisServer) -> None:
    """Attack: spread prekey fetches over nodes to multiply the budget. The identity's
    bucket is in Redis: the fourth fetch waits wherever it is sent."""
    c = Cluster(tmp_path, redis_server, "--fetch-burst", "3", "--fetch-rate", "0.05")
    try:
        n1, n2 = c.start_node(), c.start_node()
        priv, _ = new_identity()
        _, target = new_identity()
        first = connect(n1, priv)
        for _ in range(3):
            first.send_frame(wire.FetchPrekeys(target))
            first.recv_until(lambda f: isinstance(f, wire.Prekeys))
        first.close()
        second = connect(n2, priv)  # same identity, other node
        second.send_frame(wire.FetchPrekeys(target))
        with pytest.raises(TimeoutError):  # held until the shared bucket refills (20 s)
            second.recv_until(lambda f: isinstance(f, wire.Prekeys), timeout=2.0)
        second.close()
    finally:
        for text in c.stop():
            assert "Traceback" not in text


def test_a_redis_that_could_lose_acknowledged_frames_is_refused(tmp_path: Path) -> None:
    redis_available()
    weak = RedisServer(tmp_path / "weak", "--appendfsync", "everysec")
    try:
        c = Cluster(tmp_path, weak)
        with pytest.raises(RuntimeError) as info:
            c.start_node()
        text = str(info.value)
        assert "Redis cannot keep acknowledged frames safe" in text
        assert "appendfsync everysec" in text and "Traceback" not in text
        # The operator may override it, and the relay says so loudly.
        node = c.start_node("--cluster-allow-unsafe")
        time.sleep(0.3)
        assert "UNSAFE" in node.log_text()
        node.stop()
    finally:
        weak.stop()


def test_a_password_on_the_command_line_is_refused(tmp_path: Path) -> None:
    done = run_cli(tmp_path, "relay", "--data", str(tmp_path / "d"), "--port", "0",
               "--cluster", "redis://:secret@127.0.0.1:1/0")  # fmt: skip
    assert done.returncode != 0
    assert "SECURECHAT_REDIS_PASSWORD" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = run_cli(
        tmp_path, "relay", "--data", str(tmp_path / "d"), "--port", "0", "--cluster", url
    )
    assert done.returncode != 0
    assert "cannot reach Redis" in done.stderr and "Traceback" not in done.stderr


def test_an_older_connection_closed_by_its_node_dying_does_not_block_the_mailbox(
    cluster: Cluster,
) -> None:
    """A node SIGKILLed leaves its claim on the mailbox in Redis; the client reconnecting
    to another node claims it again and gets what was sent meanwhile."""
    n1, n2, _ = cluster.nodes
    a_priv, _ = new_identity()
    b_priv, b_pub = new_identity()
    bob = connect(n1, b_priv)
    alice = connect(n2, a_priv)
    n1.kill()
    with pytest.raises((ConnectionClosedError, TimeoutError)):
        bob.recv_frame(timeout=3)
    bob.close()
    msg_id = send(alice, b_pub, b"while bob moves")
    accepted(alice, msg_id)
    bob = cluster.nodes[2].connect(b_priv)
    assert deliveries(bob, 1)[0].payload == b"while bob moves"
    bob.close()
    alice.close()


def test_each_node_logs_a_metrics_line(tmp_path: Path, redis_server: RedisServer) -> None:
    c = Cluster(tmp_path, redis_server, "--metrics-interval", "0.5")
    try:
        n1, n2 = c.start_node(), c.start_node()
        client = connect(n1, new_identity()[0])
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline:
            lines = [ln for ln in n1.log_text().splitlines() if "metrics:" in ln]
            if lines and "peers 1" in lines[-1] and "online 1," in lines[-1]:
                line = lines[-1]
                break
            time.sleep(0.2)
        assert line, n1.log_text()[-2000:]
        assert "node " in line and "redis requests" in line and "failed 0" in line
        client.close()
        while "metrics:" not in n2.log_text() and time.monotonic() < deadline + 5:
            time.sleep(0.2)
        assert "metrics:" in n2.log_text()
    finally:
        for text in c.stop():
            assert "Traceback" not in text


def test_a_hung_redis_does_not_stall_budgeted_frames(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis stops answering (SIGSTOP): a budgeted frame (FetchPrekeys) waits at most the
    budget's short timeout, and the node's own budget decides; the store answers
    STORE_FAILED after its retries, and nothing hangs for good."""
    c = Cluster(tmp_path, redis_server)
    try:
        node = c.start_node()
        client = connect(node, new_identity()[0])
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            client.send_frame(wire.FetchPrekeys(new_identity()[1]))
            frame, _ = client.recv_until(
                lambda f: isinstance(f, wire.Prekeys | wire.Error), timeout=20
            )
            assert time.monotonic() - started < 15
            assert isinstance(frame, wire.Error) and frame.code == wire.STORE_FAILED
        finally:
            os.kill(redis_server.proc.pid, signal.SIGCONT)
        client.close()
    finally:
        for text in c.stop():
            assert "Traceback" not in text


def test_an_identity_moving_between_nodes_is_online_then_offline_once(cluster: Cluster) -> None:
    """Bob moves from node 2 to node 1 (the older connection is replaced), then leaves: a
    watcher on node 1, where he arrived, hears online once and offline once."""
    n1, n2, _ = cluster.nodes
    b_priv, b_pub = new_identity()
    watcher = connect(n1, new_identity()[0])
    watcher.send_frame(wire.PresenceSubscribe((b_pub,)))
    assert presence(watcher, b_pub) is False
    first = connect(n2, b_priv)
    assert presence(watcher, b_pub) is True
    second = connect(n1, b_priv)
    first.expect_closed(timeout=8)
    with pytest.raises(TimeoutError):  # moving is neither offline nor online
        presence(watcher, b_pub, timeout=1.5)
    second.close()
    assert presence(watcher, b_pub) is False
    watcher.close()
