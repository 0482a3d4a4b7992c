"""Strict decoding of frames, one at a time or incrementally from a stream (core)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from securechat.core.wire.frames import (
    _U16,
    _U32,
    _U64,
    ACK_ENTRY_SIZE,
    ERROR_CODES,
    HEADER_SIZE,
    ID_SIZE,
    INVITE_REASONS,
    KEY_SIZE,
    LENGTH_SIZE,
    MAILBOX_SIZE,
    MAX_ACKS,
    MAX_FRAME,
    MAX_INVITE_DATA,
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
