"""Tampering end to end: a malicious relay between real Messenger clients.

The relay double (``fakerelay.FakeRelay``) speaks the real Noise + wire protocol
and flips bits, truncates, duplicates, holds back (reorders), replays old
Deliver frames, reflects a frame to its own sender and attributes frames to the
wrong sender. Every forgery must be rejected with a clear notice, every honest
message shown exactly once, and the conversation must go on afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from securechat.client.peers import Conversation

from reliability.fakerelay import FakeRelay, wait_for
from reliability.harness import Client, make_identities

pytestmark = pytest.mark.timeout(120)
ROUNDS = 12  # messages per sender per conversation under attack


@pytest.fixture
def trio(sc_home: Path) -> Iterator[tuple[FakeRelay, dict[str, Client]]]:
    make_identities(sc_home, "alice", "bob", "carol")
    relay = FakeRelay(seed=6, attack_rate=0.6)
    clients = {
        n: Client(sc_home, n, relay.address, relay.public) for n in ("alice", "bob", "carol")
    }
    try:
        assert all(c.messenger.wait_connected(10) for c in clients.values())
        yield relay, clients
    finally:
        for c in clients.values():
            c.stop()
        relay.close()


def _conv(clients: dict[str, Client], me: str, *peers: str) -> Conversation:
    return Conversation.with_peers(
        clients[me].identity.public, [clients[p].identity.public for p in peers]
    )


def _expect(clients: dict[str, Client], want: dict[str, Counter[str]], timeout: float) -> None:
    def done() -> bool:
        return all(Counter(clients[n].events.texts()) >= w for n, w in want.items())

    assert wait_for(done, timeout), {
        n: sorted((w - Counter(clients[n].events.texts())).elements()) for n, w in want.items()
    }


def test_malicious_relay_forgeries_rejected_honest_shown_once(
    trio: tuple[FakeRelay, dict[str, Client]],
) -> None:
    relay, clients = trio
    want: dict[str, Counter[str]] = {n: Counter() for n in clients}
    group = {n: _conv(clients, n, *(m for m in clients if m != n)) for n in clients}
    for i in range(ROUNDS):
        for sender, to in (("alice", "bob"), ("bob", "alice"), ("carol", "alice")):
            text = f"{sender}->{to} #{i}"
            clients[sender].messenger.send_text(_conv(clients, sender, to), text)
            want[to][text] += 1
        sender = ("alice", "bob", "carol")[i % 3]
        text = f"{sender}->group #{i}"
        clients[sender].messenger.send_text(group[sender], text)
        for n in clients:
            if n != sender:
                want[n][text] += 1
    relay.flush()
    _expect(clients, want, timeout=30)

    # exactly once: nothing shown twice, nothing shown that nobody sent
    for name, client in clients.items():
        shown = Counter(client.events.texts())
        assert shown == want[name], name
    # every forgery was rejected loudly, and only forgeries were
    notices = [t for c in clients.values() for t in c.events.notices()]
    assert relay.tally.forged >= 10, relay.tally  # the attack really happened
    assert relay.tally.silent + relay.tally.held >= 5, relay.tally
    assert wait_for(
        lambda: sum(len(c.events.notices()) for c in clients.values()) >= relay.tally.forged, 10
    )
    notices = [t for c in clients.values() for t in c.events.notices()]
    assert len(notices) == relay.tally.forged, (notices, relay.tally)
    assert all(t.startswith("rejected a message claiming to be from ") for t in notices), notices

    # the conversation continues once the relay behaves
    relay.attack_rate = 0.0
    after: dict[str, Counter[str]] = {n: Counter(want[n]) for n in clients}
    for sender, to in (("alice", "bob"), ("bob", "carol"), ("carol", "alice")):
        text = f"after the attack {sender}->{to}"
        clients[sender].messenger.send_text(_conv(clients, sender, to), text)
        after[to][text] += 1
    _expect(clients, after, timeout=20)
    for name, client in clients.items():
        assert Counter(client.events.texts()) == after[name]
    assert all(c.messenger.pending() == 0 for c in clients.values())


def test_every_attack_kind_was_exercised(trio: tuple[FakeRelay, dict[str, Client]]) -> None:
    """The same run with every attack forced in turn, so none is left to chance."""
    relay, clients = trio
    kinds = ["flip", "truncate", "dup", "hold", "replay", "reflect", "wrong_sender"]
    relay.attack_only = clients["alice"].identity.public.dh  # receipts pass untouched
    want: Counter[str] = Counter()
    for i, kind in enumerate(kinds * 2):
        relay.rnd.random = lambda: 0.0  # type: ignore[method-assign]  # always attack
        relay.rnd.choice = (lambda k: lambda seq: k if k in seq else seq[0])(kind)  # type: ignore[method-assign]
        text = f"{kind} {i}"
        clients["alice"].messenger.send_text(_conv(clients, "alice", "bob"), text)
        want[text] += 1
        # the relay routes on its own thread: wait before forcing the next kind
        assert wait_for(
            lambda n=i + 1: sum(v for k, v in relay.tally.by_kind.items() if k != "honest") >= n,
            10,
        )
    relay.flush()
    _expect(clients, {"bob": want}, timeout=20)
    assert Counter(clients["bob"].events.texts()) == want
    assert set(relay.tally.by_kind) >= set(kinds), relay.tally
