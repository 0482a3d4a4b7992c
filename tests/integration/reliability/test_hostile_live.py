"""Hostile clients against a live relay while two honest clients keep chatting.

``tests/test_relay_hostile.py`` checks each hostile input alone (the offending
connection is closed with a logged reason). Here they all run *at once*, for a
bounded time, while an honest pair exchanges messages through the same relay:

* garbage instead of a handshake, and garbage inside an authenticated link;
* maximum length fields (a MAX_FRAME length then a stall; maximum-size payloads);
* half-open handshakes (message 1 only, then silence) and slowloris (a byte a second);
* a thousand and more idle TCP connections at once (RLIMIT_NOFILE raised);
* a flood from one authenticated client (until it is rate limited);
* replayed Noise transport records on a live link;
* a client acknowledging (deleting) another identity's stored frames.

Stated bounds (2-core machine, generous): honest round trip p99 < 1 s and max
< 3 s during the attack; relay RSS < 400 MiB; nobody else's mailbox changes.

The attackers connect from other loopback networks (127.66.0.0/16; Linux routes all of
127/8 to lo): the relay's per-network budgets (accept rate, unfinished handshakes) are
meant to bind them, not the honest clients on 127.0.0.1. The issue-11 attacks, with the
issue's bounds, are in ``tests/reliability/test_relay_attacks.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from securechat.core import dh, noise, wire
from securechat.errors import SecureChatError

from relay_fixture import RelayProcess
from relayclient import new_identity

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
ATTACK_SECONDS = float(os.environ.get("SECURECHAT_HOSTILE_SECONDS", "12"))
MANY_CONNECTIONS = 1500
P99_BOUND_S = 1.0
MAX_BOUND_S = 3.0
RSS_BOUND_KB = 400 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Attack:
    """Runs ``step`` repeatedly in a thread until stopped; counts attempts and surprises."""

    def __init__(self, name: str, step: Callable[[], int], stop: threading.Event) -> None:
        self.name, self.step, self.stop = name, step, stop
        self.tried = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.tried += self.step()
            except (OSError, SecureChatError, TimeoutError):
                self.tried += 1  # the relay hung up on us: that is the expected outcome
            except Exception as exc:
                self.errors.append(repr(exc))
                return


_COUNTER = itertools.count()  # next() on it is atomic (C code under the GIL): thread-safe


def _source() -> str:
    """An attacker address: a new one each time, spread over many /24 networks."""
    i = next(_COUNTER)
    return f"127.66.{i % 256}.{1 + (i // 256) % 250}"


def _raw(relay: RelayProcess) -> socket.socket:
    return socket.create_connection(
        (relay.host, relay.port), timeout=5, source_address=(_source(), 0)
    )


def _closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except (TimeoutError, OSError):
        return False
    return True


def _garbage(relay: RelayProcess) -> int:
    with _raw(relay) as s:
        s.sendall(os.urandom(int.from_bytes(os.urandom(2), "big") % 4096 + 1))
        _closed(s, 3)
    return 1


def _garbage_inside(relay: RelayProcess) -> int:
    with relay.connect(new_identity()[0], source=_source()) as c:
        c.send_plain(os.urandom(200))
        c.expect_closed(timeout=5)
    return 1


def _max_length(relay: RelayProcess) -> int:
    with relay.connect(new_identity()[0], source=_source()) as c:
        c.send_plain(struct.pack(">IBB", wire.MAX_FRAME, wire.VERSION, wire.T_SEND))
        time.sleep(0.5)  # the relay holds a bounded buffer and waits; then we leave
    with relay.connect(new_identity()[0], source=_source()) as c:
        to = wire.mailbox_address(new_identity()[1])
        c.send_frame(wire.Send(os.urandom(16), to, os.urandom(wire.MAX_PAYLOAD)))
        c.recv_until(lambda f: isinstance(f, wire.Accepted | wire.Error), timeout=10)
    return 2


def _half_open(relay: RelayProcess) -> int:
    conn = noise.NoiseConnection(initiator=True, static_private=os.urandom(32), rng=os.urandom)
    with _raw(relay) as s:
        s.sendall(conn.initiate())
        _closed(s, 5)  # never answer message 2: the handshake timeout must close it
    return 1


def _slowloris(relay: RelayProcess, stop: threading.Event) -> int:
    conn = noise.NoiseConnection(initiator=True, static_private=os.urandom(32), rng=os.urandom)
    with _raw(relay) as s:
        for byte in conn.initiate():
            if stop.is_set():
                break
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.5)
    return 1


def _many(relay: RelayProcess, stop: threading.Event) -> int:
    socks = []
    try:
        for _ in range(MANY_CONNECTIONS):
            if stop.is_set():
                break
            try:
                socks.append(_raw(relay))
            except OSError:
                break
        stop.wait(2)
    finally:
        for s in socks:
            s.close()
    return len(socks)


def _flood(relay: RelayProcess) -> int:
    with relay.connect(new_identity()[0], source=_source()) as c:
        sent = 0
        with contextlib.suppress(OSError):
            for _ in range(50):
                c.send_frames([wire.Ping(i) for i in range(500)])
                sent += 500
        c.expect_closed(timeout=5)
    return sent


def _replay(relay: RelayProcess) -> int:
    with relay.connect(new_identity()[0], source=_source()) as c:
        record = c.noise.send(wire.encode(wire.Ping(1)))
        c.sock.sendall(record)
        c.recv_until(lambda f: f == wire.Pong(1))
        c.sock.sendall(record)  # the same transport record again
        after = c.expect_closed(timeout=5)
        assert not any(isinstance(f, wire.Pong) for f in after), "a replayed record was answered"
    return 1


NAMES = (
    "garbage before handshake",
    "garbage inside the link",
    "maximum length fields",
    "half-open handshakes",
    "slowloris",
    "thousands of connections",
    "flood from one client",
    "replayed transport records",
    "acking another mailbox",
)
SOLO_SECONDS = 3.0


@pytest.mark.parametrize(
    "group",
    [
        *[pytest.param(n, id=n.replace(" ", "-")) for n in NAMES],
        pytest.param("all", id="all-at-once"),
    ],
)
def test_honest_chat_survives_concurrent_attacks(tmp_path: Path, group: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    relay = RelayProcess.start(
        tmp_path / "relay",
        "--handshake-timeout",
        "2",
        "--rate-frames",
        "2000",
        "--burst-frames",
        "4000",
    )
    alice, alice_pub = new_identity()
    bob, bob_pub = new_identity()
    victim, victim_pub = new_identity()
    mallory, _ = new_identity()
    # frames stored for an offline victim, which mallory will try to delete
    stored = [(os.urandom(16), b"for the victim %d" % i) for i in range(5)]
    with relay.connect(alice) as a:
        for msg_id, payload in stored:
            a.send_frame(wire.Send(msg_id, wire.mailbox_address(victim_pub), payload))
            a.recv_until(lambda f, m=msg_id: isinstance(f, wire.Accepted) and f.msg_id == m)

    stop = threading.Event()
    attacks = [
        Attack("garbage before handshake", lambda: _garbage(relay), stop),
        Attack("garbage inside the link", lambda: _garbage_inside(relay), stop),
        Attack("maximum length fields", lambda: _max_length(relay), stop),
        Attack("half-open handshakes", lambda: _half_open(relay), stop),
        Attack("slowloris", lambda: _slowloris(relay, stop), stop),
        Attack("thousands of connections", lambda: _many(relay, stop), stop),
        Attack("flood from one client", lambda: _flood(relay), stop),
        Attack("replayed transport records", lambda: _replay(relay), stop),
    ]

    def cross_mailbox() -> int:
        with relay.connect(mallory, source=_source()) as m:
            m.send_frame(wire.Ack(tuple((dh.public_key(alice), i) for i, _ in stored)))
            m.send_frame(wire.Ping(9))
            frames = m.recv_until(lambda f: f == wire.Pong(9))[1]
            assert not any(isinstance(f, wire.Deliver) for f in frames), frames
        return 1

    attacks.append(Attack("acking another mailbox", cross_mailbox, stop))
    seconds = ATTACK_SECONDS
    if group != "all":
        attacks = [a for a in attacks if a.name == group]
        seconds = SOLO_SECONDS
    only = os.environ.get("SECURECHAT_HOSTILE_ONLY")  # to bisect: a substring of names
    if only:
        attacks = [a for a in attacks if only in a.name]
    latencies: list[float] = []
    rss: list[int] = []
    with relay.connect(alice) as a, relay.connect(bob) as b:
        for c in (a, b):
            c.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        for attack in attacks:
            attack.thread.start()
        end = time.monotonic() + seconds
        turn = 0
        while time.monotonic() < end:
            sender, receiver, to = (a, b, bob_pub) if turn % 2 == 0 else (b, a, alice_pub)
            msg_id = os.urandom(16)
            t0 = time.monotonic()
            sender.send_frame(wire.Send(msg_id, wire.mailbox_address(to), b"honest %d" % turn))
            frame, _ = receiver.recv_until(
                lambda f, m=msg_id: isinstance(f, wire.Deliver) and f.msg_id == m, timeout=5
            )
            assert isinstance(frame, wire.Deliver)
            receiver.send_frame(wire.Ack(((frame.sender_key, msg_id),)))
            latencies.append(time.monotonic() - t0)
            rss.append(rss_kb(relay.proc.pid))
            turn += 1
            time.sleep(0.02)
        stop.set()
        for attack in attacks:
            attack.thread.join(timeout=20)

    # the victim's stored frames survived mallory, in order
    with relay.connect(victim) as v:
        got = []
        while len(got) < len(stored):
            frame = v.recv_frame(timeout=10)
            if isinstance(frame, wire.Deliver):
                got.append((frame.msg_id, frame.payload))
        assert got == stored

    code, log = relay.stop()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    tried = {a.name: a.tried for a in attacks}
    print(
        f"\nhostile: honest round trips {len(latencies)}, p50 "
        f"{latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
        f"{latencies[-1] * 1000:.1f} ms; relay peak RSS {max(rss) // 1024} MiB; "
        f"hostile attempts {sum(tried.values())}: {tried}"
    )
    for attack in attacks:
        assert not attack.errors, (attack.name, attack.errors)
        assert attack.tried > 0, attack.name
    assert len(latencies) > 20
    assert p99 < P99_BOUND_S and latencies[-1] < MAX_BOUND_S, latencies[-10:]
    assert max(rss) < RSS_BOUND_KB, max(rss)
    assert code == 0 and "Traceback" not in log, log[-3000:]


def test_honest_send_delivered_under_churn(tmp_path: Path) -> None:
    """One thread opens connections that send random bytes; an honest pair exchanges
    messages meanwhile. Every Send must get its Deliver.

    This once failed because the harness never read the relay's stderr: a log line
    per connection filled the pipe and blocked the relay's workers in logging."""
    relay = RelayProcess.start(tmp_path / "relay", "--handshake-timeout", "2")
    alice, _ = new_identity()
    bob, bob_pub = new_identity()
    stop = threading.Event()
    churn = Attack("garbage before handshake", lambda: _garbage(relay), stop)
    try:
        with relay.connect(alice) as a, relay.connect(bob) as b:
            churn.thread.start()
            end = time.monotonic() + 8
            while time.monotonic() < end:
                msg_id = os.urandom(16)
                a.send_frame(wire.Send(msg_id, wire.mailbox_address(bob_pub), b"honest"))
                frame, _ = b.recv_until(
                    lambda f, m=msg_id: isinstance(f, wire.Deliver) and f.msg_id == m, timeout=5
                )
                b.send_frame(wire.Ack(((frame.sender_key, msg_id),)))  # type: ignore[union-attr]
                time.sleep(0.02)
    finally:
        stop.set()
        churn.thread.join(timeout=10)
        relay.stop()
