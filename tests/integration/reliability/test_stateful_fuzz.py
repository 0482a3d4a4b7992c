"""Stateful fuzzing (hypothesis ``RuleBasedStateMachine``) of every byte-level protocol layer.

* the frame codec: frames queued, fed to the incremental decoder in arbitrary chunks,
  garbage fed to fresh decoders;
* the Noise link: both ends in memory, records delivered in arbitrary chunks and
  interleavings, with bit flips and replays injected;
* the Double Ratchet: two parties, send / deliver in any order / drop / duplicate /
  tamper / restart from serialised state;
* the envelope and E2E layer: three parties, pairwise and group messages, tampering,
  reflection and a relay lying about the sender.

The invariant everywhere: honest bytes come out exactly once and unchanged, forged
bytes raise our own error type (never another exception) and change no state.
"""

from __future__ import annotations

import hashlib
import random

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)
from securechat.core import dh, envelope, noise, ratchet, wire
from securechat.core.e2e import Content, E2EState, Group, parse_bundle
from securechat.core.keys import generate_identity
from securechat.errors import AuthenticationError, FrameError, SecureChatError, SessionError

from strategies import frames_st

SETTINGS = settings(
    max_examples=40,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _rng(seed: int) -> random.Random:
    return random.Random(seed)


# --- frame codec ------------------------------------------------------------------------------


class FrameStream(RuleBasedStateMachine):
    """Any chunking of a valid stream yields exactly the frames sent, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = wire.FrameDecoder()
        self.pending = bytearray()
        self.expected: list[wire.Frame] = []
        self.got: list[wire.Frame] = []

    @rule(frame=frames_st)
    def queue(self, frame: wire.Frame) -> None:
        self.pending += wire.encode(frame)
        self.expected.append(frame)

    @rule(size=st.integers(1, 700))
    def feed(self, size: int) -> None:
        chunk, self.pending[:size] = bytes(self.pending[:size]), b""
        self.got += self.decoder.feed(chunk)

    @rule()
    def feed_all(self) -> None:
        self.got += self.decoder.feed(bytes(self.pending))
        self.pending.clear()
        assert self.got == self.expected
        assert self.decoder.buffered == 0

    @rule(garbage=st.binary(max_size=300), size=st.integers(1, 64))
    def garbage_to_fresh_decoder(self, garbage: bytes, size: int) -> None:
        other = wire.FrameDecoder()
        try:
            for pos in range(0, len(garbage), size):
                for frame in other.feed(garbage[pos : pos + size]):
                    assert wire.decode(wire.encode(frame)) == frame
        except FrameError:
            assert other.failed
        assert other.buffered <= wire.MAX_FRAME + wire.LENGTH_SIZE

    @invariant()
    def honest_prefix(self) -> None:
        assert self.got == self.expected[: len(self.got)]
        assert not self.decoder.failed
        assert self.decoder.buffered <= wire.MAX_FRAME + wire.LENGTH_SIZE


# --- Noise link -------------------------------------------------------------------------------


class _Direction:
    """Bytes in flight one way, and what the receiving end must (not) produce."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.records: list[bytes] = []  # every record ever queued (for replays)
        self.offset = 0  # bytes delivered so far
        self.sent_plain = bytearray()
        self.got_plain = bytearray()
        self.bad_from: int | None = None  # absolute offset of the first forged byte
        self.must_fail_by: int | None = None  # a whole forged record ends here
        self.dead = False

    def queue(self, record: bytes, plain: bytes = b"") -> None:
        self.wire += record
        self.records.append(record)
        self.sent_plain += plain


class NoiseLink(RuleBasedStateMachine):
    """Noise XX both ends, arbitrary chunking/interleaving, bit flips and replays."""

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        rnd = _rng(seed)
        self.ends = {
            "i": noise.NoiseConnection(
                initiator=True, static_private=rnd.randbytes(32), rng=rnd.randbytes
            ),
            "r": noise.NoiseConnection(
                initiator=False, static_private=rnd.randbytes(32), rng=rnd.randbytes
            ),
        }
        # direction "i" carries bytes from the initiator to the responder
        self.dirs = {"i": _Direction(), "r": _Direction()}
        self.dirs["i"].queue(self.ends["i"].initiate())

    @rule(way=st.sampled_from("ir"), size=st.integers(1, 200))
    def deliver(self, way: str, size: int) -> None:
        d = self.dirs[way]
        if d.dead or not d.wire:
            return
        receiver = self.ends["r" if way == "i" else "i"]
        chunk = bytes(d.wire[:size])
        del d.wire[:size]
        start = d.offset
        d.offset += len(chunk)
        try:
            _, plain, reply = receiver.receive_data(chunk)
        except SecureChatError:
            # a forged handshake byte one way can make the *other* end fail (hash mismatch)
            assert any(
                x.bad_from is not None and x.bad_from < x.offset for x in self.dirs.values()
            ), "honest bytes refused"
            assert receiver.failed
            d.dead = True
            return
        d.got_plain += plain
        if reply:
            self.dirs["r" if way == "i" else "i"].queue(reply)
        assert d.must_fail_by is None or d.must_fail_by > d.offset or start >= d.must_fail_by

    @rule(way=st.sampled_from("ir"), data=st.binary(min_size=1, max_size=300))
    def send(self, way: str, data: bytes) -> None:
        sender = self.ends[way]
        if not sender.complete:
            return
        self.dirs[way].queue(sender.send(data), data)

    @rule(way=st.sampled_from("ir"), pos=st.integers(0, 10_000), bit=st.integers(0, 7))
    def flip(self, way: str, pos: int, bit: int) -> None:
        d = self.dirs[way]
        if not d.wire:
            return
        i = pos % len(d.wire)
        d.wire[i] ^= 1 << bit
        at = d.offset + i
        d.bad_from = at if d.bad_from is None else min(d.bad_from, at)
        if d.must_fail_by is not None and at < d.must_fail_by:
            d.must_fail_by = None  # the replayed record itself was altered (maybe its length)

    @rule(way=st.sampled_from("ir"), which=st.integers(0, 1000))
    def replay(self, way: str, which: int) -> None:
        d = self.dirs[way]
        if not d.records or d.dead:
            return
        record = d.records[which % len(d.records)]
        at = d.offset + len(d.wire)
        d.wire += record
        d.bad_from = at if d.bad_from is None else min(d.bad_from, at)
        if d.must_fail_by is None and d.bad_from == at:
            d.must_fail_by = at + len(record)

    @invariant()
    def plaintext_is_honest_prefix(self) -> None:
        for d in self.dirs.values():
            assert d.got_plain == d.sent_plain[: len(d.got_plain)]
            if d.must_fail_by is not None and d.offset >= d.must_fail_by:
                assert d.dead, "a replayed record was accepted"


# --- Double Ratchet ---------------------------------------------------------------------------

AD = b"securechat stateful ratchet"


class RatchetPair(RuleBasedStateMachine):
    """Two parties; deliveries in any order within the skip bounds; forgeries change nothing."""

    inflight = Bundle("inflight")

    @initialize(seed=st.integers(0, 2**32 - 1))
    def start(self, seed: int) -> None:
        rnd = _rng(seed)
        self.rng = rnd.randbytes
        shared, bob_priv = rnd.randbytes(32), rnd.randbytes(32)
        self.states = [
            ratchet.init_initiator(shared, dh.public_key(bob_priv), self.rng),
            ratchet.init_responder(shared, bob_priv, dh.public_key(bob_priv)),
        ]
        self.delivered: set[int] = set()
        self.sent = 0
        self.bob_heard = False  # bob cannot send before receiving (no send chain yet)

    @rule(target=inflight, who=st.integers(0, 1), text=st.binary(max_size=64))
    def send(self, who: int, text: bytes) -> tuple[int, int, bytes, bytes]:
        if who == 1 and not self.bob_heard:
            who = 0
        self.sent += 1
        body = self.sent.to_bytes(4, "big") + text
        return (self.sent, 1 - who, body, ratchet.encrypt(self.states[who], body, AD, self.rng))

    @rule(msg=inflight)
    def deliver(self, msg: tuple[int, int, bytes, bytes]) -> None:
        n, to, body, message = msg
        state = self.states[to]
        before = ratchet.serialize(state)
        if n in self.delivered:
            try:
                ratchet.decrypt(state, message, AD)
            except AuthenticationError:
                assert ratchet.serialize(state) == before
                return
            raise AssertionError("a duplicate was opened twice")
        plaintext, update = ratchet.decrypt(state, message, AD)
        assert plaintext == body
        ratchet.apply(state, update)
        self.delivered.add(n)
        if to == 1:
            self.bob_heard = True

    @rule(msg=consumes(inflight))
    def drop(self, msg: tuple[int, int, bytes, bytes]) -> None:
        """The network loses it (the receiver keeps its skipped key, bounded)."""

    @rule(msg=inflight, pos=st.integers(0, 10_000), bit=st.integers(0, 7))
    def tamper(self, msg: tuple[int, int, bytes, bytes], pos: int, bit: int) -> None:
        _, to, _, message = msg
        forged = bytearray(message)
        forged[pos % len(forged)] ^= 1 << bit
        state = self.states[to]
        before = ratchet.serialize(state)
        try:
            ratchet.decrypt(state, bytes(forged), AD)
        except (AuthenticationError, SessionError):
            pass
        else:
            raise AssertionError("a tampered message opened")
        assert ratchet.serialize(state) == before

    @rule(who=st.integers(0, 1))
    def restart(self, who: int) -> None:
        blob = ratchet.serialize(self.states[who])
        self.states[who] = ratchet.deserialize(blob)
        assert ratchet.serialize(self.states[who]) == blob

    @invariant()
    def bounded(self) -> None:
        for state in getattr(self, "states", []):
            assert len(state.skipped) <= ratchet.MAX_SKIPPED_KEYS


# --- envelope / E2E with three parties --------------------------------------------------------

NAMES = ("alice", "bob", "carol")


class Envelopes(RuleBasedStateMachine):
    """Pairwise and group envelopes among three parties through a lying relay."""

    inflight = Bundle("envelopes")

    @initialize(seed=st.integers(0, 2**16))
    def start(self, seed: int) -> None:
        self.rnd = _rng(seed)
        ids = [generate_identity(n, hashlib.sha512(f"{seed}/{n}".encode()).digest()) for n in NAMES]
        self.parties = [E2EState.new(i) for i in ids]
        self.prekeys = []
        for p in self.parties:
            signed, otks = p.make_prekeys(self.rnd.randbytes, 0, one_time=4)
            self.prekeys.append([parse_bundle(signed, o) for o in otks])
        members = tuple(sorted(i.public.dh for i in ids))
        self.group = Group.of(members)
        self.shown: set[tuple[bytes, int]] = set()
        self.clock = 1

    def _seal(self, sender: int, to: int, content: Content) -> bytes:
        p, peer = self.parties[sender], self.parties[to].identity.public
        bundle = None if p.has_session(peer) or not self.prekeys[to] else self.prekeys[to].pop()
        return p.encrypt(peer, content, self.rnd.randbytes, self.clock, bundle)

    @rule(
        target=inflight, sender=st.integers(0, 2), to=st.integers(1, 2), text=st.text(max_size=40)
    )
    def send_direct(self, sender: int, to: int, text: str) -> tuple[int, int, Content, bytes]:
        to = (sender + to) % 3
        self.clock += 1
        content = Content(self.rnd.randbytes(16), self.clock, text)
        return (sender, to, content, self._seal(sender, to, content))

    @rule(target=inflight, sender=st.integers(0, 2), text=st.text(max_size=40))
    def send_group(self, sender: int, text: str) -> object:
        """Fan-out: one copy per other member, each sealed in its pairwise session."""
        self.clock += 1
        content = Content(self.rnd.randbytes(16), self.clock, text, self.group)
        return multiple(
            *[
                (sender, to, content, self._seal(sender, to, content))
                for to in ((sender + 1) % 3, (sender + 2) % 3)
            ]
        )

    @rule(msg=inflight)
    def deliver(self, msg: tuple[int, int, Content, bytes]) -> None:
        sender, to, content, payload = msg
        receiver = self.parties[to]
        got = receiver.decrypt(self.parties[sender].identity.public.dh, payload, self.clock)
        key = (content.msg_id, to)
        assert got.duplicate == (key in self.shown)
        if not got.duplicate:
            assert got.content == content
            assert got.sender.same_keys(self.parties[sender].identity.public)
            self.shown.add(key)

    def _expect_rejected(self, to: int, claimed: int, payload: bytes) -> None:
        receiver = self.parties[to]
        before = receiver.serialize()
        try:
            got = receiver.decrypt(self.parties[claimed].identity.public.dh, payload, self.clock)
        except (AuthenticationError, SessionError):
            assert receiver.serialize() == before
            return
        # the only acceptable success is a recognised duplicate of an honest message
        assert got.duplicate, "a forged or misattributed payload was shown"

    @rule(msg=inflight, pos=st.integers(0, 100_000), bit=st.integers(0, 7))
    def flip(self, msg: tuple[int, int, Content, bytes], pos: int, bit: int) -> None:
        sender, to, _, payload = msg
        forged = bytearray(payload)
        forged[pos % len(forged)] ^= 1 << bit
        self._expect_rejected(to, sender, bytes(forged))

    @rule(msg=inflight, cut=st.integers(1, 200))
    def truncate(self, msg: tuple[int, int, Content, bytes], cut: int) -> None:
        sender, to, _, payload = msg
        self._expect_rejected(to, sender, payload[: max(len(payload) - cut, 0)])

    @rule(msg=inflight, liar=st.integers(1, 2))
    def wrong_sender(self, msg: tuple[int, int, Content, bytes], liar: int) -> None:
        """The relay claims someone else sent it."""
        sender, to, _, payload = msg
        claimed = (sender + liar) % 3
        if claimed != to:
            self._expect_rejected(to, claimed, payload)

    @rule(msg=inflight)
    def reflect(self, msg: tuple[int, int, Content, bytes]) -> None:
        """The relay sends a message back to its own sender, as if from the recipient."""
        sender, to, _, payload = msg
        self._expect_rejected(sender, to, payload)

    @rule(who=st.integers(0, 2))
    def restart(self, who: int) -> None:
        p = self.parties[who]
        self.parties[who] = E2EState.deserialize(p.identity, p.serialize())

    @rule(text=st.text(max_size=60), grouped=st.booleans())
    def content_roundtrip(self, text: str, grouped: bool) -> None:
        content = Content(self.rnd.randbytes(16), self.clock, text, self.group if grouped else None)
        padded = envelope.encode_content(content)
        assert len(padded) in envelope.PAD_BUCKETS
        assert envelope.decode_content(padded) == content


TestFrameStream = FrameStream.TestCase
TestFrameStream.settings = SETTINGS
TestNoiseLink = NoiseLink.TestCase
TestNoiseLink.settings = SETTINGS
TestRatchetPair = RatchetPair.TestCase
TestRatchetPair.settings = SETTINGS
TestEnvelopes = Envelopes.TestCase
TestEnvelopes.settings = settings(SETTINGS, max_examples=20, stateful_step_count=30)
