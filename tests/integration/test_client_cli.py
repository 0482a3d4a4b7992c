"""send / receive / history / trust as a script would use them, against a real relay."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cli_output import error_text
from relay_fixture import RelayProcess, keygen, run_cli


def _send(
    home: Path, relay: RelayProcess, key: str, peers: list[str], *texts: str, timeout: str = "15"
) -> tuple[int, str, str]:
    args = ["send", "--key", key, "--relay", relay.address, "--timeout", timeout]
    for p in peers:
        args += ["--peer", p]
    res = run_cli(home, *args, input="".join(t + "\n" for t in texts))
    return res.returncode, res.stdout, res.stderr


def _receive(home: Path, relay: RelayProcess, key: str, *extra: str) -> list[str]:
    res = run_cli(home, "receive", "--key", key, "--relay", relay.address, "--timeout", "1", *extra)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def _one_line(stderr: str) -> str:
    return error_text(stderr)


def test_send_then_receive_exactly_once(home: Path, relay: RelayProcess) -> None:
    rc, _, err = _send(home, relay, "alice", ["bob"], "hello bob", "second line")
    assert rc == 0, err
    assert _receive(home, relay, "bob") == ["alice: hello bob", "alice: second line"]
    assert _receive(home, relay, "bob") == []  # acknowledged: never delivered twice


def test_send_dash_m_and_json_receive(home: Path, relay: RelayProcess) -> None:
    import json

    res = run_cli(
        home,
        "send",
        "--key",
        "bob",
        "--peer",
        "alice",
        "--relay",
        relay.address,
        "-m",
        "über ✓ json",
    )
    assert res.returncode == 0, res.stderr
    lines = _receive(home, relay, "alice", "--json")
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["sender"] == "bob" and record["text"] == "über ✓ json"
    assert record["verified"] is True and len(record["id"]) == 32 and record["group"] is None


def test_group_of_three_everyone_sees_who_said_what(home: Path, relay: RelayProcess) -> None:
    assert _send(home, relay, "alice", ["bob", "carol"], "from alice")[0] == 0
    assert _send(home, relay, "bob", ["alice", "carol"], "from bob")[0] == 0
    assert _receive(home, relay, "carol") == ["alice: from alice", "bob: from bob"]
    assert _receive(home, relay, "alice") == ["bob: from bob"]
    assert _receive(home, relay, "bob") == ["alice: from alice"]


def test_conversation_both_ways_keeps_working(home: Path, relay: RelayProcess) -> None:
    for i in range(3):
        assert _send(home, relay, "alice", ["bob"], f"a{i}")[0] == 0
        assert _receive(home, relay, "bob") == [f"alice: a{i}"]
        assert _send(home, relay, "bob", ["alice"], f"b{i}")[0] == 0
        assert _receive(home, relay, "alice") == [f"bob: b{i}"]


def test_send_without_relay_queues_nothing_and_a_rerun_delivers_once(
    home: Path, relay: RelayProcess
) -> None:
    relay.stop()
    rc, _, err = _send(
        home, relay, "alice", ["bob"], "written while the relay was down", timeout="2"
    )
    assert rc == 7
    line = _one_line(err)
    assert "refused the connection" in line and "nothing was sent or queued" in line
    back = RelayProcess.start(relay.data_dir, port=relay.port)
    try:
        _receive(home, back, "alice")  # a later run of alice's client has nothing to resend
        assert _receive(home, back, "bob") == []
        # So running the same command again is right, and it arrives once.
        assert _send(home, back, "alice", ["bob"], "written while the relay was down")[0] == 0
        assert _receive(home, back, "bob") == ["alice: written while the relay was down"]
        _receive(home, back, "alice")
        assert _receive(home, back, "bob") == []
    finally:
        back.stop()


def test_changed_peer_key_refused_until_trusted(home: Path, relay: RelayProcess) -> None:
    assert _send(home, relay, "alice", ["bob"], "first")[0] == 0
    keygen(home, "bob", force=True)  # bob's key changes (or someone swapped bob.pub)
    rc, _, err = _send(home, relay, "alice", ["bob"], "second")
    assert rc == 4
    line = _one_line(err)
    assert "CHANGED" in line and "securechat trust bob" in line
    res = run_cli(home, "trust", "bob", "--key", "alice")
    assert res.returncode == 0 and "replaced" in res.stdout
    assert _send(home, relay, "alice", ["bob"], "third")[0] == 0
    assert _receive(home, relay, "bob") == ["alice: third"]


def test_history_round_trip_and_encrypted_at_rest(home: Path, relay: RelayProcess) -> None:
    marker = "MARKER-7f3a-history"
    assert _send(home, relay, "alice", ["bob"], marker)[0] == 0
    assert _receive(home, relay, "bob") == [f"alice: {marker}"]
    for key, peer, sender in (("alice", "bob", "alice"), ("bob", "alice", "alice")):
        res = run_cli(home, "history", "--key", key, "--peer", peer, "-n", "5")
        assert res.returncode == 0, res.stderr
        assert f"] {sender}: {marker}" in res.stdout.strip()
    for db in home.glob("*.state.db*"):
        assert marker.encode() not in db.read_bytes()
        assert (db.stat().st_mode & 0o077) == 0
    with sqlite3.connect(home / "alice.state.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM history").fetchone()[0] == 1


def test_relay_key_change_refused(home: Path, relay: RelayProcess, tmp_path: Path) -> None:
    assert _send(home, relay, "alice", ["bob"], "pins the relay key")[0] == 0
    relay.stop()
    impostor = RelayProcess.start(
        tmp_path / "other-relay", port=relay.port
    )  # same address, new key
    try:
        rc, _, err = _send(home, impostor, "alice", ["bob"], "must not go out", timeout="5")
        assert rc == 4
        assert "pinned" in _one_line(err)
    finally:
        impostor.stop()


def test_relay_unreachable_is_one_line(home: Path, relay: RelayProcess) -> None:
    relay.stop()
    res = run_cli(home, "receive", "--key", "bob", "--relay", relay.address, "--timeout", "1")
    assert res.returncode == 7
    assert "refused the connection" in _one_line(res.stderr)


def test_wrong_passphrase_is_one_line(tmp_path: Path, relay: RelayProcess) -> None:
    import subprocess
    import sys

    from relay_fixture import cli_env

    home = tmp_path / "h2"
    keygen(home, "bob")
    env = cli_env(home, SECURECHAT_PASSPHRASE="right")
    subprocess.run(
        [sys.executable, "-m", "securechat", "keygen", "enc"],
        env=env,
        check=True,
        capture_output=True,
    )
    env["SECURECHAT_PASSPHRASE"] = "wrong"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "securechat",
            "send",
            "--key",
            "enc",
            "--peer",
            "bob",
            "-m",
            "x",
            "--relay",
            relay.address,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 3
    assert "wrong passphrase" in _one_line(res.stderr)


def test_nothing_to_send_is_usage_error(home: Path, relay: RelayProcess) -> None:
    rc, _, err = _send(home, relay, "alice", ["bob"])
    assert rc == 2
    assert "nothing to send" in _one_line(err)
