"""Hostile peers and a hostile relay against the end-to-end core (issue 11, items 1-3 and 13).

Everything here runs both ends in memory: a throwaway identity that floods a victim with
session-opening messages, a sender holding a known peer's X25519 key with another signing
key, a non-member posting into a group, and forged headers that would cost CPU.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
from securechat.core import envelope, keys, ratchet
from securechat.core.e2e import (
    DAY_MS,
    MAX_CLOCK_SKEW_MS,
    MAX_EPHEMERALS_PER_PEER,
    REPLAY_WINDOW_MS,
    WORK_BURST,
    Content,
    E2EState,
    Group,
    parse_bundle,
)
from securechat.core.e2e import state as e2e_state
from securechat.errors import (
    AuthenticationError,
    PeerKeyChangedError,
    ReplayError,
    SessionError,
)

Rng = Callable[[int], bytes]
NOW = 1_800_000_000_000  # a fixed "now" (2027) for every clock in these tests


def party(name: str, seed: int) -> E2EState:
    return E2EState.new(keys.generate_identity(name, random.Random(seed).randbytes(64)))


def msg(n: int, sent_ms: int = NOW, group: Group | None = None) -> Content:
    return Content(n.to_bytes(16, "big"), sent_ms, f"msg {n}", group)


@pytest.fixture
def rng() -> Rng:
    return random.Random(99).randbytes


# --- 1. the replay floor cannot be poisoned --------


def test_far_future_session_opening_messages_are_refused_and_poison_nothing(rng: Rng) -> None:
    victim, mallory, carol = party("victim", 1), party("mallory", 2), party("carol", 3)
    for sent in (2**64 - 1, 2**64 - 2, NOW + MAX_CLOCK_SKEW_MS + 1, NOW - REPLAY_WINDOW_MS - 1):
        fresh = party("mallory", 2)  # a new session each time (no reply ever came)
        payload = fresh.encrypt(victim.identity.public, msg(1, sent), rng, sent % 2**63)
        with pytest.raises(ReplayError):
            victim.decrypt(mallory.identity.public.dh, payload, NOW)
    victim.serialize()  # nothing out of range reached the state (it used to raise struct.error)
    # anyone else (and mallory with an honest clock) still opens new sessions
    for sender in (carol, mallory):
        got = victim.decrypt(
            sender.identity.public.dh, sender.encrypt(victim.identity.public, msg(2), rng, NOW), NOW
        )
        assert got.new_session and got.content.text == "msg 2"


def test_one_senders_flood_cannot_evict_anothers_replay_protection(rng: Rng) -> None:
    victim, carol = party("victim", 1), party("carol", 3)
    carols_first = carol.encrypt(victim.identity.public, msg(1), rng, NOW)
    victim.decrypt(carol.identity.public.dh, carols_first, NOW)
    # a throwaway identity opens many sessions, each with a fresh ephemeral key
    for i in range(MAX_EPHEMERALS_PER_PEER + 40):
        mallory = party("mallory", 2)
        payload = mallory.encrypt(victim.identity.public, msg(100 + i, NOW + i), rng, NOW)
        victim.decrypt(mallory.identity.public.dh, payload, NOW + i)
    record = victim._peers[mallory.identity.public.dh]
    assert len(record.ephemerals) == MAX_EPHEMERALS_PER_PEER  # bounded per peer
    assert record.floor_ms >= NOW  # only mallory's own floor rose
    # carol's initial is still remembered: replaying it after her session is gone fails
    victim._peers[carol.identity.public.dh].sessions.clear()
    victim._peers[carol.identity.public.dh].seen_payloads.clear()
    with pytest.raises(ReplayError):
        victim.decrypt(carol.identity.public.dh, carols_first, NOW + 1000)
    # and a new session from carol still opens
    carol2 = party("carol", 3)
    fresh = carol2.encrypt(victim.identity.public, msg(7, NOW + 5), rng, NOW)
    assert victim.decrypt(carol.identity.public.dh, fresh, NOW + 5).new_session


def test_a_peers_evicted_keys_raise_only_its_own_floor(rng: Rng) -> None:
    victim = party("victim", 1)
    payloads = []
    for i in range(MAX_EPHEMERALS_PER_PEER + 1):
        mallory = party("mallory", 2)
        payloads.append(mallory.encrypt(victim.identity.public, msg(i, NOW + i), rng, NOW))
    for payload in payloads:
        victim.decrypt(mallory.identity.public.dh, payload, NOW + 100)
    # the first key was evicted: its replay is caught by the floor, not the list
    record = victim._peers[mallory.identity.public.dh]
    record.sessions.clear()
    record.seen_payloads.clear()
    with pytest.raises(ReplayError):
        victim.decrypt(mallory.identity.public.dh, payloads[0], NOW + 200)


def test_old_session_opening_messages_leave_the_replay_list_with_the_window(rng: Rng) -> None:
    victim, alice = party("victim", 1), party("alice", 2)
    victim.decrypt(
        alice.identity.public.dh, alice.encrypt(victim.identity.public, msg(1), rng, NOW), NOW
    )
    later = NOW + REPLAY_WINDOW_MS + DAY_MS
    alice2 = party("alice", 2)
    fresh = alice2.encrypt(victim.identity.public, msg(2, later), rng, later)
    victim.decrypt(alice.identity.public.dh, fresh, later)
    assert len(victim._peers[alice.identity.public.dh].ephemerals) == 1  # the old one aged out


# --- 2. a known peer's X25519 key with another signing key --------


def _same_dh_other_signing_key(genuine: E2EState) -> E2EState:
    other = keys.generate_identity("zed", random.Random(77).randbytes(64))
    forged = keys.identity_from_secrets("zed", genuine.identity.dh_private, other.sign_seed)
    return E2EState.new(forged)


def test_an_initial_message_must_match_the_trusted_identity(rng: Rng) -> None:
    bob, zed = party("bob", 1), party("zed", 2)
    impostor = _same_dh_other_signing_key(zed)
    zed_key = zed.identity.public
    forged = impostor.encrypt(bob.identity.public, msg(1), rng, NOW)
    before = bob.serialize()
    with pytest.raises(PeerKeyChangedError):
        bob.decrypt(zed_key.dh, forged, NOW, trusted=zed_key)
    assert bob.serialize() == before
    genuine = zed.encrypt(bob.identity.public, msg(2), rng, NOW)
    got = bob.decrypt(zed_key.dh, genuine, NOW, trusted=zed_key)
    assert got.sender.same_keys(zed_key) and got.content.text == "msg 2"


def test_the_genuine_peer_is_never_locked_out_by_an_earlier_impostor(rng: Rng) -> None:
    bob, zed = party("bob", 1), party("zed", 2)
    impostor = _same_dh_other_signing_key(zed)
    zed_key = zed.identity.public
    # bob did not know zed yet: the impostor's message is accepted as an unverified sender
    bob.decrypt(zed_key.dh, impostor.encrypt(bob.identity.public, msg(1), rng, NOW), NOW)
    # then bob trusts zed's .pub: zed's messages open and replace the impostor's record
    got = bob.decrypt(
        zed_key.dh, zed.encrypt(bob.identity.public, msg(2), rng, NOW), NOW, trusted=zed_key
    )
    assert got.sender.same_keys(zed_key)
    reply = bob.encrypt(zed_key, msg(3), rng, NOW)
    assert zed.decrypt(bob.identity.public.dh, reply, NOW).content.text == "msg 3"
    with pytest.raises(PeerKeyChangedError):  # the impostor is refused from now on
        bob.decrypt(
            zed_key.dh,
            impostor.encrypt(bob.identity.public, msg(4), rng, NOW),
            NOW,
            trusted=zed_key,
        )


# --- 3. groups are bound to their member lists --------


def _seal_raw(sender: E2EState, recipient: E2EState, record: bytes, rng: Rng) -> bytes:
    """Seal a content record below the facade (how a malicious member would)."""
    sender.encrypt(recipient.identity.public, msg(0), rng, NOW)
    session = sender._peers[recipient.identity.public.dh].sessions[0]
    prefix = session.initial or envelope.encode_prefix(None)
    return prefix + ratchet.encrypt(session.state, record, session.ad + prefix, rng)


def test_a_non_member_cannot_post_into_a_group_by_its_id(rng: Rng) -> None:
    a, b, c, m = party("a", 1), party("b", 2), party("c", 3), party("m", 4)
    group = Group.of(tuple(p.identity.public.dh for p in (a, b, c)))
    # m lists itself and copies the group's id: the id no longer matches the list
    with_m = Group.of(tuple(p.identity.public.dh for p in (a, b, m)))
    record = envelope.unpad(envelope.encode_content(msg(5, group=with_m)))
    forged = envelope.pad(record.replace(with_m.group_id, group.group_id))
    payload = _seal_raw(m, b, forged, rng)
    b.decrypt(m.identity.public.dh, _seal_raw(m, b, envelope.encode_content(msg(1)), rng), NOW)
    with pytest.raises(SessionError, match="does not match"):
        b.decrypt(m.identity.public.dh, payload, NOW)
    # listing the real members without itself: refused as not naming its sender
    record = envelope.encode_content(msg(6, group=group))
    with pytest.raises(SessionError, match="sender"):
        b.decrypt(m.identity.public.dh, _seal_raw(m, b, record, rng), NOW)


# --- 13.4: the content's msg_id is the relay frame's --------


def test_the_relay_frames_id_must_equal_the_contents(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    payload = alice.encrypt(bob.identity.public, msg(1), rng, NOW)
    before = bob.serialize()
    with pytest.raises(SessionError, match="differs"):
        bob.decrypt(alice.identity.public.dh, payload, NOW, msg_id=bytes(16))
    assert bob.serialize() == before
    got = bob.decrypt(alice.identity.public.dh, payload, NOW, msg_id=msg(1).msg_id)
    assert got.content.msg_id == msg(1).msg_id


# --- 13. forged headers cost bounded work --------


def _forged_normal(session_ad: bytes, ratchet_key: bytes, pn: int, n: int) -> bytes:
    header = struct.pack(">B32sII", ratchet.RATCHET_VERSION, ratchet_key, pn, n)
    body = bytes(envelope.PAD_BUCKETS[0] + ratchet.TAG_SIZE)
    return envelope.encode_prefix(None) + header + bytes(ratchet.NONCE_SIZE) + body


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"kdf_ck": 0, "x25519": 0}
    real_kdf, real_dh = ratchet.kdf_ck, ratchet.dh.x25519

    def kdf(chain: bytes) -> tuple[bytes, bytes]:
        counts["kdf_ck"] += 1
        return real_kdf(chain)

    def x25519(private: bytes, public: bytes) -> bytes:
        counts["x25519"] += 1
        return real_dh(private, public)

    monkeypatch.setattr(ratchet, "kdf_ck", kdf)
    monkeypatch.setattr(ratchet.dh, "x25519", x25519)
    return counts


def _talking(rng: Rng) -> tuple[E2EState, E2EState]:
    alice, bob = party("alice", 1), party("bob", 2)
    spk, opks = bob.make_prekeys(rng, NOW, one_time=1)
    first = alice.encrypt(bob.identity.public, msg(1), rng, NOW, parse_bundle(spk, opks[0]))
    bob.decrypt(alice.identity.public.dh, first, NOW)
    alice.decrypt(bob.identity.public.dh, bob.encrypt(alice.identity.public, msg(2), rng, NOW), NOW)
    return alice, bob


def test_forged_new_ratchet_keys_cost_no_dh_where_none_can_come(
    rng: Rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = _talking(rng)
    # alice just stepped on bob's key and has not sent since: no new key from bob can come
    counts = _count_calls(monkeypatch)
    for i in range(50):
        forged = _forged_normal(b"", bytes([9]) * 32, 999, 999)
        with pytest.raises(AuthenticationError):
            alice.decrypt(bob.identity.public.dh, forged, NOW + i)
    assert counts == {"kdf_ck": 0, "x25519": 0}


def test_forged_headers_are_charged_to_the_senders_budget(
    rng: Rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = _talking(rng)
    alice.encrypt(bob.identity.public, msg(3), rng, NOW)  # now a new key from bob may come
    counts = _count_calls(monkeypatch)
    refused = 0
    for _ in range(200):  # all at the same instant: no refill
        forged = _forged_normal(b"", bytes([9]) * 32, 999, 999)
        try:
            alice.decrypt(bob.identity.public.dh, forged, NOW)
        except AuthenticationError:
            pass
        except SessionError:
            refused += 1
    assert refused > 150
    assert counts["kdf_ck"] <= WORK_BURST  # every derivation was paid for first
    # an honest message from someone else is not affected; bob's own after a second is
    carol = party("carol", 3)
    payload = carol.encrypt(alice.identity.public, msg(9), rng, NOW)
    assert alice.decrypt(carol.identity.public.dh, payload, NOW).content.text == "msg 9"
    honest = bob.encrypt(alice.identity.public, msg(4), rng, NOW)
    assert alice.decrypt(bob.identity.public.dh, honest, NOW + 5000).content.text == "msg 4"


def test_only_the_matching_session_is_tried(rng: Rng, monkeypatch: pytest.MonkeyPatch) -> None:
    alice, bob = _talking(rng)
    for seed in (5, 6, 7):  # three more sessions alice started with bob's key, never answered
        other = party("alice", 1)
        other._peers = alice._peers  # share records: sessions pile up on the same peer
        e2e_state.E2EState.encrypt(other, bob.identity.public, msg(seed), rng, NOW)
    reply = bob.encrypt(alice.identity.public, msg(8), rng, NOW)
    counts = _count_calls(monkeypatch)
    assert alice.decrypt(bob.identity.public.dh, reply, NOW).content.text == "msg 8"
    assert counts["x25519"] == 0 and counts["kdf_ck"] == 1


# --- unknown senders cannot grow the state without bound --------


def test_unknown_senders_are_evicted_but_pinned_peers_stay(
    rng: Rng, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(e2e_state, "MAX_UNPINNED_PEERS", 5)
    victim, friend = party("victim", 1), party("friend", 2)
    victim.encrypt(friend.identity.public, msg(1), rng, NOW)  # we wrote to it: pinned
    strangers = [party(f"s{i}", 100 + i) for i in range(12)]
    for s in strangers:
        payload = s.encrypt(victim.identity.public, msg(2), rng, NOW)
        victim.decrypt(s.identity.public.dh, payload, NOW)
    changes = victim.take_changes()
    kept = set(victim._peers)
    assert friend.identity.public.dh in kept and len(kept) == 6
    assert {s.identity.public.dh for s in strangers[-5:]} <= kept  # the most recent stay
    assert changes.deleted == {s.identity.public.dh for s in strangers[:7]}
    reloaded = E2EState.load(victim.identity, changes.core or b"", changes.peers.items())
    assert set(reloaded._peers) == kept


# --- the no-prekey mode is reported to the recipient --------


def test_a_no_prekey_first_message_is_flagged(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    spk, opks = bob.make_prekeys(rng, NOW, one_time=1)
    assert bob.has_prekeys
    weak = alice.encrypt(bob.identity.public, msg(1), rng, NOW)  # no bundle: fallback
    got = bob.decrypt(alice.identity.public.dh, weak, NOW)
    assert got.new_session and got.fallback
    carol = party("carol", 3)
    strong = carol.encrypt(bob.identity.public, msg(2), rng, NOW, parse_bundle(spk, opks[0]))
    got = bob.decrypt(carol.identity.public.dh, strong, NOW)
    assert got.new_session and not got.fallback


# --- version 1 rows still load --------


def test_version_1_rows_load_and_are_rewritten(rng: Rng) -> None:
    alice, bob = party("alice", 1), party("bob", 2)
    bob.decrypt(alice.identity.public.dh, alice.encrypt(bob.identity.public, msg(1), rng, NOW), NOW)
    changes = bob.take_changes()
    assert changes.core is not None
    row = changes.peers[alice.identity.public.dh]
    # version 1: no flags byte after the name, no ephemeral list and floor at the end
    name_len = row[6 + 64]
    flags_at = 6 + 64 + 1 + name_len
    tail = 2 + 1 * (32 + 8) + 8
    v1_peer = b"SCE2P\x01" + row[6:flags_at] + row[flags_at + 1 : -tail]
    core = changes.core
    v1_core = b"SCE2C\x01" + core[6:42] + struct.pack(">Q", 2**63) + core[42:]
    v1_core += struct.pack(">I", 1) + bytes(32) + struct.pack(">Q", 2**64 - 1)
    loaded = E2EState.load(bob.identity, v1_core, [(alice.identity.public.dh, v1_peer)])
    again = loaded.take_changes()
    assert again.core is not None and set(again.peers) == {alice.identity.public.dh}
    record = loaded._peers[alice.identity.public.dh]
    assert record.pinned and record.floor_ms == -1 and not record.ephemerals
    reply = loaded.encrypt(alice.identity.public, msg(2), rng, NOW)
    assert alice.decrypt(bob.identity.public.dh, reply, NOW).content.text == "msg 2"
