"""Who a connection is, in the relay's words: the fingerprint in its logs (issue 12.7,
protocol 2), a replaced connection (13.10), and a bundle the relay refuses (13.12)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from securechat.core import wire
from securechat.core.encoding import fingerprint
from securechat.errors import ConnectionClosedError

from relay_fixture import RelayProcess
from relayclient import new_identity

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    proc = RelayProcess.start(tmp_path_factory.mktemp("identity"))
    yield proc
    code, err = proc.stop()
    assert code == 0, err


def wait_for_log(relay: RelayProcess, needle: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = relay.log_text()
        if needle in text:
            return text
        time.sleep(0.05)
    pytest.fail(f"relay log never said {needle!r}:\n{relay.log_text()[-2000:]}")


def test_log_shows_the_identity_fingerprint_users_see(relay: RelayProcess) -> None:
    private, x25519 = new_identity()
    ed25519 = os.urandom(32)  # the relay only records it: only x25519's owner can claim it
    with relay.connect(private, payload=ed25519) as c:
        c.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        # what `securechat fingerprint` prints: BLAKE2b-160 over both public keys
        wait_for_log(relay, f"authenticated {fingerprint(x25519 + ed25519)} from ")
    assert fingerprint(x25519) not in relay.log_text()


def test_older_client_without_a_signing_key_is_labelled(relay: RelayProcess) -> None:
    private, x25519 = new_identity()
    with relay.connect(private) as c:
        c.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        wait_for_log(relay, f"authenticated x25519-only:{fingerprint(x25519)} from ")


@pytest.mark.parametrize("size", [1, 31, 33, 64])
def test_other_message_3_payloads_are_refused(relay: RelayProcess, size: int) -> None:
    private, _ = new_identity()
    with (
        pytest.raises((ConnectionClosedError, TimeoutError, OSError)),
        relay.connect(private, payload=os.urandom(size)) as c,
    ):
        c.recv_frame(timeout=3)


def test_replaced_connection_gets_replaced_error_first(relay: RelayProcess) -> None:
    private, _ = new_identity()
    first = relay.connect(private)
    first.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
    with relay.connect(private) as second:
        second.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        frames = first.expect_closed(timeout=5)
        assert frames and frames[-1] == wire.Error(
            wire.REPLACED, wire.NO_ID, "replaced by a newer connection"
        )
        second.send_frame(wire.Ping(1))
        assert second.recv_frame() == wire.Pong(1)
    first.close()


def test_one_time_prekeys_without_a_signed_prekey_are_refused(relay: RelayProcess) -> None:
    private, public = new_identity()
    otks = tuple(i.to_bytes(4, "big") + os.urandom(32) for i in range(1, 4))
    with relay.connect(private) as c:
        c.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        c.send_frame(wire.PublishPrekeys(b"", otks))
        frames = c.expect_closed(timeout=5)
        errors = [f for f in frames if isinstance(f, wire.Error)]
        assert errors and errors[-1].code == wire.BAD_FRAME
        assert "signed prekey" in errors[-1].reason
    with relay.connect(private) as c:  # nothing was stored or counted
        frame, _ = c.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        assert frame == wire.PrekeyCount(0)
        c.send_frame(wire.PublishPrekeys(b"spk", otks))  # with one, they are welcome
        assert c.recv_until(lambda f: isinstance(f, wire.PrekeyCount))[0] == wire.PrekeyCount(3)
    with relay.connect(new_identity()[0]) as other:
        other.send_frame(wire.FetchPrekeys(public))
        frame, _ = other.recv_until(lambda f: isinstance(f, wire.Prekeys))
        assert frame == wire.Prekeys(public, b"spk", otks[0])


def test_no_delivered_frames(relay: RelayProcess) -> None:
    """The relay's word is Accepted; 'delivered to the device' is for end-to-end receipts."""
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    with relay.connect(a_priv) as a:
        a.recv_until(lambda f: isinstance(f, wire.PrekeyCount))
        stored, live = os.urandom(16), os.urandom(16)
        a.send_frame(
            wire.SendMulti(stored, ((wire.mailbox_address(b_pub), b"x"), (os.urandom(32), b"y")))
        )
        a.recv_until(lambda f: isinstance(f, wire.Accepted))
        seen: list[wire.Frame] = []
        with relay.connect(b_priv) as b:
            b.recv_until(lambda f: isinstance(f, wire.Deliver))
            b.send_frame(wire.Ack(((a_pub, stored),)))
            a.send_frame(
                wire.SendMulti(
                    live, ((wire.mailbox_address(b_pub), b"z"), (wire.mailbox_address(a_pub), b"w"))
                )
            )
            b.recv_until(lambda f: isinstance(f, wire.Deliver) and f.msg_id == live)
            b.send_frame(wire.Ack(((a_pub, live),)))
            a.recv_until(lambda f: isinstance(f, wire.Deliver) and f.msg_id == live)
            a.send_frame(wire.Ack(((a_pub, live),)))
            got, skipped = a.recv_until(lambda f: isinstance(f, wire.Accepted) and f.msg_id == live)
            seen += skipped
            assert got == wire.Accepted(live, wire.STATUS_DELIVERED)
        a.send_frame(wire.Ping(9))
        seen += a.recv_until(lambda f: f == wire.Pong(9))[1]
        assert not any(isinstance(f, wire.Delivered) for f in seen), seen
