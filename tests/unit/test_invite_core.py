"""The invite exchange in memory, both ends, no sockets (``securechat/invite``).

The relay in between is a list: every message is handed over as the relay would,
or changed as a malicious relay would (every byte of every message flipped, a
message reflected, dropped, reordered, or sent for another nameplate).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import pytest
from securechat.core import keys, wire
from securechat.core.invite import (
    CodeReady,
    InviteSession,
    PeerJoined,
    PeerVerified,
    State,
    parse_code,
    words,
)
from securechat.core.invite import session as sess
from securechat.errors import (
    DeliveryTimeoutError,
    InviteClosedError,
    InviteFailedError,
    ProtocolError,
    UsageError,
)

PLATE = 7


def rng(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return lambda n: bytes(r.getrandbits(8) for _ in range(n))


def identity(name: str, seed: int) -> keys.PublicIdentity:
    return keys.generate_identity(name, rng(seed)(keys.SEED_SIZE)).public


ALICE = identity("alice", 1)
BOB = identity("bob", 2)


class Pair:
    """An opener and a joiner, with every message the relay carried kept in order."""

    def __init__(self, code_typed: str | None = None, seed: int = 10) -> None:
        self.a = InviteSession.opener(ALICE, rng(seed))
        assert self.a.start() == [wire.InviteOpen()]
        events, out = self.a.receive(wire.InviteOpened(PLATE))
        assert out == [] and isinstance(events[0], CodeReady)
        self.code = events[0].code
        self.b = InviteSession.joiner(parse_code(code_typed or str(self.code)), BOB, rng(seed + 1))
        join, b_pake = self.b.start()
        assert join == wire.InviteJoin(PLATE if code_typed is None else self.b.nameplate)
        assert isinstance(b_pake, wire.InviteData)
        self.b_pake = b_pake


def run_honest() -> tuple[Pair, list[wire.InviteData]]:
    """The whole exchange; returns the four messages in the order they were sent."""
    p = Pair()
    events, a_out = p.a.receive(p.b_pake)
    assert events == [PeerJoined()] and len(a_out) == 2
    a_pake, a_id = a_out
    events, b_out = p.b.receive(a_pake)
    assert events == [] and len(b_out) == 1
    (b_id,) = b_out
    events, out = p.b.receive(a_id)
    assert events == [PeerVerified(ALICE)] and out == []
    events, out = p.a.receive(b_id)
    assert events == [PeerVerified(BOB)] and out == []
    return p, [p.b_pake, a_pake, a_id, b_id]  # type: ignore[list-item]


def test_right_code_both_sides_verify_each_other() -> None:
    p, messages = run_honest()
    assert p.a.state is p.b.state is State.DONE
    sizes = [len(m.payload) for m in messages]
    assert (
        sizes
        == [
            sess.PAKE_PAYLOAD_SIZE,
            sess.PAKE_PAYLOAD_SIZE,
            sess.IDENTITY_PAYLOAD_SIZE,
            sess.IDENTITY_PAYLOAD_SIZE,
        ]
        == [35, 35, 274, 274]
    )
    assert all(m.nameplate == PLATE for m in messages)


def test_the_relay_sees_the_same_sizes_whatever_the_names() -> None:
    """The public line is padded: the relay does not learn the length of a name."""
    long_name = identity("a" * keys.MAX_NAME, 3)
    s = InviteSession.joiner(parse_code("7-tiger-universe"), long_name, rng(4))
    assert len(s._own_plaintext) == sess.IDENTITY_PLAINTEXT_SIZE


def test_a_wrong_code_fails_on_both_sides_and_reveals_no_identity() -> None:
    p = Pair()
    other_odd = words.ODD_WORDS[(words.ODD_WORDS.index(p.code.odd) + 1) % 256]
    wrong = f"{PLATE}-{p.code.even}-{other_odd}"  # one word off: the wrong password
    q = Pair(code_typed=wrong)
    _, a_out = q.a.receive(q.b_pake)
    _, b_out = q.b.receive(a_out[0])
    with pytest.raises(InviteFailedError, match="wrong code, or someone tampered"):
        q.b.receive(a_out[1])
    with pytest.raises(InviteFailedError):
        q.a.receive(b_out[0])
    assert q.a.state is q.b.state is State.FAILED
    with pytest.raises(ProtocolError, match="already failed"):
        q.a.receive(b_out[0])  # one attempt per code


@pytest.mark.parametrize(
    "which", range(4), ids=["joiner-pake", "opener-pake", "opener-identity", "joiner-identity"]
)
def test_every_byte_of_every_message_flipped_fails(which: int) -> None:
    """Both sessions are copied just before message ``which``; once per byte, that byte is
    flipped and the exchange goes on honestly from there: nobody verifies anybody, and the
    side that gets the bad message (or the next one, for a PAKE message that still decodes
    to a point) fails."""
    snapshots = _snapshots()
    a, b, message = snapshots[which]
    assert _play(copy.deepcopy(a), copy.deepcopy(b), which, message)[0]  # untouched: verified
    for index in range(len(message.payload)):
        data = bytearray(message.payload)
        data[index] ^= 0x01 << (index % 8)
        tampered = wire.InviteData(PLATE, bytes(data))
        verified, failures = _play(copy.deepcopy(a), copy.deepcopy(b), which, tampered)
        assert verified == [] and failures >= 1, (which, index)


def _snapshots() -> list[tuple[InviteSession, InviteSession, wire.InviteData]]:
    """(opener, joiner, message) just before each of the four messages is delivered."""
    p = Pair()
    shots = [(copy.deepcopy(p.a), copy.deepcopy(p.b), p.b_pake)]
    _, (a_pake, a_id) = p.a.receive(p.b_pake)
    shots.append((copy.deepcopy(p.a), copy.deepcopy(p.b), a_pake))  # type: ignore[arg-type]
    _, (b_id,) = p.b.receive(a_pake)
    shots.append((copy.deepcopy(p.a), copy.deepcopy(p.b), a_id))  # type: ignore[arg-type]
    p.b.receive(a_id)
    shots.append((copy.deepcopy(p.a), copy.deepcopy(p.b), b_id))  # type: ignore[arg-type]
    return shots


def _play(a: InviteSession, b: InviteSession, step: int,
          message: wire.InviteData) -> tuple[list[PeerVerified], int]:  # fmt: skip
    """Deliver ``message`` as message ``step``, then the rest as the sessions produce them."""
    receivers = [a, b, b, a]  # joiner PAKE, opener PAKE, opener identity, joiner identity
    queue: dict[int, wire.Frame] = {step: message}
    verified: list[PeerVerified] = []
    failures = 0
    for n in range(step, 4):
        if n not in queue:
            continue  # an earlier failure: that message was never sent
        try:
            events, out = receivers[n].receive(queue[n])
        except InviteFailedError:
            failures += 1
            continue
        verified += [e for e in events if isinstance(e, PeerVerified)]
        if n == 0:
            queue[1], queue[2] = out
        elif n == 1:
            (queue[3],) = out
    return verified, failures


def test_a_reflected_pake_message_fails() -> None:
    p = Pair()
    _, a_out = p.a.receive(p.b_pake)
    with pytest.raises(InviteFailedError):
        p.a.receive(a_out[0])  # the opener's own PAKE message back, in KEYED: out of order
    q = Pair()
    with pytest.raises(InviteFailedError):
        q.b.receive(q.b_pake)  # the joiner's own PAKE message back


def test_a_reflected_identity_message_fails() -> None:
    p = Pair()
    _, a_out = p.a.receive(p.b_pake)
    with pytest.raises(InviteFailedError):
        p.a.receive(a_out[1])  # its own sealed line: the other direction's key


@pytest.mark.parametrize(
    "bad",
    [
        wire.InviteData(PLATE + 1, b"\x01\x01" + bytes(33)),  # another nameplate
        wire.InviteData(PLATE, b"\x02\x01" + bytes(33)),  # another version
        wire.InviteData(PLATE, b"\x01\x03" + bytes(33)),  # an unknown kind
        wire.InviteData(PLATE, b"\x01\x01" + bytes(32)),  # a short PAKE message
        wire.InviteData(PLATE, b"\x01\x01A" + bytes(32)),  # the wrong SPAKE2 side byte
        wire.InviteData(PLATE, b"\x01\x01S" + bytes(32)),  # not a group element (zero)
        wire.InviteData(PLATE, b"\x01\x02" + bytes(272)),  # an identity before the PAKE
        wire.InviteOpened(PLATE),  # a second nameplate
    ],
)
def test_anything_out_of_place_fails_the_opener_for_good(bad: wire.Frame) -> None:
    p = Pair()
    with pytest.raises(InviteFailedError):
        p.a.receive(bad)
    assert p.a.state is State.FAILED


def test_a_low_order_point_as_pake_message_fails() -> None:
    # An Ed25519 point of order 8 (Wycheproof/RFC 8032 lists of small-order points):
    # spake2 refuses elements outside the prime-order subgroup.
    small_order = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa")
    p = Pair()
    with pytest.raises(InviteFailedError):
        p.a.receive(wire.InviteData(PLATE, b"\x01\x01S" + small_order))


@pytest.mark.parametrize(
    ("reason", "error", "text"),
    [
        (wire.INVITE_NO_SUCH, InviteClosedError, "no open invite 7"),
        (wire.INVITE_USED, InviteClosedError, "already used"),
        (wire.INVITE_PEER_LEFT, InviteClosedError, "left"),
        (wire.INVITE_EXPIRED, DeliveryTimeoutError, "expired"),
        (wire.INVITE_VIOLATION, InviteClosedError, "broke the protocol"),
    ],
)
def test_the_relays_close_reasons_become_clear_errors(
    reason: int, error: type[Exception], text: str
) -> None:
    p = Pair()
    with pytest.raises(error, match=text):
        p.b.receive(wire.InviteClosed(PLATE, reason))
    assert p.b.state is State.FAILED


def test_a_refused_open_says_why() -> None:
    a = InviteSession.opener(ALICE, rng(1))
    a.start()
    with pytest.raises(InviteClosedError, match="too many invites"):
        a.receive(wire.InviteClosed(0, wire.INVITE_TOO_MANY))


def test_the_direction_keys_differ_and_bind_the_nameplate() -> None:
    k = bytes(range(32))
    ab = sess.direction_key(k, sess.LABEL_OPENER_TO_JOINER, 7)
    assert ab != sess.direction_key(k, sess.LABEL_JOINER_TO_OPENER, 7)
    assert ab != sess.direction_key(k, sess.LABEL_OPENER_TO_JOINER, 8)


# --- codes ----------------------------------------------------------------------------------------


def test_word_lists_are_the_pgp_lists_and_disjoint() -> None:
    assert len(words.EVEN_WORDS) == len(words.ODD_WORDS) == 256
    assert not set(words.EVEN_WORDS) & set(words.ODD_WORDS)
    assert words.words_digest() == words.WORDS_SHA256
    assert (words.EVEN_WORDS[0], words.ODD_WORDS[0]) == ("aardvark", "adroitness")
    assert (words.EVEN_WORDS[255], words.ODD_WORDS[255]) == ("zulu", "yucatan")


def test_codes_are_normalised_and_case_insensitive() -> None:
    code = parse_code("  7 Tiger-UNIVERSE ")
    assert str(code) == "7-tiger-universe" and code.password == b"7-tiger-universe"
    assert words.make_code(12, lambda n: b"\x00\xff") == parse_code("12-aardvark-yucatan")


@pytest.mark.parametrize(
    ("typed", "says"),
    [
        ("tiger-universe", "expected NUMBER-WORD-WORD"),
        ("0-tiger-universe", "starts with the invite's number"),
        ("07-tiger-universe", "starts with the invite's number"),
        ("4294967296-tiger-universe", "starts with the invite's number"),
        ("7-universe-tiger", "wrong order: did you mean 7-tiger-universe"),
        ("7-tigr-universe", "did you mean 'tiger'"),
        ("7-tiger-univers", "did you mean 'universe'"),
        ("7-tiger-tiger", "not a possible second word"),
    ],
)
def test_a_mistyped_code_is_refused_before_anything_is_sent(typed: str, says: str) -> None:
    with pytest.raises(UsageError, match=says):
        parse_code(typed)
