"""Frame codec: exact bytes per type, incremental feeding, canonical-form rejections."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securechat.core import wire
from securechat.core.wire import encoder as wire_encode
from securechat.errors import FrameError

from strategies import frames_st

I = bytes(range(16))  # noqa: E741 - a msg id
K = bytes(range(32, 64))  # a key / mailbox
M = bytes(range(64, 96))
OTK = bytes(range(100, 136))


def frame_bytes(ftype: int, body: bytes) -> bytes:
    return struct.pack(">IBB", len(body) + 2, 1, ftype) + body


TABLE: list[tuple[wire.Frame, bytes]] = [
    (wire.Send(I, M, b"hi"), frame_bytes(0x10, I + M + b"hi")),
    (
        wire.SendMulti(I, ((K, b"a"), (M, b"bc"))),
        frame_bytes(0x11, I + b"\x00\x02" + K + b"\0\0\0\x01a" + M + b"\0\0\0\x02bc"),
    ),
    (wire.Accepted(I, 1), frame_bytes(0x12, I + b"\x01")),
    (wire.Accepted(I, 2), frame_bytes(0x12, I + b"\x02")),
    (wire.Delivered(I, M), frame_bytes(0x13, I + M)),
    (
        wire.Deliver(I, K, 0x0102030405060708, b"xyz"),
        frame_bytes(0x20, I + K + bytes(range(1, 9)) + b"xyz"),
    ),
    (wire.Ack(((K, I),)), frame_bytes(0x21, b"\x00\x01" + K + I)),
    (wire.Synced(), frame_bytes(0x22, b"")),
    (wire.PublishPrekeys(b"spk", (OTK,)), frame_bytes(0x30, b"\0\x03spk\0\x01" + OTK)),
    (wire.PublishPrekeys(b"", ()), frame_bytes(0x30, b"\0\0\0\0")),
    (wire.FetchPrekeys(K), frame_bytes(0x31, K)),
    (wire.Prekeys(K, b"s", OTK), frame_bytes(0x32, K + b"\0\x01s\x01" + OTK)),
    (wire.Prekeys(K, b"", None), frame_bytes(0x32, K + b"\0\0\0")),
    (wire.PrekeyCount(7), frame_bytes(0x33, b"\0\0\0\x07")),
    (
        wire.Error(wire.QUOTA_EXCEEDED, I, "full é"),
        frame_bytes(0x40, b"\0\x03" + I + b"\0\x07" + "full é".encode()),
    ),
    (wire.Ping(5), frame_bytes(0x50, (5).to_bytes(8, "big"))),
    (wire.Pong(2**64 - 1), frame_bytes(0x51, b"\xff" * 8)),
    (wire.PresenceSubscribe((K, M)), frame_bytes(0x60, b"\0\x02" + K + M)),
    (wire.PresenceSubscribe(()), frame_bytes(0x60, b"\0\0")),
    (wire.Presence(K, True), frame_bytes(0x61, K + b"\x01")),
    (wire.Presence(K, False), frame_bytes(0x61, K + b"\x00")),
    # protocol 1.1, the invite rendezvous (more in test_invite_wire.py)
    (wire.InviteOpen(), frame_bytes(0x70, b"")),
    (wire.InviteOpened(7), frame_bytes(0x71, b"\0\0\0\x07")),
    (wire.InviteJoin(2**32 - 1), frame_bytes(0x72, b"\xff" * 4)),
    (wire.InviteData(7, b"pake"), frame_bytes(0x73, b"\0\0\0\x07pake")),
    (wire.InviteClosed(7, wire.INVITE_USED), frame_bytes(0x74, b"\0\0\0\x07\x02")),
    (wire.InviteClosed(0, wire.INVITE_TOO_MANY), frame_bytes(0x74, b"\0\0\0\0\x05")),
]


def test_table_covers_every_type() -> None:
    assert {type(f) for f, _ in TABLE} == set(wire_encode._ENCODERS)


@pytest.mark.parametrize(("frame", "data"), TABLE)
def test_encode_exact_bytes(frame: wire.Frame, data: bytes) -> None:
    assert wire.encode(frame) == data
    assert wire.decode(data) == frame


def test_whole_table_one_byte_at_a_time() -> None:
    stream = b"".join(d for _, d in TABLE)
    dec = wire.FrameDecoder()
    out: list[wire.Frame] = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert out == [f for f, _ in TABLE]
    assert dec.buffered == 0


def test_whole_table_in_one_chunk() -> None:
    stream = b"".join(d for _, d in TABLE)
    assert wire.FrameDecoder().feed(stream) == [f for f, _ in TABLE]


def test_encode_deliver_matches_dataclass() -> None:
    f = wire.Deliver(I, K, 123456, b"payload")
    assert wire.encode_deliver(I, K, 123456, b"payload") == wire.encode(f)


def test_mailbox_address_is_keyed_blake2b() -> None:
    import hashlib

    expected = hashlib.blake2b(K, digest_size=32, key=b"securechat/v1/mailbox").digest()
    assert wire.mailbox_address(K) == expected
    assert wire.mailbox_address(M) != expected
    with pytest.raises(FrameError):
        wire.mailbox_address(K[:31])


# --- rejections ------------------------------------------------------------------------------


def test_oversized_length_rejected_after_four_bytes() -> None:
    dec = wire.FrameDecoder()
    assert dec.feed(b"\x00\x10") == []
    with pytest.raises(FrameError, match="exceeds"):
        dec.feed(struct.pack(">I", wire.MAX_FRAME + 1)[2:])
    assert dec.failed
    assert dec.buffered <= 4
    with pytest.raises(FrameError):
        dec.feed(b"")


def test_max_length_is_buffered_not_rejected() -> None:
    dec = wire.FrameDecoder()
    assert dec.feed(struct.pack(">I", wire.MAX_FRAME) + b"\x01\x10") == []
    assert not dec.failed


@pytest.mark.parametrize("length", [0, 1])
def test_length_below_header_rejected(length: int) -> None:
    with pytest.raises(FrameError):
        wire.FrameDecoder().feed(struct.pack(">I", length))


BAD_BODIES = [
    ("unknown type", frame_bytes(0x7F, b"")),
    ("unknown version", struct.pack(">IBB", 2, 2, 0x22)),
    ("trailing Synced", frame_bytes(0x22, b"\0")),
    ("short Send", frame_bytes(0x10, I + M)),
    ("short id Accepted", frame_bytes(0x12, I[:15] + b"\x01")),
    ("bad status", frame_bytes(0x12, I + b"\x03")),
    ("trailing Delivered", frame_bytes(0x13, I + M + b"\0")),
    ("empty Deliver payload", frame_bytes(0x20, I + K + bytes(8))),
    ("Ack zero", frame_bytes(0x21, b"\0\0")),
    ("Ack count too big", frame_bytes(0x21, b"\0\x02" + K + I)),
    ("Ack trailing", frame_bytes(0x21, b"\0\x01" + K + I + b"\0")),
    ("SendMulti zero", frame_bytes(0x11, I + b"\0\0")),
    ("SendMulti trailing", frame_bytes(0x11, I + b"\0\x01" + K + b"\0\0\0\x01a" + b"x")),
    ("SendMulti count lies", frame_bytes(0x11, I + b"\0\x02" + K + b"\0\0\0\x01a")),
    ("SendMulti len lies", frame_bytes(0x11, I + b"\0\x01" + K + b"\0\0\0\x05a")),
    ("SendMulti zero len", frame_bytes(0x11, I + b"\0\x01" + K + b"\0\0\0\0")),
    ("SendMulti duplicate", frame_bytes(0x11, I + b"\0\x02" + (K + b"\0\0\0\x01a") * 2)),
    ("Publish spk too long", frame_bytes(0x30, b"\x04\x01" + bytes(1025) + b"\0\0")),
    ("Publish otk size", frame_bytes(0x30, b"\0\0\0\x01" + OTK[:35])),
    ("Publish too many", frame_bytes(0x30, b"\0\0\0\x65" + OTK * 101)),
    ("Fetch short", frame_bytes(0x31, K[:31])),
    ("Prekeys has_otk 2", frame_bytes(0x32, K + b"\0\0\x02")),
    ("Prekeys missing otk", frame_bytes(0x32, K + b"\0\0\x01")),
    ("PrekeyCount long", frame_bytes(0x33, bytes(5))),
    ("Error unknown code", frame_bytes(0x40, b"\0\x63" + I + b"\0\0")),
    ("Error bad utf8", frame_bytes(0x40, b"\0\x01" + I + b"\0\x01\xff")),
    ("Error len lies", frame_bytes(0x40, b"\0\x01" + I + b"\0\x05ab")),
    ("Ping short", frame_bytes(0x50, bytes(7))),
    ("Subscribe too many", frame_bytes(0x60, b"\x01\x01" + K * 257)),
    ("Presence flag", frame_bytes(0x61, K + b"\x02")),
]


@pytest.mark.parametrize(("why", "data"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_malformed_rejected(why: str, data: bytes) -> None:
    with pytest.raises(FrameError):
        wire.decode(data)
    dec = wire.FrameDecoder()
    with pytest.raises(FrameError):
        for i in range(len(data)):
            dec.feed(data[i : i + 1])
    assert dec.failed


def test_payload_limit() -> None:
    ok = wire.Send(I, M, b"x" * wire.MAX_PAYLOAD)
    assert wire.decode(wire.encode(ok)) == ok
    with pytest.raises(FrameError):
        wire.encode(wire.Send(I, M, b"x" * (wire.MAX_PAYLOAD + 1)))
    with pytest.raises(FrameError):
        wire.decode(frame_bytes(0x10, I + M + b"x" * (wire.MAX_PAYLOAD + 1)))


def test_decode_refuses_two_frames_or_partial() -> None:
    one = wire.encode(wire.Ping(1))
    with pytest.raises(FrameError):
        wire.decode(one + one)
    with pytest.raises(FrameError):
        wire.decode(one[:-1])


@pytest.mark.parametrize(
    "frame",
    [
        wire.Send(I[:15], M, b"x"),
        wire.Send(I, M, b""),
        wire.Accepted(I, 0),
        wire.Ack(()),
        wire.Error(99, I, ""),
        wire.Error(wire.BAD_FRAME, I, "x" * 513),
        wire.Ping(-1),
        wire.Ping(2**64),
        wire.PrekeyCount(2**32),
        wire.SendMulti(I, ((K, b"a"), (K, b"b"))),
        wire.PublishPrekeys(b"", (OTK,) * 101),
    ],
)
def test_encode_refuses_invalid(frame: wire.Frame) -> None:
    with pytest.raises(FrameError):
        wire.encode(frame)


def test_frame_larger_than_max_refused_by_encoder() -> None:
    big = tuple((bytes([i]) * 32, b"p" * wire.MAX_PAYLOAD) for i in range(17))
    with pytest.raises(FrameError, match="limit"):
        wire.encode(wire.SendMulti(I, big))


# --- properties ------------------------------------------------------------------------------


@given(frames_st)
def test_roundtrip(frame: wire.Frame) -> None:
    data = wire.encode(frame)
    assert wire.decode(data) == frame
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4


@given(st.lists(frames_st, max_size=6), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_any_chunking_gives_same_frames(frames: list[wire.Frame], cuts: list[int]) -> None:
    stream = b"".join(wire.encode(f) for f in frames)
    dec = wire.FrameDecoder()
    out: list[wire.Frame] = []
    pos = 0
    i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        out += dec.feed(stream[pos : pos + step])
        pos += step
        i += 1
    assert out == frames


@settings(max_examples=500)
@given(st.binary(max_size=200), st.integers(1, 50))
def test_any_bytes_only_frames_or_frame_error(data: bytes, step: int) -> None:
    dec = wire.FrameDecoder()
    try:
        for pos in range(0, len(data), step):
            for frame in dec.feed(data[pos : pos + step]):
                assert wire.encode(frame)  # anything decoded re-encodes
    except FrameError:
        assert dec.failed


@given(frames_st, st.integers(0, 10_000), st.integers(0, 255))
def test_mutations_only_frames_or_frame_error(frame: wire.Frame, where: int, value: int) -> None:
    data = bytearray(wire.encode(frame))
    data[where % len(data)] = value
    try:
        got = wire.decode(bytes(data))
    except FrameError:
        return
    assert wire.encode(got) == bytes(data)  # canonical: one encoding per frame


@given(
    st.binary(min_size=16, max_size=16),
    st.sampled_from([1, 2]),
    st.binary(min_size=32, max_size=32),
)
def test_fast_encoders_match_the_canonical_ones(msg_id: bytes, status: int, mailbox: bytes) -> None:
    """The relay's hot-path encoders produce exactly the canonical bytes."""
    assert wire.encode_accepted(msg_id, status) == wire.encode(wire.Accepted(msg_id, status))
    assert wire.encode_delivered(msg_id, mailbox) == wire.encode(wire.Delivered(msg_id, mailbox))
    with pytest.raises(KeyError):
        wire.encode_accepted(msg_id, 3)


@given(
    st.lists(frames_st, max_size=20),
    st.integers(1, 2000),
    st.lists(st.integers(1, 500), max_size=10),
)
def test_decoding_with_a_limit_gives_the_same_frames(
    frames: list[wire.Frame], limit: int, cuts: list[int]
) -> None:
    """The relay decodes at most ``limit`` bytes of frames per turn; nothing is lost,
    reordered or decoded twice, however the bytes arrive."""
    data = b"".join(wire.encode(f) for f in frames)
    decoder = wire.FrameDecoder()
    got: list[wire.Frame] = []
    pos = 0
    for cut in [*cuts, len(data)]:
        chunk, pos = data[pos : pos + cut], pos + cut
        got += decoder.feed(chunk, limit)
        while decoder.more:
            got += decoder.feed(b"", limit)
    assert got == frames
    assert decoder.buffered == 0 and not decoder.more


def test_limit_leaves_complete_frames_undecoded() -> None:
    frames = [wire.Ping(i) for i in range(10)]  # 14 bytes each
    decoder = wire.FrameDecoder()
    first = decoder.feed(b"".join(wire.encode(f) for f in frames), 30)
    assert first == frames[:3]  # stops after the frame that reaches 30 bytes
    assert decoder.more and decoder.buffered == 7 * 14
    assert decoder.feed(b"", 1000) == frames[3:]
    assert not decoder.more
