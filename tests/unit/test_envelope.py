"""Envelope and content record: canonical encoding, padding buckets, strict parsing."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securechat.core import envelope, ratchet
from securechat.core.envelope import Content, Group
from securechat.core.keys import generate_identity
from securechat.core.x3dh import InitialHeader
from securechat.errors import AuthenticationError, SessionError

members = st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=8, unique=True)
groups = members.map(tuple).map(Group.of)
contents = st.builds(
    Content,
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.text(max_size=300),
    st.none() | groups,
)


@given(contents)
@settings(max_examples=200)
def test_content_roundtrip_and_bucket(content: Content) -> None:
    padded = envelope.encode_content(content)
    assert len(padded) in envelope.PAD_BUCKETS
    assert envelope.decode_content(padded) == content


@given(st.binary(max_size=3000))
@settings(max_examples=300)
def test_decode_content_only_raises_session_error(data: bytes) -> None:
    with contextlib.suppress(SessionError):
        envelope.decode_content(data)


@given(st.binary(max_size=600))
@settings(max_examples=300)
def test_decode_envelope_only_raises_authentication_error(data: bytes) -> None:
    try:
        env = envelope.decode_envelope(data)
    except AuthenticationError:
        return
    assert env.prefix + env.message == data


def test_padding_hides_length_within_bucket() -> None:
    sizes = {len(envelope.encode_content(Content(bytes(16), 1, "x" * n))) for n in range(30)}
    assert sizes == {64}
    assert len(envelope.encode_content(Content(bytes(16), 1, "x" * 60))) == 128


def test_padding_is_canonical() -> None:
    padded = envelope.encode_content(Content(bytes(16), 1, "hi"))
    record = envelope.unpad(padded)
    with pytest.raises(SessionError):
        envelope.unpad(record + b"\x80" + bytes(128 - len(record) - 1))  # too big a bucket
    with pytest.raises(SessionError):
        envelope.unpad(padded[:-1] + b"\x01")
    with pytest.raises(SessionError):
        envelope.unpad(bytes(64))
    with pytest.raises(SessionError):
        envelope.unpad(padded + b"\x00")


def test_limits() -> None:
    big = Content(bytes(16), 1, "é" * (envelope.MAX_TEXT_BYTES // 2))
    assert len(envelope.encode_content(big)) <= envelope.PAD_BUCKETS[-1]
    with pytest.raises(SessionError):
        envelope.encode_content(Content(bytes(16), 1, "x" * (envelope.MAX_TEXT_BYTES + 1)))
    with pytest.raises(SessionError):
        envelope.encode_content(Content(bytes(15), 1, "x"))
    with pytest.raises(SessionError):
        Group.of((bytes(32),))
    with pytest.raises(SessionError):
        Group.of(tuple(i.to_bytes(32, "big") for i in range(envelope.MAX_GROUP_MEMBERS + 1)))
    full = Group.of(tuple(i.to_bytes(32, "big") for i in range(envelope.MAX_GROUP_MEMBERS)))
    largest = Content(bytes(16), 2**64 - 1, "x" * envelope.MAX_TEXT_BYTES, full)
    assert envelope.decode_content(envelope.encode_content(largest)) == largest


def test_group_id_is_derived_from_the_member_list() -> None:
    a, b, c = (bytes([i]) * 32 for i in (3, 1, 2))
    group = Group.of((a, b))
    assert group.group_id == envelope.derive_group_id((b, a))
    assert Group.of((a, b, c)).group_id != group.group_id
    with pytest.raises(SessionError, match="does not match"):
        Group(bytes(16), (a, b))  # a chosen id is refused
    with pytest.raises(SessionError, match="does not match"):
        Group(Group.of((a, b, c)).group_id, (a, b))  # another list's id too
    record = envelope.unpad(envelope.encode_content(Content(bytes(16), 1, "t", group)))
    forged = record.replace(group.group_id, Group.of((a, b, c)).group_id)
    with pytest.raises(SessionError, match="does not match"):
        envelope.decode_content(envelope.pad(forged))


def test_receipts_round_trip_and_are_canonical() -> None:
    ids = [bytes([9 - i]) * 16 for i in range(5)]
    receipt = envelope.control(envelope.CONTENT_RECEIPT, bytes(16), 7, ids)
    assert receipt.ids == tuple(sorted(ids)) and receipt.is_control
    assert envelope.decode_content(envelope.encode_content(receipt)) == receipt
    rejected = envelope.control(envelope.CONTENT_REJECTED, bytes(16), 7, ids[:1])
    assert envelope.decode_content(envelope.encode_content(rejected)) == rejected
    record = envelope.unpad(envelope.encode_content(receipt))
    head = 1 + 1 + 16 + 8 + 1 + 2
    swapped = record[:head] + record[head + 16 : head + 32] + record[head : head + 16]
    swapped += record[head + 32 :]
    with pytest.raises(SessionError):  # unsorted ids
        envelope.decode_content(envelope.pad(swapped))
    with pytest.raises(SessionError):  # a group flag on a receipt
        envelope.decode_content(envelope.pad(record[:26] + b"\x01" + record[27:]))
    with pytest.raises(SessionError):  # trailing bytes
        envelope.decode_content(envelope.pad(record + b"\x00"))
    with pytest.raises(SessionError):
        envelope.control(envelope.CONTENT_RECEIPT, bytes(16), 7, [])
    with pytest.raises(SessionError):
        envelope.control(
            envelope.CONTENT_RECEIPT,
            bytes(16),
            7,
            [i.to_bytes(16, "big") for i in range(envelope.MAX_CONTROL_IDS + 1)],
        )
    largest = envelope.control(
        envelope.CONTENT_RECEIPT,
        bytes(16),
        7,
        [i.to_bytes(16, "big") for i in range(envelope.MAX_CONTROL_IDS)],
    )
    assert envelope.decode_content(envelope.encode_content(largest)) == largest


def test_group_members_are_sorted_and_unique() -> None:
    a, b, c = (bytes([i]) * 32 for i in (3, 1, 2))
    assert Group.of((a, b, c, a)).members == (b, c, a)


def test_unsorted_members_on_the_wire_are_rejected() -> None:
    g = Group.of((bytes([1]) * 32, bytes([2]) * 32))
    record = envelope.unpad(envelope.encode_content(Content(bytes(16), 1, "t", g)))
    head = 1 + 1 + 16 + 8 + 1 + 16 + 2
    swapped = (
        record[:head]
        + record[head + 32 : head + 64]
        + record[head : head + 32]
        + record[head + 64 :]
    )
    with pytest.raises(SessionError):
        envelope.decode_content(envelope.pad(swapped))


def test_unknown_versions_types_flags_rejected() -> None:
    record = envelope.unpad(envelope.encode_content(Content(bytes(16), 1, "t")))
    for index, value in ((0, 2), (1, 2), (26, 2)):
        bad = bytearray(record)
        bad[index] = value
        with pytest.raises(SessionError):
            envelope.decode_content(envelope.pad(bytes(bad)))
    with pytest.raises(SessionError):
        envelope.decode_content(envelope.pad(record + b"\x00"))  # trailing byte


def test_initial_header_roundtrip_and_flag_rules() -> None:
    ident = generate_identity("a", random.Random(1).randbytes(64))
    body = bytes(ratchet.OVERHEAD + 64)
    for header in (
        InitialHeader(ident.public, bytes(range(32)), False, 5, 9),
        InitialHeader(ident.public, bytes(range(32)), False, 5, None),
        InitialHeader(ident.public, bytes(range(32)), True, 0, None),
    ):
        prefix = envelope.encode_prefix(header)
        env = envelope.decode_envelope(prefix + body)
        assert env.initial is not None
        assert (env.initial.fallback, env.initial.signed_prekey_id) == (
            header.fallback,
            header.signed_prekey_id,
        )
        assert env.initial.one_time_prekey_id == header.one_time_prekey_id
        assert env.initial.sender.key_bytes == ident.public.key_bytes
    good = envelope.encode_prefix(InitialHeader(ident.public, bytes(32), False, 5, None))
    flags_at = 2 + 96
    for flags, spk, opk in ((4, 5, 0), (1, 5, 0), (2, 5, 0), (0, 5, 3), (0, 0, 0), (3, 0, 1)):
        bad = bytearray(good)
        bad[flags_at] = flags
        bad[flags_at + 1 : flags_at + 5] = spk.to_bytes(4, "big")
        bad[flags_at + 5 : flags_at + 9] = opk.to_bytes(4, "big")
        with pytest.raises(AuthenticationError):
            envelope.decode_envelope(bytes(bad) + body)


def test_envelope_rejects_non_bucket_ciphertext_sizes() -> None:
    prefix = envelope.encode_prefix(None)
    assert envelope.decode_envelope(prefix + bytes(ratchet.OVERHEAD + 64)).initial is None
    for size in (0, ratchet.OVERHEAD, ratchet.OVERHEAD + 63, ratchet.OVERHEAD + 65):
        with pytest.raises(AuthenticationError):
            envelope.decode_envelope(prefix + bytes(size))
    with pytest.raises(AuthenticationError):
        envelope.decode_envelope(b"\x02\x02" + bytes(ratchet.OVERHEAD + 64))


def _unpad_reference(padded: bytes) -> bytes:
    """The straightforward definition: strip zeros, then one 0x80, then check the bucket."""
    if len(padded) not in envelope.PAD_BUCKETS:
        raise SessionError("size")
    record = padded.rstrip(b"\x00")
    if not record or record[-1] != envelope.PAD_MARKER:
        raise SessionError("marker")
    record = record[:-1]
    if next(b for b in envelope.PAD_BUCKETS if b > len(record)) != len(padded):
        raise SessionError("bucket")
    return record


@st.composite
def padded_like(draw: st.DrawFn) -> bytes:
    """Canonical paddings, paddings to a too-large bucket, and either with one byte changed."""
    record = draw(st.binary(max_size=300))
    bucket = draw(st.sampled_from([b for b in envelope.PAD_BUCKETS[:5] if b > len(record)]))
    padded = bytearray(record + b"\x80" + bytes(bucket - len(record) - 1))
    if draw(st.booleans()):
        where = draw(st.integers(0, len(padded) - 1))
        padded[where] = draw(st.sampled_from([0x00, 0x01, 0x80]))
    return bytes(padded)


@given(padded_like() | st.binary(min_size=64, max_size=64) | st.binary(min_size=128, max_size=128))
@settings(max_examples=400)
def test_unpad_agrees_with_its_definition(padded: bytes) -> None:
    """The fast marker search accepts and rejects exactly what the definition does."""
    try:
        expected = _unpad_reference(padded)
    except SessionError:
        with pytest.raises(SessionError):
            envelope.unpad(padded)
        return
    assert envelope.unpad(padded) == expected
