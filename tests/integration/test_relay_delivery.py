"""Relay delivery semantics, against the relay as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat.core import wire

from relay_fixture import RelayProcess
from relayclient import RelayClient, new_identity

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("relay"), "--ack-timeout", "1")
    yield proc
    code, err = proc.stop()
    assert code == 0, err


def mid() -> bytes:
    return os.urandom(16)


def mb(public: bytes) -> bytes:
    return wire.mailbox_address(public)


def settle(client: RelayClient) -> None:
    """Consume the Synced and PrekeyCount every fresh connection gets."""
    seen = {type(client.recv_frame()), type(client.recv_frame())}
    assert seen == {wire.Synced, wire.PrekeyCount}


def connect(relay: RelayProcess, private: bytes) -> RelayClient:
    client = relay.connect(private)
    settle(client)
    return client


def deliveries(client: RelayClient, n: int, timeout: float = 10.0) -> list[wire.Deliver]:
    out = []
    for _ in range(n):
        frame, _ = client.recv_until(lambda f: isinstance(f, wire.Deliver), timeout)
        assert isinstance(frame, wire.Deliver)
        out.append(frame)
    return out


def no_frame(client: RelayClient, timeout: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        frame = client.recv_frame(timeout)
        pytest.fail(f"unexpected frame {frame}")


def test_key_files_written_with_safe_modes(relay: RelayProcess) -> None:
    assert (relay.data_dir / "relay.key").stat().st_mode & 0o777 == 0o600
    assert relay.data_dir.stat().st_mode & 0o777 == 0o700
    assert (relay.data_dir / "relay.key").read_text().startswith("SECURECHAT RELAY KEY v1\n")


def test_offline_then_online_delivery_without_relay_receipt(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    with connect(relay, a_priv) as a:
        m = mid()
        a.send_frame(wire.Send(m, mb(b_pub), b"hello"))
        assert a.recv_frame() == wire.Accepted(m, wire.STATUS_STORED)
        with relay.connect(b_priv) as b:
            frame, _ = b.recv_until(lambda f: isinstance(f, wire.Deliver))
            assert isinstance(frame, wire.Deliver)
            assert (frame.msg_id, frame.sender_key, frame.payload) == (m, a_pub, b"hello")
            b.recv_until(lambda f: isinstance(f, wire.Synced))
            b.send_frame(wire.Ack(((a_pub, m),)))
            # no Delivered (deprecated): delivery is for the peers' end-to-end receipts
            no_frame(a, 0.5)
        with connect(relay, b_priv) as b:  # acked: gone from the store
            no_frame(b)


def test_live_accepted_only_after_ack(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    with connect(relay, a_priv) as a, connect(relay, b_priv) as b:
        m = mid()
        a.send_frame(wire.Send(m, mb(b_pub), b"live"))
        frame = b.recv_frame()
        assert isinstance(frame, wire.Deliver) and frame.payload == b"live"
        no_frame(a, 0.3)  # not accepted while the recipient has not acked
        b.send_frame(wire.Ack(((a_pub, m),)))
        # Accepted(2) is the receipt of a live single Send: no separate Delivered
        assert a.recv_frame() == wire.Accepted(m, wire.STATUS_DELIVERED)
        no_frame(a, 0.3)


def test_live_send_multi_accepted_once_every_copy_is_acked(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    c_priv, c_pub = new_identity()
    with connect(relay, a_priv) as a, connect(relay, b_priv) as b, connect(relay, c_priv) as c:
        m = mid()
        a.send_frame(wire.SendMulti(m, ((mb(b_pub), b"to b"), (mb(c_pub), b"to c"))))
        for reader in (b, c):
            frame = reader.recv_frame()
            assert isinstance(frame, wire.Deliver) and frame.msg_id == m
        b.send_frame(wire.Ack(((a_pub, m),)))
        no_frame(a, 0.3)  # c has not acked: no Accepted yet, and no per-copy receipt
        c.send_frame(wire.Ack(((a_pub, m),)))
        assert a.recv_frame() == wire.Accepted(m, wire.STATUS_DELIVERED)
        no_frame(a, 0.3)


def test_unacked_live_copy_is_stored_after_ack_timeout(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    m = mid()
    with connect(relay, a_priv) as a:
        with connect(relay, b_priv) as b:
            a.send_frame(wire.Send(m, mb(b_pub), b"ack me"))
            assert isinstance(b.recv_frame(), wire.Deliver)
            assert a.recv_frame(timeout=5) == wire.Accepted(m, wire.STATUS_STORED)
        with relay.connect(b_priv) as b:  # never acked: delivered again from the store
            (again,) = deliveries(b, 1)
            assert again.msg_id == m
            b.send_frame(wire.Ack(((a_pub, m),)))
            no_frame(a, 0.3)
        with connect(relay, b_priv) as b:  # the acknowledged stored copy is gone
            no_frame(b)


def test_recipient_disconnect_before_ack_keeps_copy(relay: RelayProcess) -> None:
    a_priv, _ = new_identity()
    b_priv, b_pub = new_identity()
    m = mid()
    with connect(relay, a_priv) as a:
        b = connect(relay, b_priv)
        a.send_frame(wire.Send(m, mb(b_pub), b"x"))
        assert isinstance(b.recv_frame(), wire.Deliver)
        b.close()
        assert a.recv_frame() == wire.Accepted(m, wire.STATUS_STORED)
    with relay.connect(b_priv) as b:
        assert deliveries(b, 1)[0].msg_id == m


def test_per_sender_order_across_offline_and_online(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    ids = [i.to_bytes(16, "big") for i in range(600)]
    connect(relay, b_priv).close()  # b's identity has connected: its mailbox is known
    with connect(relay, a_priv) as a:
        a.send_frames([wire.Send(i, mb(b_pub), i) for i in ids[:300]])
        for _ in range(300):
            a.recv_until(lambda f: isinstance(f, wire.Accepted))
        with relay.connect(b_priv) as b:
            # sent while b's backlog is still being fetched: must not overtake it
            a.send_frames([wire.Send(i, mb(b_pub), i) for i in ids[300:]])
            got = deliveries(b, 600)
            assert [d.msg_id for d in got] == ids
            b.send_frames([wire.Ack(tuple((a_pub, d.msg_id) for d in got[:500]))])
            b.send_frames([wire.Ack(tuple((a_pub, d.msg_id) for d in got[500:]))])
            accepted = 300
            while accepted < 600:
                _frame, _ = a.recv_until(lambda f: isinstance(f, wire.Accepted))
                accepted += 1


def test_send_multi_accepted_when_every_copy_is_safe(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    _, c_pub = new_identity()
    m = mid()
    with connect(relay, a_priv) as a, connect(relay, b_priv) as b:
        a.send_frame(wire.SendMulti(m, ((mb(b_pub), b"to b"), (mb(c_pub), b"to c"))))
        frame = b.recv_frame()
        assert isinstance(frame, wire.Deliver) and frame.payload == b"to b"
        no_frame(a, 0.3)  # c's copy is stored, b's not acked yet
        b.send_frame(wire.Ack(((a_pub, m),)))
        frame, _ = a.recv_until(lambda f: isinstance(f, wire.Accepted))
        assert frame == wire.Accepted(m, wire.STATUS_STORED)  # the lowest status of the copies


def test_retry_is_idempotent(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    m = mid()
    with connect(relay, a_priv) as a:
        for _ in range(3):
            a.send_frame(wire.Send(m, mb(b_pub), b"once"))
            assert a.recv_frame() == wire.Accepted(m, wire.STATUS_STORED)
        with relay.connect(b_priv) as b:
            (_d,) = deliveries(b, 1)
            b.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
            no_frame(b)
            b.send_frame(wire.Ack(((a_pub, m),)))
            b.send_frame(wire.Ping(7))  # handled in order: the Ack is done by the Pong
            b.recv_until(lambda f: f == wire.Pong(7))
            # a retry after the ack is accepted again but not delivered again
            a.send_frame(wire.Send(m, mb(b_pub), b"once"))
            assert a.recv_frame() == wire.Accepted(m, wire.STATUS_DELIVERED)
            no_frame(b)


def test_cannot_collect_or_ack_another_mailbox(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    c_priv, _ = new_identity()
    m = mid()
    with connect(relay, a_priv) as a:
        a.send_frame(wire.Send(m, mb(b_pub), b"for b only"))
        assert a.recv_frame() == wire.Accepted(m, wire.STATUS_STORED)
    with connect(relay, c_priv) as c:
        c.send_frame(wire.Ack(((a_pub, m),)))  # acks are scoped to c's own mailbox
        no_frame(c)
    with relay.connect(b_priv) as b:
        assert deliveries(b, 1)[0].payload == b"for b only"


def test_wrong_relay_key_refused(relay: RelayProcess) -> None:
    from securechat.errors import RelayKeyChangedError

    with pytest.raises(RelayKeyChangedError):
        RelayClient.connect(relay.host, relay.port, new_identity()[0], bytes(31) + b"\x09")


def test_prekeys_one_time_handout(relay: RelayProcess) -> None:
    a_priv, a_pub = new_identity()
    otks = (b"\x00\x00\x00\x01" + os.urandom(32), b"\x00\x00\x00\x02" + os.urandom(32))
    with connect(relay, a_priv) as a:
        a.send_frame(wire.PublishPrekeys(b"signed-prekey", otks))
        assert a.recv_frame() == wire.PrekeyCount(2)
    c_priv, _ = new_identity()
    with connect(relay, c_priv) as c:
        got = []
        for _ in range(3):
            c.send_frame(wire.FetchPrekeys(a_pub))
            frame = c.recv_frame()
            assert isinstance(frame, wire.Prekeys) and frame.signed_prekey == b"signed-prekey"
            got.append(frame.one_time_prekey)
        assert got == [otks[0], otks[1], None]
        c.send_frame(wire.FetchPrekeys(new_identity()[1]))
        frame = c.recv_frame()
        assert isinstance(frame, wire.Prekeys) and frame.signed_prekey == b""
    with relay.connect(a_priv) as a:
        frame, _ = a.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        assert frame == wire.PrekeyCount(0)


def test_presence(relay: RelayProcess) -> None:
    a_priv, _ = new_identity()
    b_priv, b_pub = new_identity()
    with connect(relay, a_priv) as a:
        a.send_frame(wire.PresenceSubscribe((b_pub,)))
        assert a.recv_frame() == wire.Presence(b_pub, False)
        b = connect(relay, b_priv)
        assert a.recv_frame() == wire.Presence(b_pub, True)
        b.close()
        assert a.recv_frame() == wire.Presence(b_pub, False)


def test_ping_pong(relay: RelayProcess) -> None:
    with connect(relay, new_identity()[0]) as a:
        a.send_frame(wire.Ping(42))
        assert a.recv_frame() == wire.Pong(42)


def test_quota_exceeded_is_an_error_frame(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path, "--quota-frames", "3")
    try:
        a_priv, _ = new_identity()
        _, b_pub = new_identity()
        with connect(relay, a_priv) as a:
            ids = [mid() for _ in range(4)]
            for m in ids[:3]:
                a.send_frame(wire.Send(m, mb(b_pub), b"x"))
                assert a.recv_frame() == wire.Accepted(m, wire.STATUS_STORED)
            a.send_frame(wire.Send(ids[3], mb(b_pub), b"x"))
            frame = a.recv_frame()
            assert isinstance(frame, wire.Error)
            assert (frame.code, frame.msg_id) == (wire.QUOTA_EXCEEDED, ids[3])
            a.send_frame(wire.Send(ids[0], mb(b_pub), b"x"))  # a retry is not over quota
            assert a.recv_frame() == wire.Accepted(ids[0], wire.STATUS_STORED)
    finally:
        assert relay.stop()[0] == 0


def test_ttl_expiry(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path, "--ttl", "0.5", "--purge-interval", "0.2")
    try:
        a_priv, _ = new_identity()
        b_priv, b_pub = new_identity()
        with connect(relay, a_priv) as a:
            a.send_frame(wire.Send(mid(), mb(b_pub), b"short-lived"))
            assert isinstance(a.recv_frame(), wire.Accepted)
        import time

        time.sleep(1.2)
        with connect(relay, b_priv) as b:  # settle() saw Synced with no Deliver before it
            no_frame(b)
    finally:
        code, err = relay.stop()
        assert code == 0
        assert "purged 1 expired" in err


def test_store_failure_is_store_failed_not_accepted(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path, "--store-max-bytes", "90000")
    try:
        a_priv, _ = new_identity()
        _, b_pub = new_identity()
        with connect(relay, a_priv) as a:
            codes = []
            for _ in range(20):
                m = mid()
                a.send_frame(wire.Send(m, mb(b_pub), os.urandom(60000)))
                frame = a.recv_frame()
                assert frame.msg_id == m  # type: ignore[union-attr]
                codes.append(frame.code if isinstance(frame, wire.Error) else "ok")
                if isinstance(frame, wire.Error):
                    break
            assert codes[-1] == wire.STORE_FAILED
            a.send_frame(wire.Ping(1))  # the connection and the relay live on
            assert a.recv_frame() == wire.Pong(1)
    finally:
        assert relay.stop()[0] == 0
