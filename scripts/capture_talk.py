"""Capture a real talk session between alice and bob into docs/talk-session.txt.

Usage: ``python scripts/capture_talk.py docs/talk-session.txt``. It drives two
``securechat talk`` processes on pseudo-terminals (pexpect) against a local relay
and renders their screens with pyte, exactly as the pty tests do.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration"), str(ROOT)]

import test_talk_pty as pty  # noqa: E402 (needs the path above)

from relay_fixture import RelayProcess, keygen  # noqa: E402

HEADER = [
    "A real securechat talk session, captured from two pseudo-terminals (pexpect + pyte)",
    "by driving `securechat talk` against a local relay. Alice wrote first while Bob was",
    "offline; the relay held the message until Bob connected. Marks on your own lines:",
    "… pending, ✓ accepted by the relay, ✓✓ delivered to the peer's device.",
    "",
]


def _frame(name: str, peer: str, term: pty.Term) -> list[str]:
    bar = "─" * pty.COLS
    lines = [f"$ securechat talk --key {name} --peer {peer}", "┌" + bar + "┐"]
    lines += ["│" + line.ljust(pty.COLS) + "│" for line in term.screen.display]
    return [*lines, "└" + bar + "┘", ""]


def main(out_path: str) -> None:
    pty.ROWS, pty.COLS = 16, 96
    tmp = Path(tempfile.mkdtemp())
    home = tmp / "home"
    keygen(home, "alice", "bob")
    relay = RelayProcess.start(tmp / "relay-data")
    try:

        def start(key: str, peer: str) -> pty.Term:
            term = pty.Term(home, ["talk", "--key", key, "--peer", peer, "--relay", relay.address])
            term.wait("connected")
            return term

        alice = start("alice", "bob")
        alice.type("Hi Bob! Are you around? (bob is offline: this waits at the relay)\r")
        alice.wait("✓")
        bob = start("bob", "alice")
        bob.wait("Are you around")
        alice.wait("bob is online")
        alice.wait("✓✓")
        bob.type("Here now. Let me check your key first.\r")
        alice.wait("check your key")
        bob.type("/verify\r")
        bob.wait("safety number")
        time.sleep(0.3)
        alice.type("/verify\r")
        alice.wait("safety number with")
        alice.type("Same number here: 12 groups match.\r")
        bob.wait("Same number")
        bob.type("Great, we are verified. ")
        for term in (alice, bob):
            for _ in range(10):
                term.pump()
        text = HEADER + _frame("alice", "bob", alice) + _frame("bob", "alice", bob)
        Path(out_path).write_text("\n".join(text))
        for term in (alice, bob):
            term.type("\x03")
            term.exit_code()
    finally:
        relay.stop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "talk-session.txt"))
