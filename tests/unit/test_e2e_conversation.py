"""Long in-memory conversations under a hostile network (hypothesis).

Two or three parties talk in random order through a simulated relay that
reorders, drops, duplicates, replays and flips bits, and sometimes a party
restarts from its serialised state. Invariants: every honest payload is
delivered exactly once (later copies come back as duplicates), every tampered
payload is rejected with AuthenticationError and changes nothing, and the
conversation keeps working to the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securechat.core.e2e import Content, E2EState, Group, parse_bundle
from securechat.core.keys import generate_identity
from securechat.errors import AuthenticationError

ACTIONS = (
    "send",
    "send",
    "send",
    "deliver",
    "deliver",
    "deliver",
    "drop",
    "dup",
    "flip",
    "restart",
)


@dataclass
class InFlight:
    sender: int
    receiver: int
    payload: bytes
    content: Content


def _parties(n: int, seed: int) -> list[E2EState]:
    names = ["alice", "bob", "carol"][:n]
    return [
        E2EState.new(generate_identity(name, random.Random(seed * 10 + i).randbytes(64)))
        for i, name in enumerate(names)
    ]


def _deliver(parties: list[E2EState], item: InFlight, delivered: set[bytes]) -> None:
    sender_dh = parties[item.sender].identity.public.dh
    got = parties[item.receiver].decrypt(sender_dh, item.payload, 0)
    key = item.content.msg_id + bytes([item.receiver])
    if key in delivered:
        assert got.duplicate
    else:
        assert not got.duplicate
        assert got.content == item.content
        assert got.sender.key_bytes == parties[item.sender].identity.public.key_bytes
        delivered.add(key)


def _tampered(parties: list[E2EState], item: InFlight, position: int, bit: int) -> None:
    forged = bytearray(item.payload)
    forged[position % len(forged)] ^= 1 << bit
    receiver = parties[item.receiver]
    before = receiver.serialize()
    try:
        receiver.decrypt(parties[item.sender].identity.public.dh, bytes(forged), 0)
    except AuthenticationError:
        pass
    else:
        raise AssertionError("a tampered payload was accepted")
    assert receiver.serialize() == before


@given(
    n_parties=st.integers(2, 3),
    seed=st.integers(0, 2**32 - 1),
    use_bundles=st.booleans(),
    data=st.data(),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_network_conversation(
    n_parties: int, seed: int, use_bundles: bool, data: st.DataObject
) -> None:
    rng = random.Random(seed).randbytes
    parties = _parties(n_parties, seed)
    published = {i: p.make_prekeys(rng, 0, one_time=2) for i, p in enumerate(parties)}
    in_flight: list[InFlight] = []
    seen: list[InFlight] = []
    delivered: set[bytes] = set()
    counter = 0
    for _ in range(data.draw(st.integers(10, 80), label="steps")):
        action = data.draw(st.sampled_from(ACTIONS), label="action")
        if action == "send":
            s = data.draw(st.integers(0, n_parties - 1), label="sender")
            r = data.draw(
                st.sampled_from([i for i in range(n_parties) if i != s]), label="receiver"
            )
            counter += 1
            group = None
            if n_parties == 3 and data.draw(st.booleans(), label="group"):
                group = Group.of(tuple(p.identity.public.dh for p in parties))
            content = Content(counter.to_bytes(16, "big"), counter, f"message {counter}", group)
            peer = parties[r].identity.public
            bundle = None
            if use_bundles and not parties[s].has_session(peer):
                spk, opks = published[r]
                bundle = parse_bundle(spk, opks[0] if opks else b"")
                published[r] = (spk, opks[1:])  # the relay hands out each one-time key once
            payload = parties[s].encrypt(peer, content, rng, 0, bundle)
            in_flight.append(InFlight(s, r, payload, content))
        elif action in ("deliver", "drop") and in_flight:
            item = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1), label="which"))
            if action == "deliver":
                _deliver(parties, item, delivered)
                seen.append(item)
        elif action == "dup" and seen:
            _deliver(parties, data.draw(st.sampled_from(seen), label="dup"), delivered)
        elif action == "flip" and (in_flight or seen):
            item = data.draw(st.sampled_from(in_flight + seen), label="flip")
            _tampered(
                parties, item, data.draw(st.integers(0, 10_000)), data.draw(st.integers(0, 7))
            )
        elif action == "restart":
            i = data.draw(st.integers(0, n_parties - 1), label="restart")
            parties[i] = E2EState.deserialize(parties[i].identity, parties[i].serialize())
    random.Random(seed).shuffle(in_flight)
    for item in in_flight:  # the network finally delivers what it still holds
        _deliver(parties, item, delivered)
    # and every pair can still talk both ways
    for s in range(n_parties):
        for r in range(n_parties):
            if s != r:
                counter += 1
                content = Content(counter.to_bytes(16, "big"), counter, "final")
                payload = parties[s].encrypt(parties[r].identity.public, content, rng, 0)
                _deliver(parties, InFlight(s, r, payload, content), delivered)
