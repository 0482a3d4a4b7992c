"""Client<->relay frames: types, limits, canonical encoding, incremental decoder (core).

Theory of operation
-------------------
Inside the Noise channel both directions carry one byte stream made of frames::

    u32 length (big-endian) | u8 version (= 1) | u8 type | body

``length`` counts the version and type bytes plus the body, so it is at least
2 and at most :data:`MAX_FRAME`. The decoder checks it as soon as the four
length bytes are in, *before* buffering any of the body, so a peer cannot make
us hold more than one maximal frame. Every body has exactly one valid encoding:
fixed-size fields have their exact size, counts must agree with the body,
nothing may trail, unknown versions, types, status and error codes are refused.
Any violation raises :class:`~securechat.errors.FrameError`; a decoder that has
raised stays failed (the stream position is lost, so resynchronising would
only turn an attack into a guessing game).

The module is pure: no sockets, threads, clocks or files. The relay and the
client feed it bytes and get frames; they encode frames and send the bytes.
Frame types and body layouts are listed in ``docs/protocol.md`` section 3.1.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

import nacl.bindings

from securechat.errors import FrameError, FrameTooLargeError

# --- sizes fixed by the protocol (version 1) ---------------------------------------------

VERSION: Final = 1
LENGTH_SIZE: Final = 4  # u32 frame length prefix
HEADER_SIZE: Final = 2  # version + type, counted in the length
ID_SIZE: Final = 16  # message id, random, chosen by the sender
KEY_SIZE: Final = 32  # identity X25519 public key
MAILBOX_SIZE: Final = 32  # keyed BLAKE2b of the identity key
ONE_TIME_PREKEY_SIZE: Final = 36  # opaque to the relay: 4-byte id + 32-byte key
ACK_ENTRY_SIZE: Final = KEY_SIZE + ID_SIZE

# --- limits we chose (version 1) -----------------------------------------------------------

MAX_FRAME: Final = 1 << 20  # largest length field accepted (1 MiB)
MAX_PAYLOAD: Final = 64 * 1024  # per recipient payload
MAX_RECIPIENTS: Final = 256  # per SendMulti
MAX_ACKS: Final = 1024  # entries per Ack frame
MAX_SIGNED_PREKEY: Final = 1024  # opaque signed prekey blob
MAX_PUBLISH_OTKS: Final = 100  # one-time prekeys per PublishPrekeys
MAX_REASON: Final = 512  # UTF-8 bytes of an Error reason
MAX_SUBSCRIBE: Final = 256  # identities per PresenceSubscribe
MAX_INVITE_DATA: Final = 1024  # bytes of one InviteData payload (an invite message needs < 300)
MAX_NAMEPLATE: Final = (1 << 32) - 1  # nameplates are u32, from 1 (0 means "no nameplate")

MAILBOX_LABEL: Final = b"securechat/v1/mailbox"
MAILBOX_CACHE: Final = 65536  # identities whose mailbox address is kept (~100 bytes each)

# --- frame types ---------------------------------------------------------------------------

T_SEND: Final = 0x10
T_SEND_MULTI: Final = 0x11
T_ACCEPTED: Final = 0x12
T_DELIVERED: Final = 0x13  # deprecated: no longer sent by the relay, still decodable
T_DELIVER: Final = 0x20
T_ACK: Final = 0x21
T_SYNCED: Final = 0x22
T_PUBLISH_PREKEYS: Final = 0x30
T_FETCH_PREKEYS: Final = 0x31
T_PREKEYS: Final = 0x32
T_PREKEY_COUNT: Final = 0x33
T_ERROR: Final = 0x40
T_PING: Final = 0x50
T_PONG: Final = 0x51
T_PRESENCE_SUBSCRIBE: Final = 0x60
T_PRESENCE: Final = 0x61
T_INVITE_OPEN: Final = 0x70
T_INVITE_OPENED: Final = 0x71
T_INVITE_JOIN: Final = 0x72
T_INVITE_DATA: Final = 0x73
T_INVITE_CLOSED: Final = 0x74

# Accepted status
STATUS_STORED: Final = 1  # stored durably (committed), will be delivered later
STATUS_DELIVERED: Final = 2  # delivered and acknowledged by the recipient's device

# Error codes
BAD_FRAME: Final = 1
TOO_LARGE: Final = 2
QUOTA_EXCEEDED: Final = 3
RATE_LIMITED: Final = 4
STORE_FAILED: Final = 5  # the sender must keep the message and retry
NOT_AUTHORISED: Final = 6
TOO_MANY_CONNECTIONS: Final = 7
SERVER_SHUTDOWN: Final = 8
# A newer connection of the same identity took over; the old one is closed after this.
# A client must not reconnect automatically on it (its other instance would be replaced
# in turn: two clients evicting each other forever).
REPLACED: Final = 9
ERROR_CODES: Final = frozenset(range(BAD_FRAME, REPLACED + 1))
ERROR_NAMES: Final = {
    BAD_FRAME: "BAD_FRAME",
    TOO_LARGE: "TOO_LARGE",
    QUOTA_EXCEEDED: "QUOTA_EXCEEDED",
    RATE_LIMITED: "RATE_LIMITED",
    STORE_FAILED: "STORE_FAILED",
    NOT_AUTHORISED: "NOT_AUTHORISED",
    TOO_MANY_CONNECTIONS: "TOO_MANY_CONNECTIONS",
    SERVER_SHUTDOWN: "SERVER_SHUTDOWN",
    REPLACED: "REPLACED",
}
NO_ID: Final = bytes(ID_SIZE)

# InviteClosed reasons (protocol section 7): why the relay ended (or refused) an invite.
INVITE_NO_SUCH: Final = 1  # no open invite has that nameplate (never opened, expired, opener left)
INVITE_USED: Final = 2  # someone already joined that nameplate (the first join consumes it)
INVITE_PEER_LEFT: Final = 3  # the other party disconnected before the exchange was complete
INVITE_EXPIRED: Final = 4  # the invite's time to live ran out
INVITE_TOO_MANY: Final = 5  # InviteOpen refused: too many open invites (identity, network, relay)
INVITE_VIOLATION: Final = 6  # a party sent more InviteData than the exchange allows
INVITE_REASONS: Final = frozenset(range(INVITE_NO_SUCH, INVITE_VIOLATION + 1))

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_PREFIX: Final = struct.Struct(">IBB")
_MAX_U64: Final = (1 << 64) - 1


def mailbox_address(identity_key: bytes) -> bytes:
    """The mailbox of an identity: keyed BLAKE2b-256 of its X25519 public key.

    Why hashed: the relay's tables and the store index on an address that is
    not itself the key, and the label separates it from every other hash use.
    libsodium's ``generichash`` costs ~7 us through PyNaCl, so the relay's hot
    path looks addresses up in a bounded cache instead of hashing again.
    """
    if len(identity_key) != KEY_SIZE:
        raise FrameError("identity key must be 32 bytes")
    return _mailbox_cached(bytes(identity_key))


@functools.lru_cache(maxsize=MAILBOX_CACHE)
def _mailbox_cached(identity_key: bytes) -> bytes:
    digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        identity_key, digest_size=MAILBOX_SIZE, key=MAILBOX_LABEL
    )
    return bytes(digest)


# --- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """C>R: one payload for one recipient mailbox."""

    msg_id: bytes
    mailbox: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class SendMulti:
    """C>R: per-recipient payloads under one message id (group fan-out)."""

    msg_id: bytes
    recipients: tuple[tuple[bytes, bytes], ...]  # (mailbox, payload), mailboxes distinct


@dataclass(frozen=True, slots=True)
class Accepted:
    """R>C: the relay took responsibility for every copy of ``msg_id``."""

    msg_id: bytes
    status: int


@dataclass(frozen=True, slots=True)
class Delivered:
    """R>C, deprecated: the relay's receipt for one recipient's copy.

    The relay no longer sends it: "delivered to the peer's device" comes from the
    recipient's end-to-end encrypted receipt, which a relay cannot forge. The type
    stays decodable so that a client talking to an older relay still parses it.
    """

    msg_id: bytes
    mailbox: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """R>C: a frame for the connection's own mailbox."""

    msg_id: bytes
    sender_key: bytes
    timestamp_ms: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """C>R: these deliveries are safe on the device; the relay may forget them."""

    entries: tuple[tuple[bytes, bytes], ...]  # (sender_key, msg_id)


@dataclass(frozen=True, slots=True)
class Synced:
    """R>C: the backlog stored when the connection authenticated has been sent."""


@dataclass(frozen=True, slots=True)
class PublishPrekeys:
    """C>R: prekeys for the connection's own identity (opaque to the relay)."""

    signed_prekey: bytes  # empty: keep the one published before
    one_time_prekeys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class FetchPrekeys:
    """C>R: ask for an identity's prekey bundle."""

    identity_key: bytes


@dataclass(frozen=True, slots=True)
class Prekeys:
    """R>C: a bundle; the one-time prekey in it is never handed out again."""

    identity_key: bytes
    signed_prekey: bytes  # empty: none published
    one_time_prekey: bytes | None


@dataclass(frozen=True, slots=True)
class PrekeyCount:
    """R>C: one-time prekeys the relay still holds for the connection's identity."""

    remaining: int


@dataclass(frozen=True, slots=True)
class Error:
    """R>C: an explicit refusal; ``msg_id`` is all zeros when no message is concerned."""

    code: int
    msg_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True)
class PresenceSubscribe:
    """C>R: report when these identities connect or leave (replaces earlier lists)."""

    identity_keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Presence:
    identity_key: bytes
    online: bool


@dataclass(frozen=True, slots=True)
class InviteOpen:
    """C>R: allocate a nameplate for a new invite, bound to this connection."""


@dataclass(frozen=True, slots=True)
class InviteOpened:
    """R>C: the nameplate allocated for this connection's InviteOpen."""

    nameplate: int


@dataclass(frozen=True, slots=True)
class InviteJoin:
    """C>R: pair with the opener of ``nameplate`` (the first join consumes it)."""

    nameplate: int


@dataclass(frozen=True, slots=True)
class InviteData:
    """Both ways: an opaque invite message for the other party of a paired nameplate."""

    nameplate: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class InviteClosed:
    """R>C: the invite ``nameplate`` is over (or was refused); ``reason`` says why."""

    nameplate: int
    reason: int


Frame: TypeAlias = (
    Send
    | SendMulti
    | Accepted
    | Delivered
    | Deliver
    | Ack
    | Synced
    | PublishPrekeys
    | FetchPrekeys
    | Prekeys
    | PrekeyCount
    | Error
    | Ping
    | Pong
    | PresenceSubscribe
    | Presence
    | InviteOpen
    | InviteOpened
    | InviteJoin
    | InviteData
    | InviteClosed
)


# --- encoding ----------------------------------------------------------------------------------


def _fixed(value: bytes, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise FrameError(f"{what} must be exactly {size} bytes")
    return value


def _payload(value: bytes) -> bytes:
    if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_PAYLOAD:
        raise FrameError(f"payload must be 1..{MAX_PAYLOAD} bytes")
    return value


def _count(n: int, low: int, high: int, what: str) -> bytes:
    if not low <= n <= high:
        raise FrameError(f"{what} count {n} outside {low}..{high}")
    return _U16.pack(n)


def _uint(value: int, bits: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise FrameError(f"{what} must be an unsigned {bits}-bit integer")
    return value


def _enc_send(f: Send) -> bytes:
    return (
        _fixed(f.msg_id, ID_SIZE, "msg_id")
        + _fixed(f.mailbox, MAILBOX_SIZE, "mailbox")
        + _payload(f.payload)
    )


def _enc_send_multi(f: SendMulti) -> bytes:
    parts = [
        _fixed(f.msg_id, ID_SIZE, "msg_id"),
        _count(len(f.recipients), 1, MAX_RECIPIENTS, "recipient"),
    ]
    seen: set[bytes] = set()
    for mailbox, payload in f.recipients:
        _fixed(mailbox, MAILBOX_SIZE, "mailbox")
        if mailbox in seen:
            raise FrameError("a SendMulti names the same mailbox twice")
        seen.add(mailbox)
        parts += [mailbox, _U32.pack(len(_payload(payload))), payload]
    return b"".join(parts)


def _enc_accepted(f: Accepted) -> bytes:
    if f.status not in (STATUS_STORED, STATUS_DELIVERED):
        raise FrameError(f"unknown Accepted status {f.status!r}")
    return _fixed(f.msg_id, ID_SIZE, "msg_id") + bytes((f.status,))


def _enc_delivered(f: Delivered) -> bytes:
    return _fixed(f.msg_id, ID_SIZE, "msg_id") + _fixed(f.mailbox, MAILBOX_SIZE, "mailbox")


def _enc_deliver(f: Deliver) -> bytes:
    return b"".join(
        (
            _fixed(f.msg_id, ID_SIZE, "msg_id"),
            _fixed(f.sender_key, KEY_SIZE, "sender_key"),
            _U64.pack(_uint(f.timestamp_ms, 64, "timestamp")),
            _payload(f.payload),
        )
    )


def _enc_ack(f: Ack) -> bytes:
    parts = [_count(len(f.entries), 1, MAX_ACKS, "ack")]
    for sender_key, msg_id in f.entries:
        parts += [_fixed(sender_key, KEY_SIZE, "sender_key"), _fixed(msg_id, ID_SIZE, "msg_id")]
    return b"".join(parts)


def _enc_synced(f: Synced) -> bytes:
    return b""


def _enc_publish(f: PublishPrekeys) -> bytes:
    spk = f.signed_prekey
    if not isinstance(spk, bytes) or len(spk) > MAX_SIGNED_PREKEY:
        raise FrameError(f"signed prekey must be at most {MAX_SIGNED_PREKEY} bytes")
    parts = [
        _U16.pack(len(spk)),
        spk,
        _count(len(f.one_time_prekeys), 0, MAX_PUBLISH_OTKS, "prekey"),
    ]
    parts += [_fixed(k, ONE_TIME_PREKEY_SIZE, "one-time prekey") for k in f.one_time_prekeys]
    return b"".join(parts)


def _enc_fetch(f: FetchPrekeys) -> bytes:
    return _fixed(f.identity_key, KEY_SIZE, "identity_key")


def _enc_prekeys(f: Prekeys) -> bytes:
    spk = f.signed_prekey
    if not isinstance(spk, bytes) or len(spk) > MAX_SIGNED_PREKEY:
        raise FrameError(f"signed prekey must be at most {MAX_SIGNED_PREKEY} bytes")
    head = _fixed(f.identity_key, KEY_SIZE, "identity_key") + _U16.pack(len(spk)) + spk
    if f.one_time_prekey is None:
        return head + b"\x00"
    return head + b"\x01" + _fixed(f.one_time_prekey, ONE_TIME_PREKEY_SIZE, "one-time prekey")


def _enc_prekey_count(f: PrekeyCount) -> bytes:
    return _U32.pack(_uint(f.remaining, 32, "remaining"))


def _enc_error(f: Error) -> bytes:
    if f.code not in ERROR_CODES:
        raise FrameError(f"unknown error code {f.code!r}")
    reason = f.reason.encode("utf-8")
    if len(reason) > MAX_REASON:
        raise FrameError(f"error reason longer than {MAX_REASON} bytes")
    return _U16.pack(f.code) + _fixed(f.msg_id, ID_SIZE, "msg_id") + _U16.pack(len(reason)) + reason


def _enc_ping(f: Ping | Pong) -> bytes:
    return _U64.pack(_uint(f.nonce, 64, "nonce"))


def _enc_subscribe(f: PresenceSubscribe) -> bytes:
    parts = [_count(len(f.identity_keys), 0, MAX_SUBSCRIBE, "identity")]
    parts += [_fixed(k, KEY_SIZE, "identity_key") for k in f.identity_keys]
    return b"".join(parts)


def _enc_presence(f: Presence) -> bytes:
    if not isinstance(f.online, bool):
        raise FrameError("presence 'online' must be a bool")
    return _fixed(f.identity_key, KEY_SIZE, "identity_key") + (b"\x01" if f.online else b"\x00")


def _nameplate(value: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NAMEPLATE:
        raise FrameError(f"nameplate must be 1..{MAX_NAMEPLATE}")
    return _U32.pack(value)


def _enc_invite_open(f: InviteOpen) -> bytes:
    return b""


def _enc_invite_nameplate(f: InviteOpened | InviteJoin) -> bytes:
    return _nameplate(f.nameplate)


def _enc_invite_data(f: InviteData) -> bytes:
    if not isinstance(f.payload, bytes) or not 1 <= len(f.payload) <= MAX_INVITE_DATA:
        raise FrameError(f"invite payload must be 1..{MAX_INVITE_DATA} bytes")
    return _nameplate(f.nameplate) + f.payload


def _enc_invite_closed(f: InviteClosed) -> bytes:
    # Nameplate 0: an InviteOpen refused before any nameplate was allocated.
    if f.reason not in INVITE_REASONS:
        raise FrameError(f"unknown invite close reason {f.reason!r}")
    plate = _U32.pack(_uint(f.nameplate, 32, "nameplate"))
    return plate + bytes((f.reason,))


_ENCODERS: Final[dict[type, tuple[int, Callable[[object], bytes]]]] = {
    Send: (T_SEND, _enc_send),  # type: ignore[dict-item]
    SendMulti: (T_SEND_MULTI, _enc_send_multi),  # type: ignore[dict-item]
    Accepted: (T_ACCEPTED, _enc_accepted),  # type: ignore[dict-item]
    Delivered: (T_DELIVERED, _enc_delivered),  # type: ignore[dict-item]
    Deliver: (T_DELIVER, _enc_deliver),  # type: ignore[dict-item]
    Ack: (T_ACK, _enc_ack),  # type: ignore[dict-item]
    Synced: (T_SYNCED, _enc_synced),  # type: ignore[dict-item]
    PublishPrekeys: (T_PUBLISH_PREKEYS, _enc_publish),  # type: ignore[dict-item]
    FetchPrekeys: (T_FETCH_PREKEYS, _enc_fetch),  # type: ignore[dict-item]
    Prekeys: (T_PREKEYS, _enc_prekeys),  # type: ignore[dict-item]
    PrekeyCount: (T_PREKEY_COUNT, _enc_prekey_count),  # type: ignore[dict-item]
    Error: (T_ERROR, _enc_error),  # type: ignore[dict-item]
    Ping: (T_PING, _enc_ping),  # type: ignore[dict-item]
    Pong: (T_PONG, _enc_ping),  # type: ignore[dict-item]
    PresenceSubscribe: (T_PRESENCE_SUBSCRIBE, _enc_subscribe),  # type: ignore[dict-item]
    Presence: (T_PRESENCE, _enc_presence),  # type: ignore[dict-item]
    InviteOpen: (T_INVITE_OPEN, _enc_invite_open),  # type: ignore[dict-item]
    InviteOpened: (T_INVITE_OPENED, _enc_invite_nameplate),  # type: ignore[dict-item]
    InviteJoin: (T_INVITE_JOIN, _enc_invite_nameplate),  # type: ignore[dict-item]
    InviteData: (T_INVITE_DATA, _enc_invite_data),  # type: ignore[dict-item]
    InviteClosed: (T_INVITE_CLOSED, _enc_invite_closed),  # type: ignore[dict-item]
}


def _frame(ftype: int, body: bytes) -> bytes:
    length = HEADER_SIZE + len(body)
    if length > MAX_FRAME:
        raise FrameTooLargeError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return _PREFIX.pack(length, VERSION, ftype) + body


def encode(frame: Frame) -> bytes:
    """The one canonical encoding of ``frame``; FrameError if it breaks a rule."""
    entry = _ENCODERS.get(type(frame))
    if entry is None:
        raise FrameError(f"not a frame: {type(frame).__name__}")
    ftype, encoder = entry
    return _frame(ftype, encoder(frame))


def encode_deliver(msg_id: bytes, sender_key: bytes, timestamp_ms: int, payload: bytes) -> bytes:
    """Deliver without building a dataclass: the relay's hot path.

    The caller passes fields that came out of a decoded Send or the store, so
    they already have the right sizes; only the length prefix is computed.
    """
    length = HEADER_SIZE + ID_SIZE + KEY_SIZE + 8 + len(payload)
    return b"".join(
        (
            _PREFIX.pack(length, VERSION, T_DELIVER),
            msg_id,
            sender_key,
            _U64.pack(timestamp_ms),
            payload,
        )
    )


_ACCEPTED_PREFIX: Final = _PREFIX.pack(HEADER_SIZE + ID_SIZE + 1, VERSION, T_ACCEPTED)
_ACCEPTED_TAIL: Final = {STATUS_STORED: b"\x01", STATUS_DELIVERED: b"\x02"}
_DELIVERED_PREFIX: Final = _PREFIX.pack(HEADER_SIZE + ID_SIZE + MAILBOX_SIZE, VERSION, T_DELIVERED)


def encode_accepted(msg_id: bytes, status: int) -> bytes:
    """``encode(Accepted(msg_id, status))`` without the dataclass (relay hot path).

    ``msg_id`` comes out of a decoded frame, so it has its exact size;
    ``status`` is still checked (KeyError on anything but 1 or 2).
    """
    return _ACCEPTED_PREFIX + msg_id + _ACCEPTED_TAIL[status]


def encode_delivered(msg_id: bytes, mailbox: bytes) -> bytes:
    """``encode(Delivered(msg_id, mailbox))`` from fields of known sizes (deprecated frame)."""
    return _DELIVERED_PREFIX + msg_id + mailbox


# --- decoding --------------------------------------------------------------------------------
# Each decoder gets the whole buffer and the body's [start, end) so that only
# the fields are copied, never the body first.


def _need(end: int, at_least: int, what: str) -> None:
    if end < at_least:
        raise FrameError(f"{what} frame body is too short")


def _exact(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise FrameError(f"{what} frame body has the wrong length")


def _dec_send(d: bytes, s: int, e: int) -> Send:
    if e < s + ID_SIZE + MAILBOX_SIZE + 1:  # _need inlined: the relay's most common frame
        raise FrameError("Send frame body is too short")
    if e - s - ID_SIZE - MAILBOX_SIZE > MAX_PAYLOAD:
        raise FrameTooLargeError(f"Send payload exceeds {MAX_PAYLOAD} bytes")
    return Send(d[s : s + 16], d[s + 16 : s + 48], d[s + 48 : e])


def _dec_send_multi(d: bytes, s: int, e: int) -> SendMulti:
    _need(e, s + ID_SIZE + 2, "SendMulti")
    msg_id = d[s : s + ID_SIZE]
    (n,) = _U16.unpack_from(d, s + ID_SIZE)
    if not 1 <= n <= MAX_RECIPIENTS:
        raise FrameError(f"SendMulti recipient count {n} outside 1..{MAX_RECIPIENTS}")
    pos = s + ID_SIZE + 2
    recipients = []
    seen: set[bytes] = set()
    for _ in range(n):
        _need(e, pos + MAILBOX_SIZE + 4, "SendMulti")
        mailbox = d[pos : pos + MAILBOX_SIZE]
        (size,) = _U32.unpack_from(d, pos + MAILBOX_SIZE)
        pos += MAILBOX_SIZE + 4
        if not 1 <= size <= MAX_PAYLOAD:
            raise FrameError(f"SendMulti payload size {size} outside 1..{MAX_PAYLOAD}")
        _need(e, pos + size, "SendMulti")
        if mailbox in seen:
            raise FrameError("a SendMulti names the same mailbox twice")
        seen.add(mailbox)
        recipients.append((mailbox, d[pos : pos + size]))
        pos += size
    _exact(pos, e, "SendMulti")
    return SendMulti(msg_id, tuple(recipients))


def _dec_accepted(d: bytes, s: int, e: int) -> Accepted:
    _exact(s + ID_SIZE + 1, e, "Accepted")
    status = d[s + ID_SIZE]
    if status not in (STATUS_STORED, STATUS_DELIVERED):
        raise FrameError(f"unknown Accepted status {status}")
    return Accepted(d[s : s + ID_SIZE], status)


def _dec_delivered(d: bytes, s: int, e: int) -> Delivered:
    _exact(s + ID_SIZE + MAILBOX_SIZE, e, "Delivered")
    return Delivered(d[s : s + ID_SIZE], d[s + ID_SIZE : e])


def _dec_deliver(d: bytes, s: int, e: int) -> Deliver:
    head = ID_SIZE + KEY_SIZE + 8
    _need(e, s + head + 1, "Deliver")
    if e - s - head > MAX_PAYLOAD:
        raise FrameTooLargeError(f"Deliver payload exceeds {MAX_PAYLOAD} bytes")
    (ts,) = _U64.unpack_from(d, s + ID_SIZE + KEY_SIZE)
    return Deliver(d[s : s + ID_SIZE], d[s + ID_SIZE : s + ID_SIZE + KEY_SIZE], ts, d[s + head : e])


def _dec_ack(d: bytes, s: int, e: int) -> Ack:
    _need(e, s + 2, "Ack")
    (n,) = _U16.unpack_from(d, s)
    if not 1 <= n <= MAX_ACKS:
        raise FrameError(f"Ack count {n} outside 1..{MAX_ACKS}")
    _exact(s + 2 + n * ACK_ENTRY_SIZE, e, "Ack")
    entries = []
    for pos in range(s + 2, e, ACK_ENTRY_SIZE):
        entries.append((d[pos : pos + KEY_SIZE], d[pos + KEY_SIZE : pos + ACK_ENTRY_SIZE]))
    return Ack(tuple(entries))


def _dec_synced(d: bytes, s: int, e: int) -> Synced:
    _exact(s, e, "Synced")
    return Synced()


def _dec_blob(d: bytes, pos: int, e: int, what: str) -> tuple[bytes, int]:
    _need(e, pos + 2, what)
    (size,) = _U16.unpack_from(d, pos)
    if size > MAX_SIGNED_PREKEY:
        raise FrameError(f"signed prekey longer than {MAX_SIGNED_PREKEY} bytes")
    _need(e, pos + 2 + size, what)
    return d[pos + 2 : pos + 2 + size], pos + 2 + size


def _dec_publish(d: bytes, s: int, e: int) -> PublishPrekeys:
    spk, pos = _dec_blob(d, s, e, "PublishPrekeys")
    _need(e, pos + 2, "PublishPrekeys")
    (n,) = _U16.unpack_from(d, pos)
    if n > MAX_PUBLISH_OTKS:
        raise FrameError(f"PublishPrekeys count {n} exceeds {MAX_PUBLISH_OTKS}")
    pos += 2
    _exact(pos + n * ONE_TIME_PREKEY_SIZE, e, "PublishPrekeys")
    otks = tuple(d[p : p + ONE_TIME_PREKEY_SIZE] for p in range(pos, e, ONE_TIME_PREKEY_SIZE))
    return PublishPrekeys(spk, otks)


def _dec_fetch(d: bytes, s: int, e: int) -> FetchPrekeys:
    _exact(s + KEY_SIZE, e, "FetchPrekeys")
    return FetchPrekeys(d[s:e])


def _dec_prekeys(d: bytes, s: int, e: int) -> Prekeys:
    _need(e, s + KEY_SIZE, "Prekeys")
    spk, pos = _dec_blob(d, s + KEY_SIZE, e, "Prekeys")
    _need(e, pos + 1, "Prekeys")
    has_otk = d[pos]
    if has_otk == 0:
        _exact(pos + 1, e, "Prekeys")
        return Prekeys(d[s : s + KEY_SIZE], spk, None)
    if has_otk != 1:
        raise FrameError("Prekeys has_otk must be 0 or 1")
    _exact(pos + 1 + ONE_TIME_PREKEY_SIZE, e, "Prekeys")
    return Prekeys(d[s : s + KEY_SIZE], spk, d[pos + 1 : e])


def _dec_prekey_count(d: bytes, s: int, e: int) -> PrekeyCount:
    _exact(s + 4, e, "PrekeyCount")
    return PrekeyCount(_U32.unpack_from(d, s)[0])


def _dec_error(d: bytes, s: int, e: int) -> Error:
    _need(e, s + 2 + ID_SIZE + 2, "Error")
    (code,) = _U16.unpack_from(d, s)
    if code not in ERROR_CODES:
        raise FrameError(f"unknown error code {code}")
    (size,) = _U16.unpack_from(d, s + 2 + ID_SIZE)
    if size > MAX_REASON:
        raise FrameError(f"error reason longer than {MAX_REASON} bytes")
    pos = s + 2 + ID_SIZE + 2
    _exact(pos + size, e, "Error")
    try:
        reason = d[pos:e].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrameError("error reason is not valid UTF-8") from exc
    return Error(code, d[s + 2 : s + 2 + ID_SIZE], reason)


def _dec_ping(d: bytes, s: int, e: int) -> Ping:
    _exact(s + 8, e, "Ping")
    return Ping(_U64.unpack_from(d, s)[0])


def _dec_pong(d: bytes, s: int, e: int) -> Pong:
    _exact(s + 8, e, "Pong")
    return Pong(_U64.unpack_from(d, s)[0])


def _dec_subscribe(d: bytes, s: int, e: int) -> PresenceSubscribe:
    _need(e, s + 2, "PresenceSubscribe")
    (n,) = _U16.unpack_from(d, s)
    if n > MAX_SUBSCRIBE:
        raise FrameError(f"PresenceSubscribe count {n} exceeds {MAX_SUBSCRIBE}")
    _exact(s + 2 + n * KEY_SIZE, e, "PresenceSubscribe")
    return PresenceSubscribe(tuple(d[p : p + KEY_SIZE] for p in range(s + 2, e, KEY_SIZE)))


def _dec_presence(d: bytes, s: int, e: int) -> Presence:
    _exact(s + KEY_SIZE + 1, e, "Presence")
    online = d[s + KEY_SIZE]
    if online > 1:
        raise FrameError("Presence online flag must be 0 or 1")
    return Presence(d[s : s + KEY_SIZE], online == 1)


def _dec_nameplate(d: bytes, s: int, what: str) -> int:
    (value,) = _U32.unpack_from(d, s)
    if value == 0:
        raise FrameError(f"{what} nameplate must not be 0")
    return int(value)


def _dec_invite_open(d: bytes, s: int, e: int) -> InviteOpen:
    _exact(s, e, "InviteOpen")
    return InviteOpen()


def _dec_invite_opened(d: bytes, s: int, e: int) -> InviteOpened:
    _exact(s + 4, e, "InviteOpened")
    return InviteOpened(_dec_nameplate(d, s, "InviteOpened"))


def _dec_invite_join(d: bytes, s: int, e: int) -> InviteJoin:
    _exact(s + 4, e, "InviteJoin")
    return InviteJoin(_dec_nameplate(d, s, "InviteJoin"))


def _dec_invite_data(d: bytes, s: int, e: int) -> InviteData:
    _need(e, s + 4 + 1, "InviteData")
    if e - s - 4 > MAX_INVITE_DATA:
        raise FrameError(f"InviteData payload exceeds {MAX_INVITE_DATA} bytes")
    return InviteData(_dec_nameplate(d, s, "InviteData"), d[s + 4 : e])


def _dec_invite_closed(d: bytes, s: int, e: int) -> InviteClosed:
    _exact(s + 5, e, "InviteClosed")
    reason = d[s + 4]
    if reason not in INVITE_REASONS:
        raise FrameError(f"unknown invite close reason {reason}")
    return InviteClosed(_U32.unpack_from(d, s)[0], reason)


_DECODERS: Final[dict[int, Callable[[bytes, int, int], Frame]]] = {
    T_SEND: _dec_send,
    T_SEND_MULTI: _dec_send_multi,
    T_ACCEPTED: _dec_accepted,
    T_DELIVERED: _dec_delivered,
    T_DELIVER: _dec_deliver,
    T_ACK: _dec_ack,
    T_SYNCED: _dec_synced,
    T_PUBLISH_PREKEYS: _dec_publish,
    T_FETCH_PREKEYS: _dec_fetch,
    T_PREKEYS: _dec_prekeys,
    T_PREKEY_COUNT: _dec_prekey_count,
    T_ERROR: _dec_error,
    T_PING: _dec_ping,
    T_PONG: _dec_pong,
    T_PRESENCE_SUBSCRIBE: _dec_subscribe,
    T_PRESENCE: _dec_presence,
    T_INVITE_OPEN: _dec_invite_open,
    T_INVITE_OPENED: _dec_invite_opened,
    T_INVITE_JOIN: _dec_invite_join,
    T_INVITE_DATA: _dec_invite_data,
    T_INVITE_CLOSED: _dec_invite_closed,
}


def check_length(length: int) -> None:
    """Refuse a length prefix before a single body byte is buffered."""
    if length < HEADER_SIZE:
        raise FrameError(f"frame length {length} is shorter than the 2-byte header")
    if length > MAX_FRAME:
        raise FrameTooLargeError(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")


def _parse(data: bytes, limit: int = 0) -> tuple[list[Frame], int, int]:
    """Parse every complete frame; return (frames, bytes consumed, bytes needed next).

    With ``limit``, stop after the frame that reaches ``limit`` bytes consumed (the
    rest, complete frames included, is left for the next call).
    """
    frames: list[Frame] = []
    pos = 0
    n = len(data)
    n_stop = limit if limit and limit < n else n
    unpack_length = _U32.unpack_from
    decoders = _DECODERS
    append = frames.append
    while n - pos >= LENGTH_SIZE and pos < n_stop:
        (length,) = unpack_length(data, pos)
        check_length(length)
        end = pos + LENGTH_SIZE + length
        if end > n:
            return frames, pos, end - pos
        version = data[pos + LENGTH_SIZE]
        if version != VERSION:
            raise FrameError(f"unsupported frame version {version}")
        ftype = data[pos + LENGTH_SIZE + 1]
        decoder = decoders.get(ftype)
        if decoder is None:
            raise FrameError(f"unknown frame type 0x{ftype:02x}")
        append(decoder(data, pos + LENGTH_SIZE + HEADER_SIZE, end))
        pos = end
    return frames, pos, LENGTH_SIZE


class FrameDecoder:
    """Incremental decoder: feed any chunks, get every complete frame.

    Bytes are only buffered while a frame is incomplete, and a frame is only
    reassembled (one copy) when its last byte has arrived, so a 1 MiB frame
    arriving in small records costs O(size), not O(size^2).

    ``feed(data, limit)`` decodes only about ``limit`` bytes of frames and keeps the
    rest undecoded (``more`` is then true; ``feed(b"", limit)`` continues): the relay
    decodes a bounded amount per connection per turn, so what waits behind a frame it
    must hold stays compact bytes.
    """

    __slots__ = ("_buf", "_failed", "_need")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = LENGTH_SIZE
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def buffered(self) -> int:
        """Bytes held undecoded: an incomplete frame, or frames left by a ``limit``."""
        return len(self._buf)

    @property
    def more(self) -> bool:
        """True when buffered bytes may already hold a complete frame (``limit`` stopped)."""
        return len(self._buf) >= self._need

    def feed(self, data: bytes, limit: int = 0) -> list[Frame]:
        """Return the frames completed by ``data`` ([] means: need more data).

        ``limit`` (0: none): stop decoding once about that many bytes of frames are
        decoded; the rest waits in the buffer (see ``more``).
        Raises FrameError at the first rule broken; frames decoded earlier in
        the same chunk are then discarded with the connection.
        """
        if self._failed:
            raise FrameError("frame stream already failed")
        buf = self._buf
        if type(data) is not bytes:
            data = bytes(data)
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        try:
            frames, pos, need = _parse(data, limit)
        except FrameError:
            self._failed = True
            raise
        if pos < len(data):
            buf += memoryview(data)[pos:]
        self._need = need
        return frames


def decode(data: bytes) -> Frame:
    """Decode exactly one frame; FrameError for anything short, long or invalid."""
    frames, pos, _ = _parse(bytes(data))
    if len(frames) != 1 or pos != len(data):
        raise FrameError("expected exactly one complete frame")
    return frames[0]
