"""Hostile input closes only the offending connection; the relay keeps serving everyone."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat.core import wire
from securechat.errors import SecureChatError

from relay_fixture import RelayProcess
from relayclient import RelayClient, new_identity

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(
        tmp_path_factory.mktemp("hostile"),
        "--handshake-timeout", "1", "--idle-timeout", "30",
        "--rate-frames", "200", "--burst-frames", "400",
        "--max-per-ip", "40", "--ack-timeout", "5",
    )  # fmt: skip
    yield proc
    code, err = proc.stop()
    assert code == 0, err
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def bystander(relay: RelayProcess) -> Iterator[RelayClient]:
    """A well-behaved client that must stay connected through every attack."""
    client = relay.connect(new_identity()[0])
    client.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
    yield client
    client.close()


def still_serving(relay: RelayProcess, bystander: RelayClient) -> None:
    nonce = int.from_bytes(os.urandom(8), "big")
    bystander.send_frame(wire.Ping(nonce))
    assert bystander.recv_frame(timeout=5) == wire.Pong(nonce)
    with relay.connect(new_identity()[0]) as fresh:
        fresh.send_frame(wire.Ping(1))
        fresh.recv_until(lambda f: f == wire.Pong(1))


def raw_closed(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def error_then_closed(client: RelayClient) -> wire.Error:
    frames = client.expect_closed(timeout=5)
    errors = [f for f in frames if isinstance(f, wire.Error)]
    assert errors, frames
    return errors[-1]


def authed(relay: RelayProcess, private: bytes | None = None) -> RelayClient:
    client = relay.connect(private or new_identity()[0])
    client.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
    return client


def test_garbage_instead_of_handshake(relay: RelayProcess, bystander: RelayClient) -> None:
    with socket.create_connection((relay.host, relay.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        assert raw_closed(sock, 5)
    still_serving(relay, bystander)


def test_stalled_handshake_times_out(relay: RelayProcess, bystander: RelayClient) -> None:
    with socket.create_connection((relay.host, relay.port)) as sock:
        sock.sendall(b"\x00")  # slowloris: one byte of a record length, then nothing
        start = time.monotonic()
        assert raw_closed(sock, 5)
        assert time.monotonic() - start < 4
    still_serving(relay, bystander)


def test_oversized_frame_length(relay: RelayProcess, bystander: RelayClient) -> None:
    with authed(relay) as c:
        c.send_plain(struct.pack(">I", wire.MAX_FRAME + 1) + b"\x01\x10")
        assert error_then_closed(c).code == wire.TOO_LARGE
    still_serving(relay, bystander)


@pytest.mark.parametrize(
    "plain",
    [
        struct.pack(">IBB", 2, 1, 0x7F),  # unknown type
        struct.pack(">IBB", 2, 9, 0x22),  # unknown version
        struct.pack(">IBB", 3, 1, 0x50) + b"\0",  # short Ping
        wire.encode(wire.Deliver(bytes(16), bytes(32), 0, b"x")),  # relay-to-client type
        wire.encode(wire.Accepted(bytes(16), 1)),
    ],
    ids=["unknown-type", "unknown-version", "short-body", "deliver-from-client", "accepted"],
)
def test_malformed_frames(relay: RelayProcess, bystander: RelayClient, plain: bytes) -> None:
    with authed(relay) as c:
        c.send_plain(plain)
        assert error_then_closed(c).code == wire.BAD_FRAME
    still_serving(relay, bystander)


def test_tampered_record(relay: RelayProcess, bystander: RelayClient) -> None:
    with authed(relay) as c:
        record = bytearray(c.noise.send(wire.encode(wire.Ping(3))))
        record[5] ^= 1
        c.sock.sendall(bytes(record))
        assert c.expect_closed() == []
    still_serving(relay, bystander)


def test_idle_timeout_and_ping_keepalive(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path, "--idle-timeout", "1.5")
    try:
        idle = authed(relay)
        alive = authed(relay)
        for i in range(6):  # 3 s, twice the idle timeout
            alive.send_frame(wire.Ping(i))
            assert alive.recv_frame(timeout=2) == wire.Pong(i)
            time.sleep(0.5)
        idle.expect_closed(timeout=3)
        alive.close()
    finally:
        code, err = relay.stop()
    assert code == 0
    assert "idle timeout" in err


def test_frame_flood_is_served_then_not_read_until_paid(
    relay: RelayProcess, bystander: RelayClient
) -> None:
    """Over its frame budget a connection is not closed (a reconnect would only buy it a
    fresh allowance): what it already sent is handled, then it is not read until the
    budget (200/s here) has paid for it."""
    with authed(relay) as c:
        c.send_frames([wire.Ping(i) for i in range(1000)])
        for i in range(1000):
            assert c.recv_frame(timeout=5) == wire.Pong(i)
        t0 = time.monotonic()
        c.send_frame(wire.Ping(5000))  # 600 over the 400 it started with: 3 s at 200/s
        assert c.recv_frame(timeout=10) == wire.Pong(5000)
        assert time.monotonic() - t0 > 2.0
        still_serving(relay, bystander)  # meanwhile everyone else is served


def test_byte_flood_rate_limited(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path, "--rate-bytes", "20000", "--burst-bytes", "40000")
    try:
        with authed(relay) as c:
            with contextlib.suppress(OSError):
                for _ in range(20):
                    c.send_frames([wire.Ping(i) for i in range(1000)])  # 14 KB each
            errors = [f for f in c.expect_closed(timeout=5) if isinstance(f, wire.Error)]
            assert errors and errors[-1].code == wire.RATE_LIMITED
    finally:
        assert relay.stop()[0] == 0


def test_too_many_connections_per_ip(relay: RelayProcess, bystander: RelayClient) -> None:
    socks = []
    try:
        refused = False
        for _ in range(60):
            sock = socket.create_connection((relay.host, relay.port))
            socks.append(sock)
        for sock in socks:  # the ones over the cap are closed at once
            if raw_closed(sock, 0.05):
                refused = True
        assert refused
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    still_serving(relay, bystander)


def test_handshake_with_wrong_pinned_key_does_not_hurt(
    relay: RelayProcess, bystander: RelayClient
) -> None:
    with pytest.raises(SecureChatError):
        RelayClient.connect(relay.host, relay.port, new_identity()[0], os.urandom(32))
    still_serving(relay, bystander)


def test_low_order_client_key_refused(relay: RelayProcess, bystander: RelayClient) -> None:
    # An all-zero ephemeral key is a low-order point: the relay must refuse it.
    with socket.create_connection((relay.host, relay.port)) as sock:
        sock.sendall(struct.pack(">H", 32) + bytes(32))
        assert raw_closed(sock, 3)  # DH with it gives zero: refused, no message 2
    still_serving(relay, bystander)


def test_stalled_receiver_does_not_slow_others(relay: RelayProcess, bystander: RelayClient) -> None:
    a_priv, _ = new_identity()
    s_priv, s_pub = new_identity()
    c_priv, c_pub = new_identity()
    d_priv, _ = new_identity()
    stalled = relay.connect(s_priv)  # never reads
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with authed(relay, a_priv) as a, authed(relay, c_priv) as c, relay.connect(d_priv) as d:
        payload = os.urandom(60000)
        n = 120  # ~7 MiB for a receiver that reads nothing
        for _start in range(0, n, 10):
            a.send_frames([wire.Send(os.urandom(16), wire.mailbox_address(s_pub), payload)
                           for _ in range(10)])  # fmt: skip
            time.sleep(0.05)  # stay under the frame rate limit
        latencies = []
        for _ in range(10):
            m = os.urandom(16)
            t0 = time.monotonic()
            d.send_frame(wire.Send(m, wire.mailbox_address(c_pub), b"quick"))
            frame, _ = c.recv_until(lambda f: isinstance(f, wire.Deliver))
            latencies.append(time.monotonic() - t0)
            c.send_frame(wire.Ack(((_pub(d_priv), m),)))
        assert max(latencies) < 0.5, latencies
        statuses = []
        while len(statuses) < n:
            frame = a.recv_frame(timeout=15)
            if isinstance(frame, wire.Accepted):
                statuses.append(frame.status)
        assert wire.STATUS_STORED in statuses  # spilled to the store, nothing dropped
    stalled.close()
    still_serving(relay, bystander)


def _pub(private: bytes) -> bytes:
    from securechat.core import dh

    return dh.public_key(private)
