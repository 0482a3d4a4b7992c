"""``securechat talk`` in pipe mode, between real processes through a real relay."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from securechat.errors import DeliveryTimeoutError, PeerKeyChangedError
from securechat.ui import format as fmt

from cli_output import error_text
from relay_fixture import RelayProcess, keygen, run_cli, spawn, talk

pytestmark = pytest.mark.timeout(60)


def ok(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_lines_arrive_once_each_in_order(home: Path, relay: RelayProcess) -> None:
    sent = ["hello bob", "  spaces kept  ", "ünïcode ✓ 🙂", "/not a command in pipe mode"]
    assert ok(talk(home, "alice", ["bob"], relay, [*sent, ""])) == []
    received = ok(talk(home, "bob", ["alice"], relay))
    assert received == [f"alice: {line}" for line in sent]
    # Acknowledged: a second run shows nothing again (relay and local dedup).
    assert ok(talk(home, "bob", ["alice"], relay)) == []


def test_live_receiver_prints_while_sender_writes(home: Path, relay: RelayProcess) -> None:
    bob = spawn(home, "talk", "--key", "bob", "--peer", "alice", "--relay", relay.address)
    try:
        assert bob.stdout is not None and bob.stdin is not None
        ok(talk(home, "alice", ["bob"], relay, ["are you there?"]))
        assert bob.stdout.readline() == "alice: are you there?\n"
        bob.stdin.write("yes\n")
        bob.stdin.close()
        assert bob.wait(timeout=20) == 0
    finally:
        if bob.poll() is None:
            bob.kill()
            bob.wait()
    assert ok(talk(home, "alice", ["bob"], relay)) == ["bob: yes"]


def test_json_lines(home: Path, relay: RelayProcess) -> None:
    ok(talk(home, "alice", ["bob"], relay, ['quote " and \\ and \x1b[2J']))
    lines = ok(talk(home, "bob", ["alice"], relay, extra=["--json"]))
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"sender", "fingerprint", "verified", "id", "time", "text", "group"}
    assert record["sender"] == "alice"
    assert record["text"] == 'quote " and \\ and \x1b[2J'
    assert record["verified"] is True
    assert record["group"] is None
    assert datetime.fromisoformat(record["time"]).tzinfo is not None
    assert len(bytes.fromhex(record["id"])) == 16
    fp = run_cli(home, "fingerprint", "alice").stdout.split()[0]
    assert record["fingerprint"] == fp


def test_terminal_escapes_are_neutralised(home: Path, relay: RelayProcess) -> None:
    ok(talk(home, "alice", ["bob"], relay, ["evil \x1b[2J\x07 \u202egnp.exe"]))
    (line,) = ok(talk(home, "bob", ["alice"], relay))
    assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert line == "alice: evil \\u001b[2J\\u0007 \\u202egnp.exe"


def test_group_of_three_everyone_sees_who_said_what(home: Path, relay: RelayProcess) -> None:
    people = ["alice", "bob", "carol"]
    seen: dict[str, list[str]] = {name: [] for name in people}
    groups: set[str] = set()

    def turn(name: str, lines: list[str]) -> None:
        others = [p for p in people if p != name]
        seen[name] += ok(talk(home, name, others, relay, lines, extra=["--json"]))

    turn("alice", ["alice opens"])
    turn("bob", ["bob replies"])
    turn("carol", ["carol joins in"])
    turn("alice", [])
    turn("bob", [])
    for name in people:
        records = [json.loads(line) for line in seen[name]]
        assert all(r["verified"] for r in records)
        groups.update(r["group"] for r in records)
        got = sorted((r["sender"], r["text"]) for r in records)
        expected = sorted(
            (p, f"{p} {w}")
            for p, w in [("alice", "opens"), ("bob", "replies"), ("carol", "joins in")]
            if p != name
        )
        assert got == expected, name
    (group,) = groups  # one conversation id, the same for all three
    assert group.startswith("group-")


def test_unknown_sender_is_shown_unverified(
    home: Path, relay: RelayProcess, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "mallory-home"  # bob has no .pub for this sender
    keygen(elsewhere, "mallory")
    ok(talk(elsewhere, "mallory", [str(home / "bob.pub")], relay, ["hi, trust me"]))
    (line,) = ok(talk(home, "bob", ["alice"], relay))
    fp = run_cli(elsewhere, "fingerprint", "mallory").stdout.split()[0]
    # The E2E layer carries keys, not names: an unknown sender has no name to show.
    assert line == f"unknown [{fp}] (unverified): hi, trust me"


def test_relay_down_at_start_reads_nothing_and_queues_nothing(
    home: Path, relay: RelayProcess
) -> None:
    ok(talk(home, "alice", ["bob"], relay, ["first, relay up"]))
    relay.stop()
    result = talk(home, "alice", ["bob"], relay, ["sent while relay down"])
    assert result.returncode == 7 and result.stdout == ""
    message = error_text(result.stderr, alone=True)
    assert "refused the connection" in message and "nothing was sent or queued" in message
    restarted = relay.restart()
    try:
        assert ok(talk(home, "alice", ["bob"], restarted)) == []
        assert ok(talk(home, "bob", ["alice"], restarted)) == ["alice: first, relay up"]
    finally:
        restarted.stop()


def test_relay_lost_mid_session_keeps_outbox_and_delivers_once(
    home: Path, relay: RelayProcess
) -> None:
    """Connected, then the relay goes: later lines are queued, said so, and sent once."""
    talk_args = ["--key", "alice", "--peer", "bob", "--relay", relay.address, "--timeout", "1.5"]
    alice = spawn(home, "talk", *talk_args)
    try:
        assert alice.stdin is not None
        alice.stdin.write("first, relay up\n")
        alice.stdin.flush()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _history_marks(home) != ["✓"]:
            time.sleep(0.1)
        assert _history_marks(home) == ["✓"]
        relay.stop()
        alice.stdin.write("sent while relay down\nand another\n")
        alice.stdin.flush()
        _, err = alice.communicate(timeout=30)  # closes stdin: the end of the input
    finally:
        if alice.poll() is None:
            alice.kill()
            alice.wait()
    assert alice.returncode == DeliveryTimeoutError.exit_code
    assert "relay connection lost" in err
    last = error_text(err)
    assert "2 messages queued in the outbox" in last and "do not send them again" in last
    restarted = relay.restart()
    try:
        assert ok(talk(home, "alice", ["bob"], restarted)) == []  # resends the outbox
        received = ok(talk(home, "bob", ["alice"], restarted))
        assert received == [
            "alice: first, relay up",
            "alice: sent while relay down",
            "alice: and another",
        ]
        assert ok(talk(home, "alice", ["bob"], restarted)) == []
        assert ok(talk(home, "bob", ["alice"], restarted)) == []
    finally:
        restarted.stop()


def _history_marks(home: Path) -> list[str]:
    """The marks of alice's messages to bob, read while her talk runs (history is read-only)."""
    res = run_cli(home, "history", "--key", "alice", "--peer", "bob", "--json")
    if res.returncode != 0:
        return []
    marks = {"pending": "…", "accepted": "✓", "delivered": "✓✓"}
    return [marks[json.loads(line)["status"]] for line in res.stdout.splitlines()]


def test_changed_peer_key_is_refused(home: Path, relay: RelayProcess) -> None:
    ok(talk(home, "alice", ["bob"], relay, ["before"]))
    keygen(home, "bob", force=True)
    result = talk(home, "alice", ["bob"], relay, ["must not be sent"])
    assert result.returncode == PeerKeyChangedError.exit_code
    assert "CHANGED" in result.stderr and "securechat trust bob" in result.stderr
    error_text(result.stderr, alone=True)
    # The new bob sees nothing (he cannot read "before", and the refused line never left).
    assert ok(talk(home, "bob", ["alice"], relay)) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--relay", "nonsense:port"], "HOST:PORT"),
        (["--relay", "127.0.0.1:1", "--peer", "nobody"], "nobody"),
        (["--relay", "127.0.0.1:1", "--timeout", "0"], "--timeout"),
    ],
)
def test_usage_errors_are_one_line(home: Path, args: list[str], needle: str) -> None:
    result = run_cli(home, "talk", "--key", "alice", "--peer", "bob", *args)
    assert result.returncode != 0
    assert needle in error_text(result.stderr, alone=True)


def test_format_safe_keeps_printable_text() -> None:
    assert fmt.safe("héllo 🙂 — ok") == "héllo 🙂 — ok"
    assert fmt.safe("a\nb\tc\x00") == "a\\nb c\\u0000"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/quit", fmt.Command("quit")),
        ("exit", fmt.Command("quit")),
        ("/EXIT", fmt.Command("quit")),
        ("/history 5", fmt.Command("history", "5")),
        ("/trust bob", fmt.Command("trust", "bob")),
        ("/frobnicate", fmt.Command("unknown", "frobnicate")),
        ("hello", None),
        ("//slash", None),
    ],
)
def test_parse_command(line: str, expected: fmt.Command | None) -> None:
    assert fmt.parse_command(line) == expected
