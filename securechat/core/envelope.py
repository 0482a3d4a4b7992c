"""The end-to-end message format: envelope, content record, padding (core).

The envelope is the opaque payload the relay stores and forwards. Layout
(all integers big-endian)::

    envelope  = version:u8 (=1) || kind:u8 || [x3dh header if kind = INITIAL] || ratchet message
    x3dh hdr  = sender_dh:32 || sender_sign:32 || ephemeral:32 || flags:u8
                || spk_id:u32 || opk_id:u32
                flags: bit0 fallback, bit1 one-time prekey used; other bits zero;
                fallback => spk_id = 0 and no opk; no opk => opk_id = 0
    ratchet   = header:41 || nonce:12 || ChaCha20-Poly1305(padded content) (see ratchet.py)

The AEAD's associated data is ``X3DH AD || envelope prefix (version, kind,
x3dh header) || ratchet header``, so every clear byte is authenticated.

Content record, the AEAD plaintext before padding::

    version:u8 (=1) || type:u8 || msg_id:16 || sent_ms:u64 || flags:u8
    || [group_id:16 || count:u16 || count * member_dh:32 (strictly ascending)]  if flags bit0
    || body
    type 1 TEXT:      body = text_len:u32 || text (UTF-8)
    type 2 RECEIPT:   body = count:u16 || count * msg_id:16 (strictly ascending); flags = 0
    type 3 REJECTED:  same body as RECEIPT; flags = 0

A RECEIPT says "these messages you sent me are decrypted and stored on my
device" (the end-to-end "delivered", which the relay cannot forge); REJECTED
says "the relay gave me these message ids from you and they did not open".
Neither is shown as a message, and neither is answered by another.

A group's id is not chosen: it is :func:`derive_group_id` of its sorted member
list, so a copy that names other members is another conversation, and a
:class:`Group` whose id does not match its members cannot be built or parsed.

Padding: ISO/IEC 7816-4 (one 0x80 byte, then zeros) up to the smallest size in
:data:`PAD_BUCKETS` that holds record + 1 byte; anything else is rejected, so
the encoding is canonical and the relay learns only the bucket.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

import nacl.bindings

from securechat.core import ratchet
from securechat.core.keys import PublicIdentity
from securechat.core.x3dh import InitialHeader
from securechat.errors import AuthenticationError, SessionError

# --- our format ---------------------------------------------------------------------------------
ENVELOPE_VERSION: Final = 1
KIND_INITIAL: Final = 1
KIND_NORMAL: Final = 2
_PREFIX: Final = struct.Struct(">BB")
_X3DH: Final = struct.Struct(">32s32s32sBII")
X3DH_HEADER_SIZE: Final = _X3DH.size  # 105
FLAG_FALLBACK: Final = 1
FLAG_ONE_TIME: Final = 2

CONTENT_VERSION: Final = 1
CONTENT_TEXT: Final = 1
CONTENT_RECEIPT: Final = 2  # these ids are decrypted and stored on my device
CONTENT_REJECTED: Final = 3  # these ids reached me from you and did not open
CONTROL_KINDS: Final = frozenset((CONTENT_RECEIPT, CONTENT_REJECTED))
MSG_ID_SIZE: Final = 16
GROUP_ID_SIZE: Final = 16
MEMBER_SIZE: Final = 32
GROUP_ID_KEY: Final = b"securechat/v1/client/group"  # keyed BLAKE2b-256, first 16 bytes
_CONTENT_HEAD: Final = struct.Struct(">BB16sQB")
_GROUP_HEAD: Final = struct.Struct(">16sH")
_TEXT_LEN: Final = struct.Struct(">I")
_ID_COUNT: Final = struct.Struct(">H")
CONTENT_FLAG_GROUP: Final = 1
PAD_MARKER: Final = 0x80

# --- bounds we chose ----------------------------------------------------------------------------
MAX_TEXT_BYTES: Final = 16 * 1024
MAX_GROUP_MEMBERS: Final = 64
MAX_CONTROL_IDS: Final = 512  # message ids in one RECEIPT or REJECTED (8 KiB)
PAD_BUCKETS: Final = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 20480)
MAX_RECORD_SIZE: Final = (
    _CONTENT_HEAD.size
    + _GROUP_HEAD.size
    + MAX_GROUP_MEMBERS * MEMBER_SIZE
    + _TEXT_LEN.size
    + MAX_TEXT_BYTES
)
MAX_ENVELOPE_SIZE: Final = _PREFIX.size + X3DH_HEADER_SIZE + ratchet.OVERHEAD + PAD_BUCKETS[-1]
assert PAD_BUCKETS[-1] > MAX_RECORD_SIZE
assert PAD_BUCKETS[-1] > _CONTENT_HEAD.size + _ID_COUNT.size + MAX_CONTROL_IDS * MSG_ID_SIZE
_BUCKET_SET: Final = frozenset(PAD_BUCKETS)
_PAD_MARKER_BYTE: Final = bytes([PAD_MARKER])
_MALFORMED: Final = "message content is malformed"
_PLAIN_RECORD_OVERHEAD: Final = _CONTENT_HEAD.size + _TEXT_LEN.size  # record bytes besides text
_U64_END: Final = 2**64
_RATCHET_OVERHEAD: Final = ratchet.OVERHEAD


def derive_group_id(members: tuple[bytes, ...]) -> bytes:
    """The id of the group of exactly these members (identity X25519 keys).

    ``BLAKE2b-256(key = GROUP_ID_KEY, data = the sorted distinct keys joined)``,
    first 16 bytes. Deriving instead of choosing binds the id to the member
    list: a non-member cannot post into a group by naming its id, and a member
    who shows different member lists to different members shows them
    different conversations.
    """
    data = b"".join(sorted(set(members)))
    digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        data, digest_size=32, key=GROUP_ID_KEY
    )
    return bytes(digest[:GROUP_ID_SIZE])


@dataclass(frozen=True, slots=True)
class Group:
    """A group conversation as every member's copy states it.

    ``members`` are identity X25519 keys, kept sorted so that every copy
    carries the same bytes and the relay cannot split or merge groups; the id
    must be :func:`derive_group_id` of them (SessionError otherwise).
    """

    group_id: bytes
    members: tuple[bytes, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(set(self.members)))
        object.__setattr__(self, "members", ordered)
        if len(self.group_id) != GROUP_ID_SIZE:
            raise SessionError(f"group id must be {GROUP_ID_SIZE} bytes")
        if not 2 <= len(ordered) <= MAX_GROUP_MEMBERS:
            raise SessionError(f"a group has 2 to {MAX_GROUP_MEMBERS} members")
        if any(len(m) != MEMBER_SIZE for m in ordered):
            raise SessionError("group members are 32-byte identity keys")
        if self.group_id != derive_group_id(ordered):
            raise SessionError("group id does not match its member list")

    @classmethod
    def of(cls, members: tuple[bytes, ...] | list[bytes]) -> Group:
        """The group of these members, with its derived id."""
        ordered = tuple(sorted(set(members)))
        return cls(derive_group_id(ordered), ordered)


@dataclass(frozen=True, slots=True)
class Content:
    """What a person sent: id (also the relay frame's msg_id), time, and either text
    (``kind`` TEXT, maybe in a group) or the message ids a RECEIPT or REJECTED names."""

    msg_id: bytes
    sent_ms: int
    text: str
    group: Group | None = None
    kind: int = CONTENT_TEXT
    ids: tuple[bytes, ...] = ()

    @property
    def is_control(self) -> bool:
        return self.kind in CONTROL_KINDS


def control(
    kind: int, msg_id: bytes, sent_ms: int, ids: list[bytes] | tuple[bytes, ...]
) -> Content:
    """A RECEIPT or REJECTED naming ``ids`` (sorted, distinct, at most MAX_CONTROL_IDS)."""
    ordered = tuple(sorted(set(ids)))
    if kind not in CONTROL_KINDS:
        raise SessionError(f"not a control content type: {kind}")
    if not 1 <= len(ordered) <= MAX_CONTROL_IDS or any(len(i) != MSG_ID_SIZE for i in ordered):
        raise SessionError(f"a receipt names 1 to {MAX_CONTROL_IDS} 16-byte message ids")
    return Content(msg_id, sent_ms, "", None, kind, ordered)


class Envelope(NamedTuple):
    """A parsed envelope: the clear prefix (authenticated) and the ratchet message.

    An immutable tuple rather than a frozen dataclass: one is built for every
    received payload, and a tuple costs a third as much to construct.
    """

    initial: InitialHeader | None
    prefix: bytes
    message: bytes


class Reader:
    """Bounds-checked sequential parsing; ``error`` is raised on any shortfall."""

    __slots__ = ("_data", "_error", "_pos")

    def __init__(self, data: bytes, error: Exception) -> None:
        self._data, self._pos, self._error = data, 0, error

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise self._error
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[object, ...]:
        return fmt.unpack(self.take(fmt.size))

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def blob(self) -> bytes:
        """A u32 length-prefixed byte string."""
        return self.take(self.u32())

    def end(self) -> None:
        if self._pos != len(self._data):
            raise self._error


# --- content records ---------------------------------------------------------------------------


def encode_content(content: Content) -> bytes:
    """The padded plaintext of one message; SessionError for an invalid one.

    Record and padding are joined once (no copy of the record to pad it).
    """
    text = content.text.encode()
    msg_id, sent_ms, group = content.msg_id, content.sent_ms, content.group
    if len(text) > MAX_TEXT_BYTES:
        raise SessionError(f"message too long: at most {MAX_TEXT_BYTES} bytes of text")
    if len(msg_id) != MSG_ID_SIZE or not 0 <= sent_ms < _U64_END:
        raise SessionError("message id must be 16 bytes and the time a u64")
    if content.kind != CONTENT_TEXT:
        return _encode_control(content)
    if group is None:
        head = _CONTENT_HEAD.pack(CONTENT_VERSION, CONTENT_TEXT, msg_id, sent_ms, 0)
        size = _PLAIN_RECORD_OVERHEAD + len(text)
        parts = [head, _TEXT_LEN.pack(len(text)), text]
    else:
        head = _CONTENT_HEAD.pack(
            CONTENT_VERSION, CONTENT_TEXT, msg_id, sent_ms, CONTENT_FLAG_GROUP
        )
        parts = [head, _GROUP_HEAD.pack(group.group_id, len(group.members)), *group.members]
        parts += [_TEXT_LEN.pack(len(text)), text]
        size = sum(map(len, parts))
    parts += [_PAD_MARKER_BYTE, bytes(_bucket(size) - size - 1)]
    return b"".join(parts)


def _encode_control(content: Content) -> bytes:
    ids = content.ids
    ordered = tuple(sorted(set(ids)))
    if (
        content.kind not in CONTROL_KINDS
        or content.group is not None
        or content.text
        or ordered != ids
        or not 1 <= len(ids) <= MAX_CONTROL_IDS
        or any(len(i) != MSG_ID_SIZE for i in ids)
    ):
        raise SessionError(
            f"a receipt names 1 to {MAX_CONTROL_IDS} distinct ids, sorted, and nothing else"
        )
    head = _CONTENT_HEAD.pack(CONTENT_VERSION, content.kind, content.msg_id, content.sent_ms, 0)
    return pad(b"".join((head, _ID_COUNT.pack(len(ids)), *ids)))


def _bucket(size: int) -> int:
    """The smallest bucket holding ``size`` record bytes plus the marker."""
    index = bisect.bisect_right(PAD_BUCKETS, size)
    if index == len(PAD_BUCKETS):
        raise SessionError("message too long to pad")
    return PAD_BUCKETS[index]


def pad(record: bytes) -> bytes:
    size = len(record)
    return b"".join((record, _PAD_MARKER_BYTE, bytes(_bucket(size) - size - 1)))


def _record_end(padded: bytes) -> int:
    """Length of the record inside ``padded``; SessionError for non-canonical padding."""
    size = len(padded)
    if size not in _BUCKET_SET:
        raise SessionError("message has a non-canonical padded size")
    # the marker is the last non-zero byte: find it, then check that zeros follow
    # (two C-speed scans; bytes.rstrip walks the padding one byte at a time)
    end = padded.rfind(_PAD_MARKER_BYTE)
    if end < 0 or not padded.endswith(bytes(size - end - 1)):
        raise SessionError("message padding is malformed")
    if PAD_BUCKETS[bisect.bisect_right(PAD_BUCKETS, end)] != size:
        raise SessionError("message is padded to a larger bucket than needed")
    return end


def unpad(padded: bytes) -> bytes:
    """Inverse of :func:`pad`; rejects any size or padding :func:`pad` never makes."""
    return padded[: _record_end(padded)]


def decode_content(padded: bytes) -> Content:
    """Parse a decrypted content record strictly (SessionError if malformed)."""
    end = _record_end(padded)
    if end < _CONTENT_HEAD.size:
        raise SessionError(_MALFORMED)
    version, kind, msg_id, sent_ms, flags = _CONTENT_HEAD.unpack_from(padded)
    if version != CONTENT_VERSION or (kind != CONTENT_TEXT and kind not in CONTROL_KINDS):
        raise SessionError("message uses an unsupported content version or type; upgrade")
    if flags not in (0, CONTENT_FLAG_GROUP):
        raise SessionError("message content has unknown flags")
    if kind in CONTROL_KINDS:
        if flags:
            raise SessionError(_MALFORMED)
        return Content(msg_id, sent_ms, "", None, kind, _decode_ids(padded[:end]))
    group, offset = None, _CONTENT_HEAD.size
    if flags:
        group, offset = _decode_group(padded[:end], offset)
    text_start = offset + _TEXT_LEN.size
    if end < text_start:
        raise SessionError(_MALFORMED)
    (text_len,) = _TEXT_LEN.unpack_from(padded, offset)
    if text_len > MAX_TEXT_BYTES:
        raise SessionError("message text is too long")
    if text_start + text_len > end:
        raise SessionError(_MALFORMED)
    try:
        text = padded[text_start : text_start + text_len].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SessionError("message text is not valid UTF-8") from exc
    if text_start + text_len != end:
        raise SessionError(_MALFORMED)  # trailing bytes
    return Content(msg_id, sent_ms, text, group)


def _decode_ids(record: bytes) -> tuple[bytes, ...]:
    """The id list of a RECEIPT or REJECTED record: count, then strictly ascending ids."""
    r = Reader(record, SessionError(_MALFORMED))
    r.take(_CONTENT_HEAD.size)
    count = int.from_bytes(r.take(_ID_COUNT.size), "big")
    if not 1 <= count <= MAX_CONTROL_IDS:
        raise SessionError(_MALFORMED)
    ids = tuple(r.take(MSG_ID_SIZE) for _ in range(count))
    r.end()
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise SessionError("receipt ids are not strictly sorted")
    return ids


def _decode_group(record: bytes, offset: int) -> tuple[Group, int]:
    """The group context at ``offset`` of ``record``, and the offset after it."""
    r = Reader(record, SessionError(_MALFORMED))
    r.take(offset)
    group_id, count = r.unpack(_GROUP_HEAD)
    assert isinstance(count, int) and isinstance(group_id, bytes)
    members = tuple(r.take(MEMBER_SIZE) for _ in range(min(count, MAX_GROUP_MEMBERS + 1)))
    if any(a >= b for a, b in itertools.pairwise(members)):
        raise SessionError("group member list is not strictly sorted")
    group = Group(group_id, members)
    if len(group.members) != count:
        raise SessionError("group member list is malformed")
    return group, offset + _GROUP_HEAD.size + count * MEMBER_SIZE


# --- envelopes ----------------------------------------------------------------------------------


def encode_prefix(initial: InitialHeader | None) -> bytes:
    if initial is None:
        return _PREFIX.pack(ENVELOPE_VERSION, KIND_NORMAL)
    opk = initial.one_time_prekey_id
    flags = (FLAG_FALLBACK if initial.fallback else 0) | (FLAG_ONE_TIME if opk is not None else 0)
    return _PREFIX.pack(ENVELOPE_VERSION, KIND_INITIAL) + _X3DH.pack(
        initial.sender.dh,
        initial.sender.sign,
        initial.ephemeral,
        flags,
        initial.signed_prekey_id,
        opk or 0,
    )


def decode_envelope(payload: bytes) -> Envelope:
    """Split an envelope; AuthenticationError for anything malformed (one opaque error)."""
    size = len(payload)
    if size > MAX_ENVELOPE_SIZE or size < _PREFIX.size or payload[0] != ENVELOPE_VERSION:
        raise AuthenticationError()
    kind, initial, offset = payload[1], None, _PREFIX.size
    if kind == KIND_INITIAL:
        if size < offset + X3DH_HEADER_SIZE:
            raise AuthenticationError()
        initial = _decode_x3dh(payload[offset : offset + X3DH_HEADER_SIZE])
        offset += X3DH_HEADER_SIZE
    elif kind != KIND_NORMAL:
        raise AuthenticationError()
    if size - offset - _RATCHET_OVERHEAD not in _BUCKET_SET:
        raise AuthenticationError()
    return Envelope(initial, payload[:offset], payload[offset:])


def _decode_x3dh(raw: bytes) -> InitialHeader:
    sender_dh, sender_sign, ephemeral, flags, spk_id, opk_id = _X3DH.unpack(raw)
    fallback, has_opk = bool(flags & FLAG_FALLBACK), bool(flags & FLAG_ONE_TIME)
    if flags & ~(FLAG_FALLBACK | FLAG_ONE_TIME) or has_opk != (opk_id != 0):
        raise AuthenticationError()
    if fallback and (spk_id != 0 or has_opk):
        raise AuthenticationError()
    if not fallback and spk_id == 0:
        raise AuthenticationError()
    sender = PublicIdentity(sender_dh, sender_sign)
    return InitialHeader(sender, ephemeral, fallback, spk_id, opk_id if has_opk else None)
