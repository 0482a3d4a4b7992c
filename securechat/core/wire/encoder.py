"""The one canonical encoding of every frame, and the relay's hot-path encoders (core)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from securechat.core.wire.frames import (
    _PREFIX,
    _U16,
    _U32,
    _U64,
    ERROR_CODES,
    HEADER_SIZE,
    ID_SIZE,
    INVITE_REASONS,
    KEY_SIZE,
    MAILBOX_SIZE,
    MAX_ACKS,
    MAX_FRAME,
    MAX_INVITE_DATA,
    MAX_NAMEPLATE,
    MAX_PAYLOAD,
    MAX_PUBLISH_OTKS,
    MAX_REASON,
    MAX_RECIPIENTS,
    MAX_SIGNED_PREKEY,
    MAX_SUBSCRIBE,
    ONE_TIME_PREKEY_SIZE,
    STATUS_DELIVERED,
    STATUS_STORED,
    T_ACCEPTED,
    T_ACK,
    T_DELIVER,
    T_DELIVERED,
    T_ERROR,
    T_FETCH_PREKEYS,
    T_INVITE_CLOSED,
    T_INVITE_DATA,
    T_INVITE_JOIN,
    T_INVITE_OPEN,
    T_INVITE_OPENED,
    T_PING,
    T_PONG,
    T_PREKEY_COUNT,
    T_PREKEYS,
    T_PRESENCE,
    T_PRESENCE_SUBSCRIBE,
    T_PUBLISH_PREKEYS,
    T_SEND,
    T_SEND_MULTI,
    T_SYNCED,
    VERSION,
    Accepted,
    Ack,
    Deliver,
    Delivered,
    Error,
    FetchPrekeys,
    Frame,
    InviteClosed,
    InviteData,
    InviteJoin,
    InviteOpen,
    InviteOpened,
    Ping,
    Pong,
    PrekeyCount,
    Prekeys,
    Presence,
    PresenceSubscribe,
    PublishPrekeys,
    Send,
    SendMulti,
    Synced,
)
from securechat.errors import FrameError, FrameTooLargeError

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
