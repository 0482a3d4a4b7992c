"""``securechat talk`` on a real pseudo-terminal, read back through a terminal emulator.

pexpect runs talk on a pty with ``TERM=xterm`` and a fixed size; pyte plays
the bytes it draws onto a virtual screen so the tests assert what a person
would see (rows of text), not escape sequences.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pyte
import pytest
from relay_fixture import Relay, cli_cmd, env_for, keygen, run, talk

pytestmark = pytest.mark.timeout(60)

ROWS, COLS = 24, 110
SAFETY = re.compile(r"(\d{5} ){11}\d{5}")


class Term:
    """A talk process on a pty plus the screen it has drawn."""

    def __init__(self, home: Path, args: list[str]) -> None:
        cmd = cli_cmd()
        self.child = pexpect.spawn(
            cmd[0], [*cmd[1:], *args], env=env_for(home, TERM="xterm"),
            dimensions=(ROWS, COLS), cwd=str(home.parent),
        )
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.eof = False

    def pump(self, timeout: float = 0.05) -> None:
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            self.eof = True

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait(self, check: str | Callable[[str], object], timeout: float = 15) -> str:
        test = (lambda s: check in s) if isinstance(check, str) else check
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            if test(self.text()):
                return self.text()
            if self.eof:
                break
        pytest.fail(f"screen never showed {check!r}:\n{self.text()}")

    def type(self, text: str) -> None:
        self.child.send(text)

    def input_row(self) -> str:
        return self.screen.display[ROWS - 1].rstrip()

    def exit_code(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self.pump(0.1)
        self.child.close()
        return int(self.child.exitstatus if self.child.exitstatus is not None else -1)

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


@pytest.fixture
def open_talk(home: Path, relay: Relay) -> Iterator[Callable[..., Term]]:
    terms: list[Term] = []

    def start(key: str = "alice", *peers: str) -> Term:
        args = ["talk", "--key", key, "--relay", relay.address]
        for peer in peers or ("bob",):
            args += ["--peer", peer]
        term = Term(home, args)
        terms.append(term)
        term.wait("connected")
        return term

    yield start
    for term in terms:
        term.close()


def ok(result: object) -> list[str]:
    assert result.returncode == 0, result.stderr  # type: ignore[attr-defined]
    return result.stdout.splitlines()  # type: ignore[attr-defined]


def test_message_echoed_with_marks_that_update(
    home: Path, relay: Relay, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    alice.type("hello bob\r")
    alice.wait(lambda s: re.search(r"\d\d:\d\d alice: hello bob  ✓$", s, re.M))
    assert ok(talk(home, "bob", ["alice"], relay)) == ["alice: hello bob"]
    alice.wait(lambda s: re.search(r"alice: hello bob  ✓✓$", s, re.M))
    alice.type("/quit\r")
    assert alice.exit_code() == 0


def test_incoming_message_leaves_the_input_line_intact(
    home: Path, relay: Relay, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    alice.type("a half-typed draft")
    alice.wait(lambda s: alice.input_row() == "> a half-typed draft")
    ok(talk(home, "bob", ["alice"], relay, ["hi alice", "are you there?"]))
    alice.wait(lambda s: re.search(r"\d\d:\d\d bob: are you there\?$", s, re.M))
    assert re.search(r"\d\d:\d\d bob: hi alice$", alice.text(), re.M)
    assert alice.input_row() == "> a half-typed draft"
    alice.type(" finished\r")
    alice.wait(lambda s: re.search(r"alice: a half-typed draft finished  ✓", s))
    assert alice.input_row() == ">"
    alice.type("\x04")  # Ctrl-D on an empty line
    assert alice.exit_code() == 0


def test_commands(home: Path, relay: Relay, open_talk: Callable[..., Term]) -> None:
    alice = open_talk()
    alice.type("/help\r")
    # The help is several lines: wait for all of them, a slow machine can catch it half drawn.
    alice.wait(lambda s: all(c in s for c in ("/verify", "/history [N]", "/trust NAME")))

    alice.type("/verify\r")
    screen = alice.wait(lambda s: SAFETY.search(s))
    expected = run(home, "safety-number", "--key", "alice", "--peer", "bob").stdout.splitlines()[1]
    assert f"safety number with bob: {expected}" in screen

    bob_fp = run(home, "fingerprint", "bob").stdout.split()[0]
    alice.type("/peers\r")
    alice.wait(lambda s: re.search(rf"bob\s+{bob_fp}\s+(online|offline|presence unknown)", s))

    alice_fp = run(home, "fingerprint", "alice").stdout.split()[0]
    alice.type("/fingerprint\r")
    alice.wait(f"your fingerprint (alice): {alice_fp}")

    alice.type("/nonsense\r")
    alice.wait("unknown command /nonsense")
    alice.type("exit\r")
    assert alice.exit_code() == 0


def test_history_and_presence(home: Path, relay: Relay, open_talk: Callable[..., Term]) -> None:
    ok(talk(home, "alice", ["bob"], relay, ["from an earlier session"]))
    ok(talk(home, "bob", ["alice"], relay, ["earlier reply"]))
    assert ok(talk(home, "alice", ["bob"], relay)) == ["bob: earlier reply"]  # now in history
    alice = open_talk()
    screen = alice.wait("recent history")
    assert re.search(r"alice: from an earlier session  ✓✓?$", screen, re.M)
    assert "bob: earlier reply" in screen
    alice.type("/history 1\r")
    alice.wait("last 1 messages")
    bob = open_talk("bob", "alice")
    alice.wait("bob is online")
    bob.type("/quit\r")
    assert bob.exit_code() == 0
    alice.wait("bob went offline")
    alice.type("\x03")  # Ctrl-C leaves cleanly too
    assert alice.exit_code() == 0


def test_changed_key_is_refused_until_trusted(
    home: Path, relay: Relay, open_talk: Callable[..., Term]
) -> None:
    ok(talk(home, "alice", ["bob"], relay, ["before the change"]))
    keygen(home, "bob", force=True)
    alice = open_talk()
    screen = alice.wait("has CHANGED")
    assert "/trust NAME" in screen and "KEY CHANGED" in screen
    alice.type("do not send this\r")
    alice.wait(lambda s: re.search(r"alice: do not send this  ✗ not sent", s))
    alice.type("/trust bob\r")
    alice.wait("is now trusted")
    alice.type("after checking\r")
    alice.wait(lambda s: re.search(r"alice: after checking  ✓", s))
    alice.type("/quit\r")
    assert alice.exit_code() == 0
    assert ok(talk(home, "bob", ["alice"], relay)) == ["alice: after checking"]


def test_offline_messages_wait_in_the_outbox(
    home: Path, relay: Relay, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    relay.stop()
    alice.wait("○ offline")
    alice.type("typed while the relay is down\r")
    alice.wait(lambda s: re.search(r"alice: typed while the relay is down  …$", s, re.M))
    alice.wait("1 pending")
    alice.type("/quit\r")
    alice.wait(lambda s: alice.eof, timeout=15)
    assert "1 message not yet accepted by the relay" in alice.text()
    assert alice.exit_code() == 0
    restarted = relay.restart()
    try:
        assert ok(talk(home, "alice", ["bob"], restarted)) == []  # resends the outbox
        assert ok(talk(home, "bob", ["alice"], restarted)) == [
            "alice: typed while the relay is down"]
    finally:
        restarted.stop()


def test_reconnects_and_sends_when_the_relay_returns(
    home: Path, relay: Relay, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    relay.stop()
    alice.wait("○ offline")
    alice.type("queued\r")
    alice.wait(lambda s: re.search(r"alice: queued  …$", s, re.M))
    restarted = relay.restart()
    try:
        alice.wait(lambda s: re.search(r"alice: queued  ✓$", s, re.M), timeout=25)
        alice.wait("0 pending")
        alice.type("/quit\r")
        assert alice.exit_code() == 0
        assert ok(talk(home, "bob", ["alice"], restarted)) == ["alice: queued"]
    finally:
        restarted.stop()
