"""Disk trouble: full disk, read-only disk, corrupt database, corrupt key files.

The relay must refuse to acknowledge what it could not store (``Error(STORE_FAILED)``
with the message id, never ``Accepted``), say why in its log or a one-line exit
message, and never lose what it stored before the fault: frames accepted before
the disk filled up or went read-only are delivered once the fault clears (and
after a kill -9 during the fault). On the client side, a corrupt state or key file
gives a clear one-line error.

A real full or read-only disk needs a small tmpfs (``mount``, root only); without
it the full-disk case uses the relay's ``--store-max-bytes`` cap and the read-only
case is skipped.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from securechat.core import wire

from cli_output import error_text
from paths import REPO
from relay_fixture import RelayProcess, keygen, run_cli
from relayclient import RelayClient, new_identity

pytestmark = pytest.mark.timeout(120)
PAYLOAD = 48 * 1024  # a large (but legal) stored payload, to fill a small disk fast
TMPFS_SIZE = "1m"
MAX_SUBMISSIONS = 200  # bound on the "fill the disk" loop


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(mnt)], check=True, timeout=10, capture_output=True
    )


def submit(client: RelayClient, to: bytes, msg_id: bytes, payload: bytes) -> wire.Frame:
    """Send one frame; return the relay's verdict on it (Accepted or Error)."""
    client.send_frame(wire.Send(msg_id, wire.mailbox_address(to), payload))
    frame, _ = client.recv_until(
        lambda f: isinstance(f, wire.Accepted | wire.Error) and f.msg_id == msg_id, timeout=10
    )
    return frame


def no_late_accept(client: RelayClient, msg_id: bytes, seconds: float = 1.0) -> None:
    with contextlib.suppress(TimeoutError):
        frame, _ = client.recv_until(
            lambda f: isinstance(f, wire.Accepted) and f.msg_id == msg_id, timeout=seconds
        )
        raise AssertionError(f"the relay accepted {msg_id.hex()} after refusing it: {frame}")


def fill_until_refused(
    client: RelayClient, to: bytes
) -> tuple[list[tuple[bytes, bytes]], tuple[bytes, bytes], wire.Error]:
    """Accepted (id, payload) pairs, then the refused one and its Error."""
    accepted: list[tuple[bytes, bytes]] = []
    for i in range(MAX_SUBMISSIONS):
        msg_id, payload = os.urandom(16), i.to_bytes(4, "big") + os.urandom(PAYLOAD)
        verdict = submit(client, to, msg_id, payload)
        if isinstance(verdict, wire.Error):
            return accepted, (msg_id, payload), verdict
        assert verdict == wire.Accepted(msg_id, wire.STATUS_STORED)
        accepted.append((msg_id, payload))
    raise AssertionError(f"the store never filled up after {MAX_SUBMISSIONS} frames")


def drain(relay: RelayProcess, private: bytes, expect: int) -> list[wire.Deliver]:
    """Connect as the recipient, collect ``expect`` deliveries in order, ack them."""
    got: list[wire.Deliver] = []
    with relay.connect(private) as c:
        deadline = time.monotonic() + 20
        while len(got) < expect and time.monotonic() < deadline:
            frame = c.recv_frame(timeout=max(deadline - time.monotonic(), 0.1))
            if isinstance(frame, wire.Deliver):
                got.append(frame)
                c.send_frame(wire.Ack(((frame.sender_key, frame.msg_id),)))
        c.send_frame(wire.Ping(7))
        c.recv_until(lambda f: f == wire.Pong(7))
    return got


def _check_delivered(got: list[wire.Deliver], sent: list[tuple[bytes, bytes]]) -> None:
    assert [(d.msg_id, d.payload) for d in got] == sent, "stored frames lost or reordered"


def _full_disk_scenario(relay: RelayProcess, clear_fault: Callable[[], None]) -> RelayProcess:
    """Fill the store until refused, kill -9, restart, clear the fault, check nothing lost."""
    alice, _ = new_identity()
    bob, bob_pub = new_identity()
    with relay.connect(alice) as a:
        accepted, (fail_id, fail_payload), err = fill_until_refused(a, bob_pub)
        assert err.code == wire.STORE_FAILED, err
        assert len(accepted) >= 1  # fewer fit: the relay holds a reserve for acks
        no_late_accept(a, fail_id)
        a.send_frame(wire.Ping(1))  # the relay keeps serving the connection
        a.recv_until(lambda f: f == wire.Pong(1))
    # kill -9 while the disk is full, restart on the full disk: nothing accepted is lost
    relay.kill()
    relay = relay.restart()
    _check_delivered(drain(relay, bob, len(accepted)), accepted)
    clear_fault()
    with relay.connect(alice) as a:  # the sender's retry of the refused frame now succeeds
        verdict: wire.Frame = wire.Error(0, fail_id, "")
        for _ in range(20):
            verdict = submit(a, bob_pub, fail_id, fail_payload)
            if isinstance(verdict, wire.Accepted):
                break
            time.sleep(0.25)
        assert verdict == wire.Accepted(fail_id, wire.STATUS_STORED), verdict
    # at-least-once: copies whose Ack could not be recorded on the full disk may come
    # again (the E2E layer hides them); the refused-then-accepted frame must come too.
    late = drain_until(relay, bob, fail_id)
    assert late[-1].payload == fail_payload
    assert {d.msg_id for d in late[:-1]} <= {m for m, _ in accepted}
    return relay


def drain_until(relay: RelayProcess, private: bytes, msg_id: bytes) -> list[wire.Deliver]:
    got: list[wire.Deliver] = []
    with relay.connect(private) as c:
        deadline = time.monotonic() + 20
        while not got or got[-1].msg_id != msg_id:
            frame = c.recv_frame(timeout=max(deadline - time.monotonic(), 0.1))
            if isinstance(frame, wire.Deliver):
                got.append(frame)
                c.send_frame(wire.Ack(((frame.sender_key, frame.msg_id),)))
    return got


def _ballast(mnt: Path, size: int) -> Path:
    path = mnt / "ballast"
    with contextlib.suppress(OSError):
        path.write_bytes(bytes(size))
    return path


def test_full_disk_tmpfs(tmpfs: Path) -> None:
    """A real ENOSPC: a ballast file fills most of a small tmpfs; removing it clears the fault."""
    ballast = _ballast(tmpfs, 600 * 1024)
    relay = RelayProcess.start(tmpfs / "relay")
    try:
        relay = _full_disk_scenario(relay, ballast.unlink)
    finally:
        code, log = relay.stop()
    assert "Traceback" not in log, log
    assert code == 0, log


def test_full_store_cap(tmp_path: Path) -> None:
    """The same promise with the store's own size cap (works without root); acks free space."""
    relay = RelayProcess.start(tmp_path / "relay", "--store-max-bytes", str(512 * 1024))
    try:
        relay = _full_disk_scenario(relay, lambda: None)
    finally:
        code, log = relay.stop()
    assert "Traceback" not in log, log
    assert code == 0, log


def test_full_disk_recovers_when_recipient_drains(tmpfs: Path) -> None:
    """Without admin action: once the recipient acknowledged everything, space is reusable."""
    relay = RelayProcess.start(tmpfs / "relay")
    try:
        relay = _full_disk_scenario(relay, lambda: None)
    finally:
        relay.stop()


def test_full_disk_is_logged(tmpfs: Path) -> None:
    relay = RelayProcess.start(tmpfs / "relay")
    alice, _ = new_identity()
    with relay.connect(alice) as a:
        fill_until_refused(a, new_identity()[1])
    _, log = relay.stop()
    assert "full" in log.lower(), log  # "database or disk is full"


def test_read_only_disk_refuses_then_recovers(tmpfs: Path) -> None:
    """The disk goes read-only (remounted: the relay must be down for that, kill -9 here).

    Restarted on it, the relay either refuses to start with a one-line reason or
    runs and refuses to accept (STORE_FAILED); once the disk is writable again,
    everything accepted before is delivered.
    """
    relay = RelayProcess.start(tmpfs / "relay")
    alice, _ = new_identity()
    bob, bob_pub = new_identity()
    before = [(os.urandom(16), b"before %d" % i) for i in range(3)]
    with relay.connect(alice) as a:
        for msg_id, payload in before:
            assert isinstance(submit(a, bob_pub, msg_id, payload), wire.Accepted)
    relay.kill()
    _remount(tmpfs, "ro")
    refused = (os.urandom(16), b"while read-only")
    try:
        try:
            ro = relay.restart()
        except RuntimeError as exc:  # refused to start: the reason must be one clear line
            reason = str(exc).partition("securechat: ")[2].strip()
            assert reason and "\n" not in reason and "read-only" in reason.lower(), str(exc)
        else:
            try:
                with ro.connect(alice) as a:
                    verdict = submit(a, bob_pub, *refused)
                    assert isinstance(verdict, wire.Error), verdict
                    assert verdict.code == wire.STORE_FAILED
                    no_late_accept(a, refused[0])
            finally:
                _, log = ro.stop()
            assert "Traceback" not in log, log
    finally:
        _remount(tmpfs, "rw")
    relay = relay.restart()
    try:
        with relay.connect(alice) as a:
            assert submit(a, bob_pub, *refused) == wire.Accepted(refused[0], wire.STATUS_STORED)
        _check_delivered(drain(relay, bob, 4), [*before, refused])
    finally:
        code, log = relay.stop()
    assert code == 0 and "Traceback" not in log, log


# --- corrupt files: refuse to start with a one-line reason --------------------------------------


def _start_fails(data: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "securechat", "relay", "--port", "0", "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(REPO),
    )
    assert proc.returncode not in (0, None), proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("securechat:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _stored_relay(tmp_path: Path) -> tuple[Path, bytes, list[tuple[bytes, bytes]]]:
    data = tmp_path / "relay"
    relay = RelayProcess.start(data)
    alice, _ = new_identity()
    bob, bob_pub = new_identity()
    sent = [(os.urandom(16), b"stored %d" % i) for i in range(3)]
    with relay.connect(alice) as a:
        for msg_id, payload in sent:
            assert isinstance(submit(a, bob_pub, msg_id, payload), wire.Accepted)
    assert relay.stop()[0] == 0
    return data, bob, sent


@pytest.mark.parametrize("damage", ["header", "truncate", "garbage"])
def test_corrupt_database_is_refused_clearly(tmp_path: Path, damage: str) -> None:
    data, _, _ = _stored_relay(tmp_path)
    db = data / "relay.sqlite3"
    raw = bytearray(db.read_bytes())
    if damage == "header":
        raw[:16] = b"NOT A DATABASE!!"
    elif damage == "truncate":
        raw = raw[: len(raw) // 3 + 1]
    else:
        raw = bytearray(os.urandom(len(raw)))
    db.write_bytes(bytes(raw))
    for side in ("-wal", "-shm"):
        (data / f"relay.sqlite3{side}").unlink(missing_ok=True)
    line = _start_fails(data)
    assert "relay.sqlite3" in line or "store" in line, line


@pytest.mark.parametrize(
    ("damage", "expect"),
    [
        ("flip", "relay.key"),
        ("truncate", "relay.key"),
        ("binary", "relay.key"),
        ("mode", "chmod 600"),
    ],
)
def test_corrupt_relay_key_is_refused_clearly(tmp_path: Path, damage: str, expect: str) -> None:
    data, bob, sent = _stored_relay(tmp_path)
    key = data / "relay.key"
    text = key.read_bytes()
    if damage == "flip":
        secret_at = text.index(b"screlaysecret1:") + 20
        text = text[:secret_at] + bytes([text[secret_at] ^ 0x01]) + text[secret_at + 1 :]
        key.write_bytes(text)
    elif damage == "truncate":
        key.write_bytes(text[: len(text) // 2])
    elif damage == "binary":
        key.write_bytes(os.urandom(200))
    else:
        key.chmod(0o644)
    line = _start_fails(data)
    assert expect in line, line
    # the stored frames are untouched by the refused start
    if damage == "mode":
        key.chmod(0o600)
        relay = RelayProcess.start(data)
        try:
            _check_delivered(drain(relay, bob, len(sent)), sent)
        finally:
            relay.stop()


# --- client side ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncate", "sealed_blob"])
def test_corrupt_client_state_gives_one_line_error(sc_home: Path, damage: str) -> None:
    keygen(sc_home, "alice", "bob")
    state = sc_home / "alice.state.db"
    if damage == "sealed_blob":
        import sqlite3

        # Any command that writes sealed state will do (send no longer writes any when
        # the relay cannot be reached): trusting bob seals the known-peers blob.
        out = run_cli(sc_home, "trust", "bob", "--key", "alice")
        assert state.exists(), out.stderr
        db = sqlite3.connect(state)
        rows = db.execute("SELECT k, v FROM meta").fetchall()
        assert rows
        for k, v in rows:
            db.execute("UPDATE meta SET v=? WHERE k=?", (bytes([v[0] ^ 1]) + v[1:], k))
        db.commit()
        db.close()
    else:
        state.write_bytes(os.urandom(4096) if damage == "garbage" else b"SQLite format 3\x00")
    out = run_cli(
        sc_home,
        "send",
        "--key",
        "alice",
        "--peer",
        "bob",
        "--relay",
        "127.0.0.1:9",
        "-m",
        "hi",
        "--timeout",
        "1",
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    assert "state" in error_text(out.stderr, alone=True), out.stderr


@pytest.mark.parametrize("content", [b"\xff\xfe garbage", b"", b"SECURECHAT PRIVATE KEY"])
def test_corrupt_client_key_gives_one_line_error(sc_home: Path, content: bytes) -> None:
    keygen(sc_home, "alice", "bob")
    (sc_home / "alice.key").write_bytes(content)
    out = run_cli(
        sc_home,
        "send",
        "--key",
        "alice",
        "--peer",
        "bob",
        "--relay",
        "127.0.0.1:9",
        "-m",
        "hi",
        "--timeout",
        "1",
    )
    assert out.returncode == 3, out  # KeyFileError
    assert "alice.key" in error_text(out.stderr, alone=True), out.stderr
