"""Accepted means durable: kill -9 the relay mid-stream, restart, nothing accepted is lost."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from securechat.core import wire
from securechat.errors import ConnectionClosedError

from relay_fixture import RelayProcess
from relayclient import new_identity

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_sigkill_loses_nothing_accepted(tmp_path: Path, sync: str) -> None:
    relay = RelayProcess.start(tmp_path, "--sync", sync)
    a_priv, a_pub = new_identity()
    b_priv, b_pub = new_identity()
    with relay.connect(b_priv) as b:  # a known mailbox: the full quota, not the small one
        b.recv_until(lambda f: isinstance(f, wire.Synced))
    ids = [i.to_bytes(4, "big") + os.urandom(12) for i in range(20000)]
    accepted: set[bytes] = set()
    a = relay.connect(a_priv)
    frames = [wire.Send(m, wire.mailbox_address(b_pub), m * 8) for m in ids]

    def pump() -> None:  # keeps sending until the relay is gone
        try:
            for start in range(0, len(frames), 200):
                a.send_frames(frames[start : start + 200])
        except OSError:
            pass

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        while len(accepted) < 1000:
            frame = a.recv_frame(timeout=20)
            if isinstance(frame, wire.Accepted):
                accepted.add(frame.msg_id)
        relay.kill()
        while True:  # frames already on their way before the kill count too
            frame = a.recv_frame(timeout=5)
            if isinstance(frame, wire.Accepted):
                accepted.add(frame.msg_id)
    except (ConnectionClosedError, TimeoutError):
        pass
    sender.join(timeout=10)
    a.close()
    assert relay.proc.poll() is not None
    assert 1000 <= len(accepted) < len(ids)  # killed mid-stream

    relay = relay.restart()
    try:
        with relay.connect(b_priv) as b:
            got: list[bytes] = []
            while True:
                frame = b.recv_frame(timeout=20)
                if isinstance(frame, wire.Synced):
                    break
                if isinstance(frame, wire.Deliver):
                    assert frame.sender_key == a_pub
                    got.append(frame.msg_id)
        assert accepted <= set(got), f"{len(accepted - set(got))} accepted frames lost"
        assert len(got) == len(set(got))  # no duplicates
        assert got == sorted(got)  # in the order sent
    finally:
        code, _err = relay.stop()
    assert code == 0


def test_sigterm_clean_shutdown_and_no_secrets_in_logs(tmp_path: Path) -> None:
    relay = RelayProcess.start(tmp_path)
    a_priv, _ = new_identity()
    _, b_pub = new_identity()
    secret_payload = b"TOP-SECRET-PAYLOAD"
    with relay.connect(a_priv) as a:
        m = os.urandom(16)
        a.send_frame(wire.Send(m, wire.mailbox_address(b_pub), secret_payload))
        a.recv_until(lambda f: isinstance(f, wire.Accepted))
        code, err = relay.stop()
        frames = a.expect_closed()
    assert code == 0
    assert any(isinstance(f, wire.Error) and f.code == wire.SERVER_SHUTDOWN for f in frames)
    assert "TOP-SECRET" not in err
    key_text = (tmp_path / "relay.key").read_text()
    secret_line = next(line for line in key_text.splitlines() if line.startswith("secret"))
    assert secret_line.split(":", 1)[1][:20] not in err
    assert "authenticated" in err and "disconnected" in err and "shutting down" in err
