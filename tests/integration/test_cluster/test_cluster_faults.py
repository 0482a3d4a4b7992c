"""Fault injection on a relay cluster (issue 16): a node SIGKILLed, Redis killed and
restarted, in the middle of a steady stream. The promise checked is the relay's:
every message a sender saw accepted reaches its recipient (0 lost), and a
recipient shows each message once (0 duplicates shown). Figures: docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest
from reliability.harness import Client, make_identities
from securechat.client.events import StatusEvent
from securechat.client.messenger import Conversation
from securechat.core import wire
from securechat.errors import ConnectionClosedError

from paths import REPO
from relay_fixture import RelayProcess
from relayclient import RelayClient, new_identity
from test_cluster.nodes import Cluster, RedisServer

pytestmark = pytest.mark.timeout(180)
STREAM = 60  # messages in each stream (a kill lands after a third of them)
STREAM_GAP_S = 0.03
SETTLE_S = 60.0  # bound on the wait for every message to be accepted and shown


def addresses(*nodes: RelayProcess) -> str:
    return ",".join(f"{n.host}:{n.port}" for n in nodes)


def accepted_ids(client: Client) -> set[bytes]:
    return {e.msg_id for e in client.events.events if isinstance(e, StatusEvent) and e.status}


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def stream_with_fault(
    sender: Client, receiver: Client, fault: object, label: str
) -> tuple[int, int, int]:
    """Send STREAM messages, run ``fault()`` after a third; (accepted, lost, duplicates)."""
    conv = Conversation.with_peers(sender.identity.public, [receiver.identity.public])
    texts: dict[bytes, str] = {}
    for i in range(STREAM):
        text = f"{label} {i}"
        texts[sender.messenger.send_text(conv, text)] = text
        if i == STREAM // 3:
            fault()  # type: ignore[operator]
        time.sleep(STREAM_GAP_S)
    assert wait_for(lambda: accepted_ids(sender) >= set(texts), SETTLE_S), (
        f"{len(set(texts) - accepted_ids(sender))} of {STREAM} never accepted"
    )
    want = {texts[m] for m in accepted_ids(sender) if m in texts}
    wait_for(lambda: want <= set(receiver.events.texts()), SETTLE_S)
    shown = Counter(t for t in receiver.events.texts() if t.startswith(label))
    lost = len(want - set(shown))
    duplicates = sum(n - 1 for n in shown.values())
    return len(want), lost, duplicates


def test_sigkill_a_node_during_a_stream_its_clients_move(sc_home: Path, cluster: Cluster) -> None:
    """Both ends on node 1 (the live fast path), node 1 SIGKILLed: they fail over to
    the next address of their list (different nodes), and the stream goes on."""
    make_identities(sc_home, "alice", "bob")
    n1, n2, n3 = cluster.nodes
    alice = Client(sc_home, "alice", addresses(n1, n2, n3), n1.public)
    bob = Client(sc_home, "bob", addresses(n1, n3, n2), n1.public)
    try:
        assert alice.messenger.wait_connected(15) and bob.messenger.wait_connected(15)
        bob.messenger.synced.wait(15)
        started = time.monotonic()
        got, lost, dups = stream_with_fault(alice, bob, n1.kill, "kill")
        print(f"node SIGKILL: {got} accepted, {lost} lost, {dups} duplicates shown,"
              f" {time.monotonic() - started:.1f} s")  # fmt: skip
        assert (got, lost, dups) == (STREAM, 0, 0)
        assert alice.messenger.pending() == 0
    finally:
        alice.stop()
        bob.stop()


def test_restart_redis_during_a_stream(sc_home: Path, cluster: Cluster) -> None:
    """Redis SIGKILLed and started again (its append-only file reloaded) mid-stream:
    the relays retry, then refuse (STORE_FAILED, the clients retry); nothing accepted
    is lost."""
    make_identities(sc_home, "alice", "bob")
    n1, n2, _ = cluster.nodes
    alice = Client(sc_home, "alice", addresses(n1), n1.public)
    bob = Client(sc_home, "bob", addresses(n2), n1.public)
    servers: list[RedisServer] = []

    def restart() -> None:
        servers.append(cluster.redis.restart())

    try:
        assert alice.messenger.wait_connected(15) and bob.messenger.wait_connected(15)
        bob.messenger.synced.wait(15)
        started = time.monotonic()
        got, lost, dups = stream_with_fault(alice, bob, restart, "redis")
        print(f"redis restart: {got} accepted, {lost} lost, {dups} duplicates shown,"
              f" {time.monotonic() - started:.1f} s")  # fmt: skip
        assert (got, lost, dups) == (STREAM, 0, 0)
    finally:
        alice.stop()
        bob.stop()
        cluster.redis = servers[-1] if servers else cluster.redis
        for s in servers:
            s.stop()


def test_nothing_acknowledged_is_lost_when_redis_is_killed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The raw promise, frame by frame: a sender streams to an offline mailbox while
    Redis is SIGKILLed (no shutdown, no final fsync) and restarted; every frame the
    relay answered Accepted for is in the mailbox afterwards."""
    c = Cluster(tmp_path, redis_server)
    servers: list[RedisServer] = []
    try:
        node = c.start_node()
        sender_priv, _ = new_identity()
        bob_priv, bob_pub = new_identity()
        node.connect(bob_priv).recv_until(lambda f: isinstance(f, wire.Synced))  # known
        sender = node.connect(sender_priv)
        mailbox = wire.mailbox_address(bob_pub)
        acked: set[bytes] = set()
        refused = 0
        done = threading.Event()

        def killer() -> None:
            time.sleep(0.4)
            servers.append(redis_server.restart(sig=9))
            done.set()

        threading.Thread(target=killer, daemon=True).start()
        deadline = time.monotonic() + 30
        i = 0
        while (not done.is_set() or i < 400) and time.monotonic() < deadline:
            msg_id = os.urandom(wire.ID_SIZE)
            sender.send_frame(wire.Send(msg_id, mailbox, f"frame {i}".encode()))
            frame, _ = sender.recv_until(
                lambda f, m=msg_id: isinstance(f, wire.Accepted | wire.Error) and f.msg_id == m,
                timeout=15,
            )
            if isinstance(frame, wire.Accepted):
                acked.add(msg_id)
            else:
                refused += 1
            i += 1
        assert done.is_set() and len(acked) >= 300
        sender.close()
        bob = node.connect(bob_priv)
        seen: set[bytes] = set()
        end = time.monotonic() + 30
        while not acked <= seen and time.monotonic() < end:
            batch = []
            try:
                while len(batch) < 256:
                    f = bob.recv_frame(timeout=2)
                    if isinstance(f, wire.Deliver):
                        seen.add(f.msg_id)
                        batch.append(f)
            except TimeoutError:
                pass
            if batch:
                bob.send_frame(wire.Ack(tuple((f.sender_key, f.msg_id) for f in batch)))
        assert acked - seen == set(), f"{len(acked - seen)} acknowledged frames lost"
        print(f"redis SIGKILL: {len(acked)} acknowledged, {refused} refused, 0 lost")
        bob.close()
    finally:
        for text in c.stop():
            assert "Traceback" not in text
        for s in servers:
            s.stop()


def _soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("securechat_soak", REPO / "scripts" / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_cluster_soak(
    work: Path,
    redis: list[RedisServer],
    messages: int,
    kills: int,
    seed: int,
    rate: float,
    redis_share: float = 0.2,
) -> object:
    """scripts/soak.py's drivers and checker, against three nodes: the kills hit random
    nodes (restarted on their port), Redis (``redis_share`` of the kills: SIGKILLed and
    started again on its append-only file) and clients; each client knows every node.
    ``redis``: the server, replaced in place when it is restarted (the caller stops it)."""
    from relay_fixture import cli_env, keygen

    soak = _soak()
    rnd = random.Random(seed)
    plan = soak.streams()
    count = max(messages // sum(len(v) for v in plan.values()), 1)
    home = work / "home"
    keygen(home, *plan)
    c = Cluster(work, redis[0], "--ack-timeout", "1", "--log-level", "WARNING")
    nodes = [c.start_node() for _ in range(3)]
    key = str(nodes[0].data_dir / "relay.pub")
    env = cli_env(home)
    drivers = {}
    for i, name in enumerate(sorted(plan)):
        order = nodes[i % 3 :] + nodes[: i % 3]  # clients spread over the nodes
        drivers[name] = soak.Driver(name, work, env, addresses(*order), key, count, rate)
    fig = soak.Figures()
    for d in drivers.values():
        d.start()
    start = time.monotonic()
    pause = max(count / rate * 0.8, 2.0) / max(kills, 1)
    deadline = start + count / rate * 4 + 120
    while time.monotonic() < deadline:
        if (
            all(d.sent_all() for d in drivers.values())
            and fig.relay_kills + fig.client_kills >= kills
        ):
            break
        time.sleep(rnd.uniform(pause * 0.5, pause * 1.5))
        if fig.relay_kills + fig.client_kills >= kills:
            continue
        roll = rnd.random()
        if roll < redis_share:
            redis[0] = redis[0].restart()
            fig.redis_kills = getattr(fig, "redis_kills", 0) + 1
            fig.relay_kills += 1  # counted with the relay side's kills
        elif roll < 0.5 + redis_share / 2:
            i = rnd.randrange(3)
            nodes[i].kill()
            time.sleep(rnd.uniform(0.05, 0.6))
            nodes[i] = nodes[i].restart()
            fig.relay_kills += 1
        else:
            d = drivers[rnd.choice(sorted(drivers))]
            d.kill()
            time.sleep(rnd.uniform(0.0, 0.4))
            d.start()
            fig.client_kills += 1
    else:
        fig.problems.append("sending phase hit its deadline")
    (work / soak.STOP_FILE).touch()
    for d in drivers.values():
        d.wait(30)
    for d in drivers.values():
        d.start("drain")
    for d in drivers.values():
        if d.wait(soak.DRAIN_TIMEOUT_S + 60) != 0:
            fig.problems.append(f"driver {d.name} drain exited abnormally")
    for node in nodes:
        _, text = node.stop()
        if "Traceback" in text:
            fig.problems.append("a relay log has a Traceback")
    fig.seconds = round(time.monotonic() - start, 1)
    soak.analyse(work, plan, fig)
    return fig


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_against_a_cluster(tmp_path: Path, redis_server: RedisServer) -> None:
    servers = [redis_server]
    try:
        fig: object = run_cluster_soak(tmp_path, servers, messages=240, kills=8, seed=16, rate=20.0)
    finally:
        servers[0].stop()
    f = fig  # the soak's Figures
    assert f.problems == [], f.problems  # type: ignore[attr-defined]
    assert f.relay_kills >= 1 and f.client_kills >= 1  # type: ignore[attr-defined]
    assert f.lost == 0 and f.duplicates_shown == 0  # type: ignore[attr-defined]
    assert f.forgotten == 0 and f.order_violations == 0  # type: ignore[attr-defined]
    assert f.delivered >= f.deliveries_expected > 0  # type: ignore[attr-defined]
    assert getattr(fig, "redis_kills", 0) >= 1  # Redis itself was SIGKILLed too
    print(f"cluster soak: {fig}, Redis SIGKILLed {getattr(fig, 'redis_kills', 0)} times")


def test_a_client_refuses_a_node_with_another_key(
    sc_home: Path, cluster: Cluster, tmp_path: Path
) -> None:
    """One relay key for every address of the list: a node (or an impostor) presenting
    another key is refused, as a single relay is."""
    make_identities(sc_home, "alice")
    impostor = RelayProcess.start(tmp_path / "impostor")
    n1 = cluster.nodes[0]
    try:
        alice = Client(sc_home, "alice", addresses(n1, impostor), None)  # first use pins
        try:
            assert alice.messenger.wait_connected(15)
            n1.kill()  # alice moves on to the next address: the impostor
            assert wait_for(lambda: alice.messenger.fatal is not None, 20)
            text = str(alice.messenger.fatal)
            assert "presented key" in text and "other addresses of --relay" in text
        finally:
            alice.stop()
    finally:
        impostor.stop()


def test_raw_client_sees_refusal_not_silence_while_redis_is_down(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis stopped for longer than the relay's retries: a Send is answered with an
    Error (STORE_FAILED), never left unanswered and never accepted."""
    c = Cluster(tmp_path, redis_server)
    try:
        node = c.start_node()
        client: RelayClient = node.connect(new_identity()[0])
        client.recv_until(lambda f: isinstance(f, wire.Synced), timeout=10)
        redis_server.stop()
        msg_id = os.urandom(wire.ID_SIZE)
        client.send_frame(wire.Send(msg_id, wire.mailbox_address(new_identity()[1]), b"x"))
        try:
            frame, _ = client.recv_until(
                lambda f: isinstance(f, wire.Accepted | wire.Error) and f.msg_id == msg_id,
                timeout=20,
            )
        except ConnectionClosedError:
            pytest.fail("the relay closed the connection instead of answering")
        assert isinstance(frame, wire.Error) and frame.code == wire.STORE_FAILED
        client.close()
    finally:
        for text in c.stop():
            assert "Traceback" not in text
