"""README's first command: ``securechat demo`` plays the whole product and cleans up."""

from __future__ import annotations

import re
from pathlib import Path

from relay_fixture import run_cli

MESSAGES = (
    "Hi Bob! Is this thing really end-to-end?",
    "It is. The relay only sees the bytes on the right.",
    "Carol, when you're back: lunch at noon?",
    "Noon works. Sorry, I was offline!",
)


def test_demo_runs_shows_every_message_and_never_the_text_at_the_relay(sc_home: Path) -> None:
    res = run_cli(sc_home, "demo", timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    people, relay = [], []
    for line in out.splitlines():
        left, bar, right = line.partition(" | ")
        people.append(left)
        if bar:
            relay.append(right)
    shown = "\n".join(people)
    for text in MESSAGES:
        assert f": {text}" in shown, text
    # the offline recipient got the group message once she came back
    assert re.search(r"carol sees \(group\)\s+alice: Carol, when you're back", shown)
    # what the relay handled: sizes and ciphertext, never a word of the conversation
    frames = [
        r
        for r in relay
        if r.startswith("relay ") and "InviteOpen" not in r and "InviteJoin" not in r
    ]
    assert len(frames) >= 10 and all(re.search(r"\d+ B", r) for r in frames)
    # keys were exchanged with invite codes: the relay saw sizes, never a code's words
    codes = re.findall(r"securechat accept (\d+)-([a-z]+)-([a-z]+)", shown)
    assert codes and "bob: verified alice" in shown and "alice: verified bob" in shown
    for _, even, odd in codes:
        assert even not in " ".join(relay) and odd not in " ".join(relay)
    assert sorted(int(b) for b in re.findall(r"InviteData (\d+) B", " ".join(relay))) == [
        35,
        35,
        274,
        274,
    ]
    relay_text = " ".join(relay).lower()
    for word in ("hi bob", "end-to-end", "bytes on the right", "lunch", "noon", "sorry", "offline"):
        assert word not in relay_text, word
    # everything lived in a temporary directory that is gone now
    workdir = re.search(r"everything in (\S+) \(removed after\)", out)
    assert workdir is not None and not Path(workdir.group(1)).exists()
    assert "demo finished" in out
