"""The invite frames (0x70-0x74): one canonical encoding, every bound checked on both sides.

The exact bytes of each type are in ``test_wire.py``'s table; here are the rejections and
a round-trip property over the whole range of each field.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securechat.core import wire
from securechat.errors import FrameError


def frame_bytes(ftype: int, body: bytes) -> bytes:
    return struct.pack(">IBB", len(body) + 2, 1, ftype) + body


PLATE = b"\0\0\0\x07"
BAD = [
    ("open with a body", frame_bytes(0x70, b"\0")),
    ("opened nameplate 0", frame_bytes(0x71, b"\0\0\0\0")),
    ("opened short", frame_bytes(0x71, b"\0\0\x07")),
    ("opened trailing", frame_bytes(0x71, PLATE + b"\0")),
    ("join nameplate 0", frame_bytes(0x72, b"\0\0\0\0")),
    ("join trailing", frame_bytes(0x72, PLATE + b"x")),
    ("data empty payload", frame_bytes(0x73, PLATE)),
    ("data nameplate 0", frame_bytes(0x73, b"\0\0\0\0x")),
    ("data too long", frame_bytes(0x73, PLATE + bytes(wire.MAX_INVITE_DATA + 1))),
    ("closed reason 0", frame_bytes(0x74, PLATE + b"\0")),
    ("closed reason 7", frame_bytes(0x74, PLATE + b"\x07")),
    ("closed trailing", frame_bytes(0x74, PLATE + b"\x01\x00")),
]


@pytest.mark.parametrize(("why", "data"), BAD, ids=[b[0] for b in BAD])
def test_malformed_invite_frames_are_frame_errors(why: str, data: bytes) -> None:
    with pytest.raises(FrameError):
        wire.decode(data)


@pytest.mark.parametrize(
    "frame",
    [
        wire.InviteOpened(0),
        wire.InviteJoin(2**32),
        wire.InviteData(1, b""),
        wire.InviteData(1, bytes(wire.MAX_INVITE_DATA + 1)),
        wire.InviteClosed(1, 9),
        wire.InviteClosed(-1, wire.INVITE_USED),
    ],
)
def test_the_encoder_refuses_what_the_decoder_would(frame: wire.Frame) -> None:
    with pytest.raises(FrameError):
        wire.encode(frame)


def test_the_largest_payload_passes() -> None:
    frame = wire.InviteData(wire.MAX_NAMEPLATE, bytes(range(256)) * 4)
    assert wire.decode(wire.encode(frame)) == frame


plates = st.integers(1, wire.MAX_NAMEPLATE)
invite_frames = st.one_of(
    st.just(wire.InviteOpen()),
    st.builds(wire.InviteOpened, plates),
    st.builds(wire.InviteJoin, plates),
    st.builds(wire.InviteData, plates, st.binary(min_size=1, max_size=wire.MAX_INVITE_DATA)),
    st.builds(
        wire.InviteClosed,
        st.integers(0, wire.MAX_NAMEPLATE),
        st.sampled_from(sorted(wire.INVITE_REASONS)),
    ),
)


@given(invite_frames)
def test_decode_encode_round_trip(frame: wire.Frame) -> None:
    data = wire.encode(frame)
    assert wire.decode(data) == frame
    assert wire.FrameDecoder().feed(data[:-1]) == []
