"""``securechat talk`` on a real pseudo-terminal, read back through a terminal emulator.

pexpect runs talk on a pty with ``TERM=xterm`` and a fixed size; pyte plays
the bytes it draws onto a virtual screen so the tests assert what a person
would see (rows of text), not escape sequences.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pyte
import pytest

from relay_fixture import RelayProcess, cli_cmd, cli_env, keygen, run_cli, talk

pytestmark = pytest.mark.timeout(60)

ROWS, COLS = 24, 110
SAFETY = re.compile(r"(\d{5} ){11}\d{5}")


class JoiningScreen(pyte.Screen):  # type: ignore[misc]
    """A terminal that draws an emoji ZWJ sequence as ONE two-column glyph.

    iTerm2, kitty, WezTerm and Windows Terminal do; prompt_toolkit (like pyte)
    counts each emoji of the sequence. The disagreement is what left a stale
    ``…`` before ``✓✓`` on a real terminal: this screen reproduces it.
    """

    def __init__(self, columns: int, lines: int) -> None:
        super().__init__(columns, lines)
        self._joining = False

    def draw(self, data: str) -> None:
        kept = []
        for ch in data:
            if ch == "\u200d":
                self._joining = True
            elif self._joining:
                self._joining = False  # drawn inside the previous glyph
            else:
                kept.append(ch)
        super().draw("".join(kept))


class Term:
    """A talk process on a pty plus the screen it has drawn (and every byte it wrote)."""

    def __init__(
        self, home: Path, args: list[str], screen: type[pyte.Screen] = pyte.Screen, **env: str
    ) -> None:
        cmd = cli_cmd()
        self.child = pexpect.spawn(
            cmd[0],
            [*cmd[1:], *args],
            env=cli_env(home, TERM="xterm", **env),
            dimensions=(ROWS, COLS),
            cwd=str(home.parent),
        )
        self.screen = screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()
        self.eof = False

    def pump(self, timeout: float = 0.05) -> None:
        try:
            data = self.child.read_nonblocking(65536, timeout)
            self.raw += data
            self.stream.feed(data)
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
def open_talk(home: Path, relay: RelayProcess) -> Iterator[Callable[..., Term]]:
    terms: list[Term] = []

    def start(key: str = "alice", *peers: str, screen: type[pyte.Screen] = pyte.Screen) -> Term:
        args = ["talk", "--key", key, "--relay", relay.address]
        for peer in peers or ("bob",):
            args += ["--peer", peer]
        term = Term(home, args, screen)
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
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    alice.type("hello bob\r")
    alice.wait(lambda s: re.search(r"\d\d:\d\d alice: hello bob  ✓$", s, re.M))
    assert ok(talk(home, "bob", ["alice"], relay)) == ["alice: hello bob"]
    alice.wait(lambda s: re.search(r"alice: hello bob  ✓✓$", s, re.M))
    alice.type("/quit\r")
    assert alice.exit_code() == 0


def test_incoming_message_leaves_the_input_line_intact(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
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


def test_commands(home: Path, relay: RelayProcess, open_talk: Callable[..., Term]) -> None:
    alice = open_talk()
    alice.type("/help\r")
    # The help is several lines: wait for all of them, a slow machine can catch it half drawn.
    alice.wait(lambda s: all(c in s for c in ("/verify", "/history [N]", "/trust NAME")))

    alice.type("/verify\r")
    screen = alice.wait(lambda s: SAFETY.search(s))
    expected = run_cli(
        home, "safety-number", "--key", "alice", "--peer", "bob"
    ).stdout.splitlines()[1]
    assert f"safety number with bob: {expected}" in screen

    bob_fp = run_cli(home, "fingerprint", "bob").stdout.split()[0]
    alice.type("/peers\r")
    alice.wait(lambda s: re.search(rf"bob\s+{bob_fp}\s+(online|offline|presence unknown)", s))

    alice_fp = run_cli(home, "fingerprint", "alice").stdout.split()[0]
    alice.type("/fingerprint\r")
    alice.wait(f"your fingerprint (alice): {alice_fp}")

    alice.type("/nonsense\r")
    alice.wait("unknown command /nonsense")
    alice.type("exit\r")
    assert alice.exit_code() == 0


def test_history_and_presence(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
) -> None:
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
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
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
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
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
            "alice: typed while the relay is down"
        ]
    finally:
        restarted.stop()


def test_reconnects_and_sends_when_the_relay_returns(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
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


# --- issue 12: the rough edges of the screen -------------------------------------------------

PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


def _receive_json(home: Path, relay: RelayProcess, key: str = "bob") -> list[dict[str, object]]:
    import json

    res = run_cli(
        home, "receive", "--key", key, "--relay", relay.address, "--timeout", "1", "--json"
    )
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_pasted_lines_are_shown_and_sent_as_one_message(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    alice.type(f"{PASTE_START}first pasted line\nsecond pasted line{PASTE_END}")
    # The pasted text is visible in the input before Enter (it used to go blank).
    alice.wait(lambda s: "> first pasted line" in s and "  second pasted line" in s)
    alice.type("\r")
    screen = alice.wait(lambda s: re.search(r"second pasted line  ✓$", s, re.M))
    first = next(row for row in screen.splitlines() if "alice: first pasted line" in row)
    second = next(row for row in screen.splitlines() if row.lstrip() == "second pasted line  ✓")
    assert second.index("second") == first.index("first")  # aligned, not a literal \n
    assert "\\n" not in screen
    assert alice.input_row() == ">"
    (message,) = _receive_json(home, relay)
    assert message["text"] == "first pasted line\nsecond pasted line"
    alice.type("/quit\r")
    assert alice.exit_code() == 0


def test_paste_over_the_limit_is_refused_and_kept_in_the_input(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    alice.type("my own words ")
    alice.type(f"{PASTE_START}{'x' * 17_000}{PASTE_END}")
    alice.wait(lambda s: "xxxx" in alice.input_row())
    alice.type("\r")
    alice.wait("is still in the input line")
    assert "more than the 16384 a message may hold" in alice.text()
    assert "xxxx" in alice.input_row()  # nothing typed was lost
    assert "0 pending" in alice.text()
    assert _receive_json(home, relay) == []
    alice.type("\x03")
    assert alice.exit_code() == 0


def test_zwj_emoji_leaves_no_stale_mark(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk(screen=JoiningScreen)
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    alice.type(f"family {family} here\r")
    alice.wait(lambda s: re.search(r"here  ✓$", s, re.M))
    assert [m["text"] for m in _receive_json(home, relay)] == [f"family {family} here"]
    screen = alice.wait(lambda s: re.search(r"here  ✓✓$", s, re.M))
    row = next(r for r in screen.splitlines() if "alice: family" in r)
    assert "…" not in row, row
    alice.type("/quit\r")
    assert alice.exit_code() == 0


def test_offline_status_line_says_why_in_full_words(home: Path, relay: RelayProcess) -> None:
    relay.stop()
    term = Term(home, ["talk", "--key", "alice", "--peer", "bob", "--relay", relay.address])
    try:
        expected = " ○ offline connection refused, retrying │ with bob │ 0 pending │ /help"
        notice = f"cannot connect: the relay at {relay.address} refused the connection"
        screen = term.wait(lambda s: notice in s and s.splitlines()[ROWS - 2] == expected)
        assert "offline offline" not in screen
        term.type("/quit\r")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_exit_leaves_the_conversation_on_the_terminal(
    home: Path, relay: RelayProcess, open_talk: Callable[..., Term]
) -> None:
    alice = open_talk()
    alice.type("words worth keeping\r")
    alice.wait(lambda s: re.search(r"words worth keeping  ✓", s))
    alice.type("/quit\r")
    assert alice.exit_code() == 0
    after = bytes(alice.raw[alice.raw.rfind(b"\x1b[?1049l") :]).decode()
    assert after.startswith("\x1b[?1049l")  # left the alternate screen, then printed:
    assert re.search(r"\d\d:\d\d alice: words worth keeping  ✓", after)


def test_three_passphrase_tries_on_a_terminal(home: Path, relay: RelayProcess) -> None:
    env = cli_env(home, SECURECHAT_PASSPHRASE="right one")
    made = subprocess.run(
        [*cli_cmd(), "keygen", "enc"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=home.parent,
    )
    assert made.returncode == 0, made.stderr
    args = ["talk", "--key", "enc", "--peer", "bob", "--relay", relay.address]
    term = Term(home, args)
    try:
        for _ in range(2):
            term.child.expect("Passphrase for", timeout=20)
            term.child.sendline("wrong")
            term.child.expect("Wrong passphrase, try again", timeout=20)
        term.child.expect("Passphrase for", timeout=20)
        term.child.sendline("right one")
        term.wait("connected")
        term.type("/quit\r")
        assert term.exit_code() == 0
    finally:
        term.close()
    term = Term(home, args)
    try:
        for _ in range(3):
            term.child.expect("Passphrase for", timeout=20)
            term.child.sendline("wrong")
        term.child.expect("3 tries", timeout=20)
        assert term.exit_code() == 3
    finally:
        term.close()


def test_changed_relay_key_queues_nothing_on_the_screen(
    home: Path, relay: RelayProcess, tmp_path: Path
) -> None:
    assert (
        run_cli(
            home,
            "send",
            "--key",
            "alice",
            "--peer",
            "bob",
            "--relay",
            relay.address,
            "-m",
            "pins the relay",
        ).returncode
        == 0
    )
    relay.stop()
    impostor = RelayProcess.start(tmp_path / "impostor", port=relay.port)
    term = Term(home, ["talk", "--key", "alice", "--peer", "bob", "--relay", relay.address])
    try:
        term.wait("RELAY KEY CHANGED, not retrying")
        term.type("must not wait in the outbox\r")
        term.wait(lambda s: re.search(r"must not wait in the outbox  ✗ not sent", s))
        assert "not sent, nothing queued" in term.text() and "0 pending" in term.text()
        term.type("/quit\r")
        assert term.exit_code() == 0
    finally:
        term.close()
        impostor.stop()
