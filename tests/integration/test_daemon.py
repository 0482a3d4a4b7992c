"""securechat daemon through its socket and stdio, with real relay and CLI processes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat.daemon import rpc

from cli_output import error_text
from daemon_fixture import Daemon, LineRpc
from relay_fixture import RelayProcess as Relay
from relay_fixture import cli_cmd, keygen
from relay_fixture import cli_env as env_for
from relay_fixture import run_cli as run


@pytest.fixture
def daemon(home: Path, relay: Relay) -> Iterator[Daemon]:
    d = Daemon.start(home, "alice", relay)
    yield d
    d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[LineRpc]:
    c = LineRpc.unix(daemon.socket)
    yield c
    c.close()


def _messages(events: list[dict]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "message"]


def _from_bob(event: dict) -> bool:
    return event["type"] == "message" and not event["outgoing"]


def _bob_sends(home: Path, relay: Relay, *texts: str) -> None:
    res = run(
        home, "send", "--key", "bob", "--peer", "alice", "--relay", relay.address,
        input="".join(t + "\n" for t in texts),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def _bob_receives(home: Path, relay: Relay) -> list[str]:
    res = run(home, "receive", "--key", "bob", "--relay", relay.address, "--timeout", "1")
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_socket_is_private_and_a_second_daemon_is_refused(
    home: Path, relay: Relay, daemon: Daemon
) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    res = run(home, "daemon", "--key", "alice", "--relay", relay.address)
    assert res.returncode == 12
    assert "a daemon for alice already runs" in error_text(res.stderr)


def test_stale_socket_is_replaced(home: Path, relay: Relay) -> None:
    d = Daemon.start(home, "alice", relay)
    d.proc.kill()  # no clean-up: the socket file stays, nobody answers on it
    d.proc.wait(timeout=5)
    assert d.socket.exists()
    again = Daemon.start(home, "alice", relay)
    try:
        c = LineRpc.unix(again.socket)
        assert c.call("version")["account"] == "alice"
        c.close()
    finally:
        again.stop()
    assert not again.socket.exists()  # removed on a clean stop


def test_send_subscribe_and_receipts_through_the_socket(
    home: Path, relay: Relay, client: LineRpc
) -> None:
    info = client.call("version")
    assert info["account"] == "alice" and info["api"] == 1
    client.call("subscribe", {"since": info["cursor"]})
    sent = client.call("send", {"to": ["bob"], "text": "hello <b>bob</b>"})
    assert len(sent["id"]) == 32 and sent["conversation"].startswith("dm-")
    mine = client.wait_events(lambda e: e["type"] == "message" and e["outgoing"])[0]
    assert mine["text"] == "hello <b>bob</b>" and mine["id"] == sent["id"]
    assert mine["conversation"] == {"id": sent["conversation"], "group": False, "members": ["bob"]}
    assert mine["sender"]["name"] == "alice" and isinstance(mine["cursor"], int)
    client.wait_events(lambda e: e["type"] == "receipt" and e["status"] == "accepted")
    assert _bob_receives(home, relay) == ["alice: hello <b>bob</b>"]
    client.wait_events(lambda e: e["type"] == "receipt" and e["status"] == "delivered")
    _bob_sends(home, relay, "hi alice")
    got = client.wait_events(_from_bob)[0]
    assert got["sender"] == {
        "name": "bob",
        "fingerprint": run(home, "fingerprint", "bob").stdout.split()[0],
        "verified": True,
    }
    assert got["text"] == "hi alice" and got["status"] == "received"
    assert got["relayMs"] and got["receivedMs"] and got["sentMs"]
    assert got["receivedMs"] >= got["relayMs"] - 5000


def test_resume_from_a_cursor_after_the_subscriber_was_away(
    home: Path, relay: Relay, daemon: Daemon
) -> None:
    """Nothing is lost for want of a subscriber, nothing repeats at the seam."""
    first = LineRpc.unix(daemon.socket)
    first.call("subscribe", {"since": first.call("version")["cursor"]})
    _bob_sends(home, relay, "one")
    cursor = first.wait_events(_from_bob)[0]["cursor"]
    first.close()  # the subscriber goes away; messages keep coming
    _bob_sends(home, relay, "two", "three")
    second = LineRpc.unix(daemon.socket)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the daemon stored both (nobody subscribed)
        got = second.call("history", {"to": ["bob"], "limit": 10})["messages"]
        if [m["text"] for m in got] == ["one", "two", "three"]:
            break
        time.sleep(0.1)
    second.call("subscribe", {"since": cursor})
    _bob_sends(home, relay, "four")  # live, after the replay
    events = second.wait_events(_from_bob, count=3)
    assert _messages(events) == ["two", "three", "four"]
    cursors = [e["cursor"] for e in second.events if e["cursor"] is not None]
    assert cursors == sorted(set(cursors)) and min(cursors) > cursor
    second.close()


def test_errors_are_json_rpc_errors_with_our_codes(client: LineRpc, home: Path) -> None:
    assert client.request("nope")["error"]["code"] == rpc.METHOD_NOT_FOUND
    assert client.request("send", {"to": ["bob"]})["error"]["code"] == rpc.INVALID_PARAMS
    typo = client.request("send", {"to": ["bob"], "text": "x", "txet": "y"})["error"]
    assert typo["code"] == rpc.INVALID_PARAMS and "txet" in typo["message"]
    assert client.request("safetyNumber", {"peer": "../etc/passwd"})["error"]["code"] == (
        rpc.INVALID_PARAMS
    )
    missing = client.request("safetyNumber", {"peer": "mallory"})["error"]
    assert missing["code"] == 3 and missing["data"]["type"] == "KeyNotFoundError"
    myself = client.request("send", {"to": ["alice"], "text": "x"})["error"]
    assert myself["code"] == 2 and myself["data"]["type"] == "UsageError"
    client.send_raw(b"{not json\n")
    assert client.reply(None)["error"]["code"] == rpc.PARSE_ERROR
    client.send_raw(b'[{"jsonrpc": "2.0", "id": 7, "method": "version"}]\n')
    assert client.reply(None)["error"]["code"] == rpc.INVALID_REQUEST
    client.send_raw(b'{"jsonrpc": "2.0", "id": 8, "method": "version", "params": [1]}\n')
    assert client.reply(8)["error"]["code"] == rpc.INVALID_REQUEST
    client.send_raw(b'{"jsonrpc": "2.0", "method": "version"}\n')  # notification: no reply
    assert client.call("version")["account"] == "alice"
    # A changed key is a trust error (exit code 4), and a keyChanged event
    client.call("subscribe", {"since": 0})
    assert client.call("send", {"to": ["bob"], "text": "first"})
    keygen(home, "bob", force=True)
    changed = client.request("send", {"to": ["bob"], "text": "second"})["error"]
    assert changed["code"] == 4 and changed["data"]["type"] == "PeerKeyChangedError"
    assert "trust" in changed["data"]["hint"]
    flagged = client.wait_events(lambda e: e["type"] == "keyChanged")[0]
    assert flagged["peer"] == "bob" and flagged["oldFingerprint"] != flagged["newFingerprint"]
    assert client.call("peers")["peers"][0]["keyChanged"] is True
    assert client.call("trust", {"peer": "bob"})["replaced"] is True
    assert client.call("peers")["peers"][0]["keyChanged"] is False


def test_a_request_too_long_is_refused_and_the_connection_closed(client: LineRpc) -> None:
    client.send_raw(b'{"x": "' + b"a" * (rpc.MAX_REQUEST_BYTES + 10) + b'"}\n')
    reply = client.reply(None)
    assert reply["error"]["code"] == rpc.INVALID_REQUEST and "longer" in reply["error"]["message"]
    deadline = time.monotonic() + 5
    while not client.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.closed


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_local_user_cannot_connect(daemon: Daemon) -> None:
    probe = (
        "import socket, os, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    import sys

    res = subprocess.run([sys.executable, "-c", probe, str(daemon.socket)], timeout=10)
    assert res.returncode == 3


def test_stdio(home: Path, relay: Relay) -> None:
    proc = subprocess.Popen(
        [*cli_cmd(), "daemon", "--key", "alice", "--relay", relay.address, "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env_for(home),
        cwd=home.parent,
    )
    client = LineRpc(proc.stdout, proc.stdin)
    client.start()
    try:
        assert client.call("version")["account"] == "alice"
        client.call("subscribe", {"since": 0})
        sent = client.call("send", {"to": ["bob"], "text": "over stdio"})
        client.wait_events(lambda e: e["type"] == "receipt" and e["id"] == sent["id"])
        assert client.request("nope")["error"]["code"] == rpc.METHOD_NOT_FOUND
        assert _bob_receives(home, relay) == ["alice: over stdio"]
        _bob_sends(home, relay, "back over stdio")
        assert _messages(client.wait_events(_from_bob)) == ["back over stdio"]
        assert proc.stdin is not None
        proc.stdin.close()  # end of stdin: the daemon stops
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_commands_go_through_the_daemon_while_talk_is_open(
    home: Path, relay: Relay, daemon: Daemon
) -> None:
    """talk (pipe), send and history at once for alice: the daemon serves them all."""
    talk = subprocess.Popen(
        [*cli_cmd(), "talk", "--key", "alice", "--peer", "bob", "--relay", relay.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(home),
        cwd=home.parent,
    )
    try:
        assert talk.stdin is not None and talk.stdout is not None
        talk.stdin.write("from talk\n")
        talk.stdin.flush()
        sends = [
            subprocess.Popen(
                [*cli_cmd(), "send", "--key", "alice", "--peer", "bob", "-m", f"from send {i}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env_for(home),
                cwd=home.parent,
            )
            for i in (1, 2)
        ]
        for proc in sends:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        received = sorted(_bob_receives(home, relay))
        assert received == ["alice: from send 1", "alice: from send 2", "alice: from talk"]
        history = run(home, "history", "--key", "alice", "--peer", "bob", "--json")
        assert history.returncode == 0, history.stderr
        texts = sorted(json.loads(line)["text"] for line in history.stdout.splitlines())
        assert texts == ["from send 1", "from send 2", "from talk"]
        _bob_sends(home, relay, "to the open talk")
        time.sleep(1.0)  # talk prints what arrives while its input is open
        out, err = talk.communicate(timeout=30)  # closes talk's stdin: it finishes
        assert talk.returncode == 0, err
        assert "bob: to the open talk" in out.splitlines()
    finally:
        if talk.poll() is None:
            talk.kill()
            talk.communicate(timeout=5)


def test_receive_through_the_daemon_prints_each_message_once(
    home: Path, relay: Relay, daemon: Daemon
) -> None:
    _bob_sends(home, relay, "while no receive ran")
    args = ("receive", "--key", "alice", "--timeout", "1")
    first = run(home, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ["bob: while no receive ran"]
    assert run(home, *args).stdout == ""
    _bob_sends(home, relay, "later")
    assert run(home, *args).stdout.splitlines() == ["bob: later"]


def test_without_a_daemon_the_commands_work_as_before(home: Path, relay: Relay) -> None:
    d = Daemon.start(home, "alice", relay)
    d.stop()
    res = run(home, "send", "--key", "alice", "--peer", "bob", "--relay", relay.address, "-m", "x")
    assert res.returncode == 0, res.stderr
    assert _bob_receives(home, relay) == ["alice: x"]
    hist = run(home, "history", "--key", "alice", "--peer", "bob")
    assert hist.returncode == 0 and hist.stdout.count("alice: x") == 1


def test_the_talk_screen_goes_through_the_daemon(home: Path, relay: Relay, daemon: Daemon) -> None:
    import re

    from test_talk_pty import Term

    term = Term(home, ["talk", "--key", "alice", "--peer", "bob"])
    try:
        term.wait(f"connected {relay.address}")  # the daemon's relay, on the status line
        term.type("hello from the screen\r")
        term.wait(lambda s: re.search(r"alice: hello from the screen  ✓$", s, re.M))
        assert _bob_receives(home, relay) == ["alice: hello from the screen"]
        term.wait(lambda s: re.search(r"alice: hello from the screen  ✓✓$", s, re.M))
        _bob_sends(home, relay, "reply to the screen")
        term.wait("bob: reply to the screen")
        term.type("/quit\r")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_group_events_carry_the_group_and_its_members(
    home: Path, relay: Relay, client: LineRpc
) -> None:
    client.call("subscribe", {"since": client.call("version")["cursor"]})
    sent = client.call("send", {"to": ["bob", "carol"], "text": "to the group"})
    assert sent["conversation"].startswith("group-")
    mine = client.wait_events(lambda e: e["type"] == "message" and e["outgoing"])[0]
    assert mine["conversation"]["group"] is True
    assert sorted(mine["conversation"]["members"]) == ["bob", "carol"]
    res = run(home, "receive", "--key", "carol", "--relay", relay.address, "--timeout", "1")
    assert res.stdout.splitlines() == ["alice: to the group"]
    res = run(
        home, "send", "--key", "carol", "--peer", "alice", "--peer", "bob",
        "--relay", relay.address, "-m", "carol to the group",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    got = client.wait_events(_from_bob)[0]  # (any incoming message)
    assert got["sender"]["name"] == "carol" and got["text"] == "carol to the group"
    assert got["conversation"]["id"] == sent["conversation"]
    assert sorted(got["conversation"]["members"]) == ["bob", "carol"]
    # A reply by conversation id goes to the same group.
    again = client.call("send", {"conv": sent["conversation"], "text": "by id"})
    assert again["conversation"] == sent["conversation"]


def test_presence_events(home: Path, relay: Relay, client: LineRpc) -> None:
    client.call("send", {"to": ["bob"], "text": "watch bob"})  # bob becomes a known peer
    client.call("subscribe", {})
    bob = subprocess.Popen(
        [*cli_cmd(), "talk", "--key", "bob", "--peer", "alice", "--relay", relay.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(home),
        cwd=home.parent,
    )
    try:
        online = client.wait_events(lambda e: e["type"] == "presence" and e["online"])[0]
        assert online["peer"] == "bob" and online["cursor"] is None
        assert client.call("peers")["peers"][0]["online"] is True
        bob.communicate(timeout=30)  # end of input: bob leaves
        client.wait_events(lambda e: e["type"] == "presence" and not e["online"])
    finally:
        if bob.poll() is None:
            bob.kill()
            bob.communicate(timeout=5)


def test_history_through_the_daemon_pages_like_the_local_one(
    home: Path, relay: Relay, daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    _bob_sends(home, relay, *[f"line {i}" for i in range(7)])
    client = LineRpc.unix(daemon.socket)
    first = client.call("history", {"to": ["bob"], "limit": 3})
    assert [m["text"] for m in first["messages"]] == ["line 4", "line 5", "line 6"]
    before = client.call("history", {"to": ["bob"], "limit": 3, "before": first["before"]})
    assert [m["text"] for m in before["messages"]] == ["line 1", "line 2", "line 3"]
    client.close()
    from securechat.daemon import remote

    monkeypatch.setenv("SECURECHAT_HOME", str(home))
    monkeypatch.setattr(remote, "MAX_HISTORY", 2)  # several pages for -n 5
    engine = remote.RemoteMessenger(daemon.socket, lambda event: None)
    try:
        records = engine.history(first["messages"][0]["conversation"]["id"], 5)
    finally:
        engine.close()
    assert [r["text"] for r in records] == [f"line {i}" for i in range(2, 7)]
