"""Client<->relay frames: sizes, limits, codes and the frame types (core).

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

import struct
from dataclasses import dataclass
from typing import Final, TypeAlias

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
