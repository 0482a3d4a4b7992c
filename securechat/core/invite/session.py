"""The invite exchange: SPAKE2 under a short code, then each side's public line (core).

Theory of operation (``docs/protocol.md`` section 7)
---------------------------------------------------
Two clients that share nothing but a short code (``7-tiger-universe``) meet
through the relay on the code's *nameplate* (the number) and run SPAKE2
(symmetric, the ``spake2`` package) with the whole code as the password. Each
derives two keys, one per direction, and sends its public identity line
sealed under its direction's key. Opening the other side's line is the key
confirmation: it succeeds only if both used the same code and nobody changed
a byte in between. A relay sees two 35-byte and two 274-byte messages and
learns nothing that helps it guess the code; a wrong guess costs an attacker
the invite (the relay lets one join per nameplate), and the attempt shows on
both sides as "wrong code, or someone tampered".

The opener::

    OPENING --InviteOpened(n)--> WAITING --InviteData(PAKE)--> KEYED --InviteData(IDENTITY)--> DONE
                 (code shown)        (send PAKE + IDENTITY)                 (peer verified)

The joiner (sends ``InviteJoin(n)`` and its PAKE message at once)::

    JOINING --InviteData(PAKE)--> KEYED --InviteData(IDENTITY)--> DONE
              (send IDENTITY)                (peer verified)

Each side sends exactly two messages, and both have sent theirs before either
reaches DONE. Any other frame in any state (a message out of order, of another
nameplate or version, one that does not open, ``InviteClosed``) moves the session
to the terminal FAILED state and raises: one attempt per code, nothing retried,
nothing learned. The module is pure: randomness comes in as ``rng``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from spake2 import SPAKE2_Symmetric

from securechat.core import keys, wire
from securechat.core.invite.words import Code, make_code
from securechat.errors import (
    DeliveryTimeoutError,
    InviteClosedError,
    InviteFailedError,
    ProtocolError,
    SecureChatError,
    UsageError,
)

# --- fixed by the protocol (version 1) ---------------------------------------------------------
VERSION: Final = 1
KIND_PAKE: Final = 1
KIND_IDENTITY: Final = 2
HEADER_SIZE: Final = 2  # version, kind
SPAKE2_ID: Final = b"securechat/v1/invite"  # SPAKE2_Symmetric idSymmetric
SPAKE2_MESSAGE_SIZE: Final = 33  # b"S" (the package's side byte) + a 32-byte Ed25519 element
SPAKE2_SIDE: Final = b"S"
KEY_SIZE: Final = 32
LABEL_OPENER_TO_JOINER: Final = b"securechat/v1/invite/opener-to-joiner"
LABEL_JOINER_TO_OPENER: Final = b"securechat/v1/invite/joiner-to-opener"
# The public line is padded to one size, so the relay does not learn the length of a name.
IDENTITY_PLAINTEXT_SIZE: Final = 256  # u16 length + line + zeros
TAG_SIZE: Final = 16
# Each direction key seals exactly one message, so a fixed nonce never repeats under a key.
NONCE: Final = bytes(12)
PAKE_PAYLOAD_SIZE: Final = HEADER_SIZE + SPAKE2_MESSAGE_SIZE  # 35
IDENTITY_PAYLOAD_SIZE: Final = HEADER_SIZE + IDENTITY_PLAINTEXT_SIZE + TAG_SIZE  # 274
MESSAGES_PER_SIDE: Final = 2  # PAKE, IDENTITY (the relay forwards no more)

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")


class Role(enum.Enum):
    OPENER = "opener"  # ran `securechat invite`, shows the code
    JOINER = "joiner"  # ran `securechat accept CODE`


class State(enum.Enum):
    OPENING = "opening"  # opener: InviteOpen sent, no nameplate yet
    WAITING = "waiting"  # opener: code shown, waiting for a joiner's PAKE message
    JOINING = "joining"  # joiner: InviteJoin and PAKE sent, waiting for the opener's PAKE
    KEYED = "keyed"  # key agreed and our line sent; waiting for the peer's line
    DONE = "done"  # the peer's line opened: verified (terminal)
    FAILED = "failed"  # terminal: anything else happened


# (role, state, what arrived) -> next state; anything not listed fails the session.
TRANSITIONS: Final[dict[tuple[Role, State, str], State]] = {
    (Role.OPENER, State.OPENING, "opened"): State.WAITING,
    (Role.OPENER, State.WAITING, "pake"): State.KEYED,
    (Role.JOINER, State.JOINING, "pake"): State.KEYED,
    (Role.OPENER, State.KEYED, "identity"): State.DONE,
    (Role.JOINER, State.KEYED, "identity"): State.DONE,
}
TERMINAL: Final = frozenset({State.DONE, State.FAILED})


@dataclass(frozen=True, slots=True)
class CodeReady:
    """Opener: the relay gave us a nameplate; show this code."""

    code: Code


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """Opener: someone joined the nameplate and sent a PAKE message (not yet verified)."""


@dataclass(frozen=True, slots=True)
class PeerVerified:
    """The other side knew the code: this is its public identity, authenticated."""

    peer: keys.PublicIdentity


Event: TypeAlias = CodeReady | PeerJoined | PeerVerified
Step: TypeAlias = tuple[list[Event], list[wire.Frame]]


class InviteSession:
    """One side of one invite: frames in, events and frames out (see the module doc)."""

    def __init__(
        self,
        role: Role,
        own: keys.PublicIdentity,
        rng: Callable[[int], bytes],
        code: Code | None = None,
    ) -> None:
        self.role = role
        self.state = State.OPENING if role is Role.OPENER else State.JOINING
        self.code = code
        self._own_plaintext = _pad_line(own.to_line())
        self._rng = rng
        self._spake: SPAKE2_Symmetric | None = None
        self._send_key = b""
        self._receive_key = b""

    @classmethod
    def opener(cls, own: keys.PublicIdentity, rng: Callable[[int], bytes]) -> InviteSession:
        return cls(Role.OPENER, own, rng)

    @classmethod
    def joiner(
        cls, code: Code, own: keys.PublicIdentity, rng: Callable[[int], bytes]
    ) -> InviteSession:
        return cls(Role.JOINER, own, rng, code)

    @property
    def nameplate(self) -> int:
        return self.code.nameplate if self.code is not None else 0

    def start(self) -> list[wire.Frame]:
        """The first frames to send: ``InviteOpen``, or ``InviteJoin`` + our PAKE message."""
        if self.role is Role.OPENER:
            return [wire.InviteOpen()]
        assert self.code is not None
        return [wire.InviteJoin(self.nameplate), self._pake_frame()]

    def receive(self, frame: wire.Frame) -> Step:
        """Feed one relay frame of this invite; raise (and fail for good) on anything wrong."""
        if self.state in TERMINAL:
            raise ProtocolError(f"the invite is already {self.state.value}")
        try:
            return self._receive(frame)
        except SecureChatError:
            self._fail()
            raise

    # --- transitions ----------------------------------------------------------------------------

    def _receive(self, frame: wire.Frame) -> Step:
        if isinstance(frame, wire.InviteClosed):
            raise closed_error(frame.reason, frame.nameplate or self.nameplate)
        if isinstance(frame, wire.InviteOpened):
            self._advance("opened")
            self.code = make_code(frame.nameplate, self._rng)
            return [CodeReady(self.code)], []
        if not isinstance(frame, wire.InviteData) or frame.nameplate != self.nameplate:
            raise InviteFailedError()
        kind = _kind(frame.payload)
        if kind == KIND_PAKE:
            return self._on_pake(frame.payload)
        self._advance("identity")
        peer = self._open_identity(frame.payload)
        return [PeerVerified(peer)], []

    def _advance(self, what: str) -> None:
        nxt = TRANSITIONS.get((self.role, self.state, what))
        if nxt is None:
            raise InviteFailedError()
        self.state = nxt

    def _on_pake(self, payload: bytes) -> Step:
        self._advance("pake")
        out: list[wire.Frame] = []
        if self.role is Role.OPENER:
            out.append(self._pake_frame())
        key = self._finish(payload[HEADER_SIZE:])
        ours, theirs = (
            (LABEL_OPENER_TO_JOINER, LABEL_JOINER_TO_OPENER)
            if self.role is Role.OPENER
            else (LABEL_JOINER_TO_OPENER, LABEL_OPENER_TO_JOINER)
        )
        self._send_key = direction_key(key, ours, self.nameplate)
        self._receive_key = direction_key(key, theirs, self.nameplate)
        out.append(self._identity_frame())
        events: list[Event] = [PeerJoined()] if self.role is Role.OPENER else []
        return events, out

    # --- messages ---------------------------------------------------------------------------------

    def _pake_frame(self) -> wire.InviteData:
        assert self.code is not None and self._spake is None
        self._spake = SPAKE2_Symmetric(
            self.code.password, idSymmetric=SPAKE2_ID, entropy_f=self._rng
        )
        message = self._spake.start()
        return wire.InviteData(self.nameplate, _header(KIND_PAKE) + message)

    def _finish(self, message: bytes) -> bytes:
        """SPAKE2's shared key; every way the other message can be bad is one failure."""
        if len(message) != SPAKE2_MESSAGE_SIZE or message[:1] != SPAKE2_SIDE:
            raise InviteFailedError()  # (checked here: the package only asserts the side)
        assert self._spake is not None
        try:
            key = self._spake.finish(message)
        except Exception as exc:
            # ReflectionThwarted, ...: for us each is a message that was not the peer's.
            raise InviteFailedError() from exc
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise InviteFailedError()
        return key

    def _identity_frame(self) -> wire.InviteData:
        header = _header(KIND_IDENTITY)
        sealed = ChaCha20Poly1305(self._send_key).encrypt(
            NONCE, self._own_plaintext, header + _U32.pack(self.nameplate)
        )
        return wire.InviteData(self.nameplate, header + sealed)

    def _open_identity(self, payload: bytes) -> keys.PublicIdentity:
        if len(payload) != IDENTITY_PAYLOAD_SIZE:
            raise InviteFailedError()
        header = payload[:HEADER_SIZE]
        try:
            plain = ChaCha20Poly1305(self._receive_key).decrypt(
                NONCE, payload[HEADER_SIZE:], header + _U32.pack(self.nameplate)
            )
        except InvalidTag as exc:
            raise InviteFailedError() from exc
        return _parse_line(plain)

    def _fail(self) -> None:
        self.state = State.FAILED
        self._spake = None
        self._send_key = self._receive_key = b""


# --- helpers -----------------------------------------------------------------------------------


def direction_key(spake_key: bytes, label: bytes, nameplate: int) -> bytes:
    """HKDF-SHA256 of SPAKE2's key, one per direction, bound to the nameplate."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=label + _U32.pack(nameplate)
    ).derive(spake_key)


def _header(kind: int) -> bytes:
    return bytes((VERSION, kind))


def _kind(payload: bytes) -> int:
    """The message kind, after checking the version and the exact size of that kind."""
    if len(payload) < HEADER_SIZE or payload[0] != VERSION:
        raise InviteFailedError()
    kind = payload[1]
    expected = {KIND_PAKE: PAKE_PAYLOAD_SIZE, KIND_IDENTITY: IDENTITY_PAYLOAD_SIZE}.get(kind)
    if expected is None or len(payload) != expected:
        raise InviteFailedError()
    return kind


def _pad_line(line: str) -> bytes:
    data = line.encode("utf-8")
    if len(data) > IDENTITY_PLAINTEXT_SIZE - _U16.size:
        raise UsageError("this identity's public line is too long to send in an invite")
    body = _U16.pack(len(data)) + data
    return body + bytes(IDENTITY_PLAINTEXT_SIZE - len(body))


def _parse_line(plain: bytes) -> keys.PublicIdentity:
    """The peer's line out of its padding (one canonical form: zeros only after it).

    The message opened, so it comes from whoever knew the code: a malformed line
    is that side's bug, reported as a protocol error rather than as tampering.
    """
    (size,) = _U16.unpack_from(plain, 0)
    end = _U16.size + size
    if end > len(plain) or any(plain[end:]):
        raise ProtocolError("the other side sent a malformed invite message")
    try:
        return keys.PublicIdentity.from_line(plain[_U16.size : end].decode("utf-8"))
    except (UnicodeDecodeError, SecureChatError) as exc:
        raise ProtocolError(f"the other side sent an invalid public key line: {exc}") from exc


_CLOSED_TEXT: Final = {
    wire.INVITE_NO_SUCH: "the relay has no open invite {n} (it expired, its inviter stopped "
    "waiting, or the number is mistyped); ask for a new code",
    wire.INVITE_USED: "invite {n} was already used: someone joined it before you. Ask for a new "
    "code, and tell its inviter: if that was not you, someone may have tried to intercept it",
    wire.INVITE_PEER_LEFT: "the other side of invite {n} left before the exchange was complete "
    "(it stopped, or the exchange did not authenticate on its side); nothing was recorded",
    wire.INVITE_EXPIRED: "invite {n} expired before the exchange was complete",
    wire.INVITE_TOO_MANY: "the relay refused a new invite: too many invites are open (yours, "
    "your network's or the relay's); try again in a few minutes",
    wire.INVITE_VIOLATION: "the other side of invite {n} broke the protocol (too many messages)",
}


def closed_error(reason: int, nameplate: int) -> SecureChatError:
    """The error for a relay's ``InviteClosed``; an expiry is a timeout (nobody came in time)."""
    text = _CLOSED_TEXT.get(reason, "the relay closed invite {n}").format(n=nameplate)
    if reason == wire.INVITE_EXPIRED:
        return DeliveryTimeoutError(text)
    return InviteClosedError(text)
