"""E2EState: session start, prekeys, exactly-once, replays, groups, persistence, FS, PCS."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from securechat.core import envelope, ratchet
from securechat.core.e2e import (
    DAY_MS,
    MAX_SEEN,
    SPK_GRACE_MS,
    SPK_ROTATION_MS,
    Bundle,
    Content,
    E2EState,
    Group,
    StateChanges,
    parse_bundle,
)
from securechat.core.keys import PublicIdentity, generate_identity
from securechat.errors import (
    AuthenticationError,
    ReplayError,
    SessionError,
)

Rng = Callable[[int], bytes]


def party(name: str, seed: int) -> E2EState:
    return E2EState.new(generate_identity(name, random.Random(seed).randbytes(64)))


def msg(n: int, text: str | None = None, group: Group | None = None) -> Content:
    return Content(n.to_bytes(16, "big"), 1000 + n, text if text is not None else f"msg {n}", group)


def bundle_of(owner: E2EState, rng: Rng, now: int = 0, opk: bool = True) -> Bundle:
    spk, opks = owner.make_prekeys(rng, now, one_time=1 if opk else 0)
    return parse_bundle(spk, opks[0] if opks else b"")


@pytest.fixture
def rng() -> Rng:
    return random.Random(99).randbytes


def test_conversation_with_bundle(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    first = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
    assert first[1] == envelope.KIND_INITIAL
    got = bob.decrypt(alice.identity.public.dh, first, 0)
    assert got.content == msg(1) and not got.duplicate
    assert got.sender.key_bytes == alice.identity.public.key_bytes
    assert alice.has_session(bob.identity.public) and bob.has_session(alice.identity.public)
    second = alice.encrypt(bob.identity.public, msg(2), rng, 0)
    assert second[1] == envelope.KIND_INITIAL  # no reply yet: header repeated
    bob.decrypt(alice.identity.public.dh, second, 0)
    reply = bob.encrypt(alice.identity.public, msg(3), rng, 0)
    assert reply[1] == envelope.KIND_NORMAL
    assert alice.decrypt(bob.identity.public.dh, reply, 0).sender.name == "bob"
    assert alice.encrypt(bob.identity.public, msg(4), rng, 0)[1] == envelope.KIND_NORMAL


def test_one_time_prekey_is_consumed_once(rng: Rng) -> None:
    alice, bob, carol = party("alice", 1), party("bob", 2), party("carol", 3)
    spk, opks = bob.make_prekeys(rng, 0, one_time=1)
    assert bob.one_time_prekey_count == 1
    bundle = parse_bundle(spk, opks[0])
    m1 = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle)
    bob.decrypt(alice.identity.public.dh, m1, 0)
    assert bob.one_time_prekey_count == 0
    # a malicious relay hands out the same one-time prekey again
    m2 = carol.encrypt(bob.identity.public, msg(2), rng, 0, bundle)
    with pytest.raises(AuthenticationError):
        bob.decrypt(carol.identity.public.dh, m2, 0)


def test_fallback_without_bundle_and_replay(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    first = alice.encrypt(bob.identity.public, msg(1), rng, 0)
    assert bob.decrypt(alice.identity.public.dh, first, 0).content.text == "msg 1"
    again = bob.decrypt(alice.identity.public.dh, first, 0)
    assert again.duplicate and again.content.text == ""  # at-least-once redelivery
    # once the peer has answered and the session moved on, a restored copy of the
    # initial message is a replay even though the payload cache forgot it
    bob2 = E2EState.deserialize(bob.identity, bob.serialize())
    for record in bob2._peers.values():
        record.seen_payloads.clear()
        record.sessions.clear()
    with pytest.raises(ReplayError):
        bob2.decrypt(alice.identity.public.dh, first, 0)


def test_relay_cannot_lie_about_sender(rng: Rng) -> None:
    alice, bob, carol = party("alice", 1), party("bob", 2), party("carol", 3)
    m = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
    with pytest.raises(AuthenticationError):
        bob.decrypt(carol.identity.public.dh, m, 0)
    bob.decrypt(alice.identity.public.dh, m, 0)
    normal = bob.encrypt(alice.identity.public, msg(2), rng, 0)
    carol.encrypt(alice.identity.public, msg(3), rng, 0)  # carol is known to alice too
    alice.decrypt(carol.identity.public.dh, carol.encrypt(alice.identity.public, msg(4), rng, 0), 0)
    with pytest.raises(AuthenticationError):
        alice.decrypt(carol.identity.public.dh, normal, 0)
    assert alice.decrypt(bob.identity.public.dh, normal, 0).content == msg(2)


def test_duplicate_msg_id_in_new_ciphertext(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(1), rng, 0), 0)
    resent = alice.encrypt(bob.identity.public, msg(1), rng, 0)  # outbox retry re-encrypts
    got = bob.decrypt(alice.identity.public.dh, resent, 0)
    assert got.duplicate and got.content == msg(1)


def test_failed_decrypt_changes_nothing(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    m = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
    before = bob.serialize()
    for i in range(len(m)):
        forged = bytearray(m)
        forged[i] ^= 0x80
        with pytest.raises(AuthenticationError):  # a second apart: within the work budget
            bob.decrypt(alice.identity.public.dh, bytes(forged), i * 1000)
    assert bob.serialize() == before
    assert bob.decrypt(alice.identity.public.dh, m, len(m) * 1000).content == msg(1)


def test_signed_prekey_rotation_keeps_grace(rng: Rng) -> None:
    alice, bob, carol = party("alice", 1), party("bob", 2), party("carol", 3)
    old = bundle_of(bob, rng, now=0, opk=False)
    late = alice.encrypt(bob.identity.public, msg(1), rng, 0, old)
    spk_blob, _ = bob.make_prekeys(rng, SPK_ROTATION_MS, one_time=0)
    assert parse_bundle(spk_blob, b"").signed_prekey != old.signed_prekey
    assert bob.decrypt(alice.identity.public.dh, late, SPK_ROTATION_MS + 1).content == msg(1)
    too_late = carol.encrypt(bob.identity.public, msg(2), rng, 0, old)
    with pytest.raises(AuthenticationError):
        bob.decrypt(carol.identity.public.dh, too_late, SPK_ROTATION_MS + SPK_GRACE_MS)
    same, _ = bob.make_prekeys(rng, SPK_ROTATION_MS + 1, one_time=0)
    assert same == spk_blob  # not yet due


def test_persistence_continues_conversation(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    pending = [
        alice.encrypt(bob.identity.public, msg(i), rng, 0, bundle_of(bob, rng)) for i in range(3)
    ]
    bob.decrypt(alice.identity.public.dh, pending[2], 0)
    bob = E2EState.deserialize(bob.identity, bob.serialize())
    alice = E2EState.deserialize(alice.identity, alice.serialize())
    assert bob.serialize() == E2EState.deserialize(bob.identity, bob.serialize()).serialize()
    assert bob.decrypt(alice.identity.public.dh, pending[0], 0).content == msg(0)
    assert bob.decrypt(alice.identity.public.dh, pending[2], 0).duplicate
    reply = bob.encrypt(alice.identity.public, msg(5), rng, 0)
    assert alice.decrypt(bob.identity.public.dh, reply, 0).content == msg(5)


def test_deserialize_rejects_corrupt_or_foreign_state(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(1), rng, 0), 0)
    data = bob.serialize()
    with pytest.raises(SessionError):
        E2EState.deserialize(alice.identity, data)
    for bad in (data[:-1], data + b"\x00", b"XXXXX" + data[5:], data[:5] + b"\x03" + data[6:]):
        with pytest.raises(SessionError):
            E2EState.deserialize(bob.identity, bad)


def test_a_peer_the_user_chose_replaces_a_record_with_other_keys(rng: Rng) -> None:
    """encrypt() is given the peer the user trusts (the client's known peers refuse a
    changed key before this): a record made with another signing key is replaced."""
    alice, bob = party("alice", 1), party("bob", 2)
    alice.encrypt(bob.identity.public, msg(1), rng, 0)
    other = party("x", 7)
    imposter = PublicIdentity(bob.identity.public.dh, other.identity.public.sign, "bob")
    alice.encrypt(imposter, msg(2), rng, 0)
    assert alice.has_session(imposter) and not alice.has_session(bob.identity.public)


def test_group_fan_out_three_parties(rng: Rng) -> None:
    a, b, c = party("a", 1), party("b", 2), party("c", 3)
    members = (a.identity.public.dh, b.identity.public.dh, c.identity.public.dh)
    content = msg(1, "to the group", Group.of(members))
    copies = {p.identity.public.dh: a.encrypt(p.identity.public, content, rng, 0) for p in (b, c)}
    for p in (b, c):
        got = p.decrypt(a.identity.public.dh, copies[p.identity.public.dh], 0)
        assert got.content == content and got.content.group is not None
        assert set(got.content.group.members) == set(members)
    # the relay cannot re-route b's copy to c
    with pytest.raises(AuthenticationError):
        c.decrypt(a.identity.public.dh, copies[b.identity.public.dh], 0)


def test_group_must_list_sender_and_recipient(rng: Rng) -> None:
    a, b, c, d = party("a", 1), party("b", 2), party("c", 3), party("d", 4)
    without_b = Group.of((a.identity.public.dh, c.identity.public.dh))
    with pytest.raises(SessionError):
        a.encrypt(b.identity.public, msg(1, group=without_b), rng, 0)
    without_a = Group.of((b.identity.public.dh, d.identity.public.dh))
    with pytest.raises(SessionError):
        a.encrypt(b.identity.public, msg(1, group=without_a), rng, 0)


def test_receiver_rejects_group_not_listing_it(rng: Rng) -> None:
    a, b, c = party("a", 1), party("b", 2), party("c", 3)
    # build a copy with a member list that omits b by sealing below the facade
    a.encrypt(b.identity.public, msg(0), rng, 0)
    session = a._peers[b.identity.public.dh].sessions[0]
    bad = msg(1, group=Group.of((a.identity.public.dh, c.identity.public.dh)))
    prefix = session.initial or envelope.encode_prefix(None)
    payload = prefix + ratchet.encrypt(
        session.state, envelope.encode_content(bad), session.ad + prefix, rng
    )
    before = b.serialize()
    with pytest.raises(SessionError):
        b.decrypt(a.identity.public.dh, payload, 0)
    assert b.serialize() == before


def test_seen_ids_are_bounded(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(0), rng, 0), 0)
    record = bob._peers[alice.identity.public.dh]
    for i in range(MAX_SEEN + 10):
        record.remember(i.to_bytes(16, "big"), msg(i))
    assert len(record.seen_ids) == len(record.seen_payloads) == MAX_SEEN


def _talk(
    a: E2EState, b: E2EState, rng: Rng, rounds: int, start: int
) -> list[tuple[E2EState, bytes, bytes]]:
    """Alternate a->b and b->a; return (receiver, sender_dh, payload) of each message."""
    log = []
    for i in range(rounds):
        s, r = (a, b) if i % 2 == 0 else (b, a)
        payload = s.encrypt(r.identity.public, msg(start + i), rng, 0)
        assert r.decrypt(s.identity.public.dh, payload, 0).content == msg(start + i)
        log.append((r, s.identity.public.dh, payload))
    return log


def _cannot_open(state: E2EState, sender_dh: bytes, payload: bytes) -> None:
    """Neither the facade nor the raw ratchet of any session recovers the plaintext."""
    try:
        got = state.decrypt(sender_dh, payload, 0)
    except AuthenticationError:
        pass
    else:
        assert got.duplicate and got.content.text == ""
    env = envelope.decode_envelope(payload)
    for session in state._peers[sender_dh].sessions:
        with pytest.raises(AuthenticationError):
            ratchet.decrypt(session.state, env.message, session.ad + env.prefix)


def test_forward_secrecy(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    alice.encrypt(bob.identity.public, msg(100), rng, 0, bundle_of(bob, rng))  # start
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(101), rng, 0), 0)
    captured = _talk(alice, bob, rng, 6, 0)
    _talk(alice, bob, rng, 5, 10)  # more messages, more DH steps
    stolen = {
        s.identity.public.dh: E2EState.deserialize(s.identity, s.serialize()) for s in (alice, bob)
    }
    for receiver, sender_dh, payload in captured:
        _cannot_open(stolen[receiver.identity.public.dh], sender_dh, payload)


def test_post_compromise_security(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    _start = alice.encrypt(bob.identity.public, msg(0), rng, 0, bundle_of(bob, rng))
    bob.decrypt(alice.identity.public.dh, _start, 0)
    _talk(bob, alice, rng, 2, 1)
    attacker = E2EState.deserialize(bob.identity, bob.serialize())  # bob's state leaks
    leaked = alice.encrypt(bob.identity.public, msg(10), rng, 0)
    assert attacker.decrypt(alice.identity.public.dh, leaked, 0).content == msg(
        10
    )  # before healing
    bob.decrypt(alice.identity.public.dh, leaked, 0)
    _talk(bob, alice, rng, 2, 20)  # one DH round trip with fresh randomness
    healed = alice.encrypt(bob.identity.public, msg(30), rng, 0)
    with pytest.raises(AuthenticationError):
        attacker.decrypt(alice.identity.public.dh, healed, 0)
    assert bob.decrypt(alice.identity.public.dh, healed, 0).content == msg(30)


def test_simultaneous_start_converges(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    a1 = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
    b1 = bob.encrypt(alice.identity.public, msg(2), rng, 0, bundle_of(alice, rng))
    assert bob.decrypt(alice.identity.public.dh, a1, 0).content == msg(1)
    assert alice.decrypt(bob.identity.public.dh, b1, 0).content == msg(2)
    _talk(alice, bob, rng, 6, 10)
    assert alice._peers[bob.identity.public.dh].sessions[0].ephemeral == (
        bob._peers[alice.identity.public.dh].sessions[0].ephemeral
    )


def test_redelivered_payload_is_a_duplicate_but_a_modified_copy_is_rejected(rng: Rng) -> None:
    """The dedup digest covers every byte: only an identical payload counts as seen."""
    alice, bob = party("alice", 1), party("bob", 2)
    sender = alice.identity.public.dh
    first = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
    bob.decrypt(sender, first, 0)
    payload = alice.encrypt(bob.identity.public, msg(2), rng, 0)
    assert bob.decrypt(sender, payload, 0).content == msg(2)
    bob = E2EState.deserialize(bob.identity, bob.serialize())  # survives a restart
    again = bob.decrypt(sender, payload, 0)
    assert again.duplicate and again.content == Content(msg(2).msg_id, msg(2).sent_ms, "")
    for where in (len(payload) // 2, len(payload) - 20):  # ciphertext body, tag untouched
        forged = bytearray(payload)
        forged[where] ^= 1
        with pytest.raises(AuthenticationError):
            bob.decrypt(sender, bytes(forged), 0)


def test_seen_sets_evict_oldest_first(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(0), rng, 0), 0)
    record = bob._peers[alice.identity.public.dh]
    for i in range(1, 2 * MAX_SEEN + 3):
        record.remember(i.to_bytes(16, "big"), msg(i))
    kept = range(MAX_SEEN + 3, 2 * MAX_SEEN + 3)
    assert list(record.seen_ids) == [msg(i).msg_id for i in kept]
    assert list(record.seen_payloads) == [i.to_bytes(16, "big") for i in kept]


# --- persistence as rows: one core row, one row per peer ----------------------------------------


def _apply(rows: dict[bytes | None, bytes], changes: StateChanges) -> None:
    """What the client does in its transaction: upsert the changed rows (key None: core)."""
    if changes.core is not None:
        rows[None] = changes.core
    for key, row in changes.peers.items():
        rows[key] = row
    for key in changes.deleted:
        rows.pop(key, None)


def _rebuilt(state: E2EState, rows: dict[bytes | None, bytes]) -> bytes:
    peers = {k: v for k, v in rows.items() if k is not None}
    return E2EState.load(state.identity, rows[None], peers.items()).serialize()


_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "send",
                "send_bundle",
                "group",
                "deliver",
                "deliver",
                "redeliver",
                "forge",
                "prekeys",
                "prekeys",
                "time",
                "time",
                "rename",
                "failed_write",
            ]
        ),
        st.integers(0, 2),  # who acts
        st.integers(0, 1),  # which of the other two
        st.integers(0, 1000),  # which in-flight payload
        st.booleans(),  # persist after this step
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, seed=st.integers(0, 2**32))
def test_rows_rebuild_the_live_state_after_any_operations(
    ops: list[tuple[str, int, int, int, bool]], seed: int
) -> None:
    """A missed dirty mark is a silent loss: the rows must always rebuild ``serialize()``."""
    rng = random.Random(seed).randbytes
    parties = [party("alice", 1), party("bob", 2), party("carol", 3)]
    rows: list[dict[bytes | None, bytes]] = [{} for _ in parties]
    flight: list[tuple[int, int, bytes]] = []  # (sender, recipient, payload)
    now = 0
    for counter, (op, who, other, pick, persist) in enumerate(ops, 1):
        me = parties[who]
        to = (who + 1 + other) % 3
        peer = parties[to].identity.public
        try:
            if op in ("send", "send_bundle", "rename"):
                if op == "rename":
                    peer = PublicIdentity(peer.dh, peer.sign, f"{peer.name}-{counter}")
                bundle = bundle_of(parties[to], rng, now) if op == "send_bundle" else None
                flight.append((who, to, me.encrypt(peer, msg(counter), rng, now, bundle)))
            elif op == "group":
                members = tuple(sorted(p.identity.public.dh for p in parties))
                content = msg(counter, group=Group.of(members))
                for r in {to, (who + 1) % 3, (who + 2) % 3} - {who}:
                    target = parties[r].identity.public
                    flight.append((who, r, me.encrypt(target, content, rng, now)))
            elif op in ("deliver", "redeliver", "forge") and flight:
                sender, recipient, payload = flight[pick % len(flight)]
                if op == "deliver":
                    flight.remove((sender, recipient, payload))
                if op == "forge":
                    payload = payload[:-1] + bytes([payload[-1] ^ 1])
                sender_dh = parties[sender].identity.public.dh
                parties[recipient].decrypt(sender_dh, payload, now)
            elif op == "prekeys":
                me.make_prekeys(rng, now, one_time=pick % 3)
            elif op == "time":
                now += (DAY_MS, SPK_ROTATION_MS, SPK_GRACE_MS)[pick % 3]
            elif op == "failed_write":  # the transaction rolled back: nothing reached the rows
                me.requeue(me.take_changes())
        except (AuthenticationError, SessionError):
            pass  # rejected input; whatever it changed (expiry) must still be marked
        if persist:
            for state, its_rows in zip(parties, rows, strict=True):
                _apply(its_rows, state.take_changes())
                assert _rebuilt(state, its_rows) == state.serialize()
                assert not state.take_changes(), "taking twice must find nothing new"


def test_rows_are_clean_after_load_and_all_dirty_after_a_snapshot(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    first = alice.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
    bob.decrypt(alice.identity.public.dh, first, 0)
    assert party("carol", 3).take_changes().core is not None  # a new state has a core to write
    rows: dict[bytes | None, bytes] = {}
    _apply(rows, bob.take_changes())
    assert set(rows) == {None, alice.identity.public.dh}
    peers = {k: v for k, v in rows.items() if k is not None}
    assert not E2EState.load(bob.identity, rows[None], peers.items()).take_changes()
    snapshot = E2EState.deserialize(bob.identity, bob.serialize()).take_changes()
    assert snapshot.core == rows[None] and snapshot.peers == peers
    # a message for alice's session touches her row only, not the core
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(2), rng, 0), 0)
    changes = bob.take_changes()
    assert changes.core is None and list(changes.peers) == [alice.identity.public.dh]


def test_load_refuses_rows_that_are_not_what_they_claim(rng: Rng) -> None:
    alice, bob, carol = party("alice", 1), party("bob", 2), party("carol", 3)
    for sender in (alice, carol):
        payload = sender.encrypt(bob.identity.public, msg(1), rng, 0, bundle_of(bob, rng))
        bob.decrypt(sender.identity.public.dh, payload, 0)
    changes = bob.take_changes()
    assert changes.core is not None
    a, c = alice.identity.public.dh, carol.identity.public.dh
    E2EState.load(bob.identity, changes.core, changes.peers.items())  # as written: fine
    bad_rows: list[tuple[bytes, dict[bytes, bytes]]] = [
        (changes.core, {a: changes.peers[c], c: changes.peers[a]}),  # swapped between peers
        (changes.core, {a: changes.peers[a][:-1]}),  # truncated
        (changes.core, {a: changes.peers[a] + b"\x00"}),  # trailing bytes
        (changes.core, {a: b"SCE2P\x03" + changes.peers[a][6:]}),  # unknown row version
        (changes.peers[a], {}),  # a peer row as the core
        (changes.core + b"\x00", {}),
    ]
    for core, peers in bad_rows:
        with pytest.raises(SessionError):
            E2EState.load(bob.identity, core, peers.items())
    with pytest.raises(SessionError, match="another identity"):
        E2EState.load(alice.identity, changes.core, ())


def test_signed_prekey_expiry_while_receiving_is_written(rng: Rng) -> None:
    """Expiry is a change of the core even when the message that triggers it is rejected."""
    alice, bob = party("alice", 1), party("bob", 2)
    bob.make_prekeys(rng, 0, one_time=0)
    bob.make_prekeys(rng, SPK_ROTATION_MS, one_time=0)  # the first one retires
    rows: dict[bytes | None, bytes] = {}
    _apply(rows, bob.take_changes())
    forged = alice.encrypt(bob.identity.public, msg(1), rng, 0)[:-1] + b"\x00"
    with pytest.raises(AuthenticationError):
        bob.decrypt(alice.identity.public.dh, forged, SPK_ROTATION_MS + SPK_GRACE_MS)
    _apply(rows, bob.take_changes())
    assert _rebuilt(bob, rows) == bob.serialize()
