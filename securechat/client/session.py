"""The client's rules without I/O: frames, the store and the time in; frames and events out.

Like h11's ``Connection`` for one chat identity: the pump
(:mod:`securechat.client.messenger`) reads frames from the relay link, feeds
them to :meth:`ClientSession.receive`, writes the frames the session returns
and hands its events to the interface. Nothing here opens a socket, starts a
thread or reads a clock: ``now_ms`` (wall clock, milliseconds) and the
randomness (``rng``) are passed in, so every rule has an in-memory test
(``tests/unit/test_client_session.py``). It is not thread-safe: one caller at a
time (the pump holds a lock around every call).

States of the link, told by the pump::

    OFFLINE --connection_made--> ONLINE --connection_lost--> OFFLINE

ONLINE: the outbox has been resent (before anything new), frames returned are
written at once. OFFLINE: frames returned are dropped by the pump, which is
safe because everything that matters is in the outbox first.

The rules, and where they live (docs/protocol.md, section 5, is the contract):

* sending, holding messages for prekeys: :mod:`~securechat.client.outgoing` and
  :mod:`~securechat.client.prekeys`;
* marks (✓ relay, ✓✓ device) and receipts owed: :mod:`~securechat.client.receipts`;
* here: receiving. Each ``Deliver`` is opened and committed (ratchet, history,
  receipt due: one transaction) *before* its ``Ack`` is returned, so a crash
  makes the relay deliver it again and duplicate detection hides the copy.
  Duplicates and forgeries are acknowledged too, never shown; a message that
  does not open is reported. Prekeys are published once per connection, then
  only when the relay's count is low or the signed prekey is due (hourly check);
  answering every ``PrekeyCount`` would loop forever. ``Error(REPLACED)`` is
  fatal: reconnecting would replace the other connection in turn.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Final

from securechat.client.e2e_store import E2EStore
from securechat.client.events import (
    MessageEvent,
    NoticeEvent,
    Output,
    PresenceEvent,
    Status,
)
from securechat.client.outgoing import Outgoing
from securechat.client.peers import Conversation, KnownPeers, direct_conv_id, group_conv_id
from securechat.client.receipts import Receipts, due, remember
from securechat.client.store import ClientStore
from securechat.core import e2e, envelope, keys, wire
from securechat.errors import (
    InUseError,
    PeerKeyChangedError,
    ProtocolError,
    SecureChatError,
    TrustError,
)

Rng = Callable[[int], bytes]
Tap = Callable[[str, wire.Frame], None]  # ("in" | "out" | "receipt", frame): the demo's view

PREKEY_LOW_WATER: Final = 20  # replenish one-time prekeys below this many
PREKEY_TARGET: Final = 100
ROTATION_CHECK: Final = 3600.0  # seconds between checks that the signed prekey is due
HELD_RETRY: Final = 10.0  # seconds between attempts to release held messages
RETRY_AFTER_REFUSAL: Final = 2.0  # seconds before the outbox is resent after a refusal
MAX_ACK_BATCH: Final = wire.MAX_ACKS


class LinkState(Enum):
    OFFLINE = "offline"
    ONLINE = "online"


class ClientSession:
    """See the module docstring.

    ``receive``: False for send-only clients (``securechat send``), which leave
    incoming messages with the relay (unacknowledged, so it keeps them) for the
    next receive or talk. ``watch``: peers whose presence is reported.
    """

    def __init__(
        self,
        identity: keys.Identity,
        store: ClientStore,
        rng: Rng,
        *,
        peers: KnownPeers | None = None,
        keep_history: bool = True,
        watch: Iterable[keys.PublicIdentity] = (),
        receive: bool = True,
        tap: Tap | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.peers = peers if peers is not None else KnownPeers(store)
        self._rng = rng
        self._receive = receive
        self._tap = tap
        self._keep_history = keep_history
        self._watch = tuple(watch)
        self._e2e = E2EStore(identity, store)
        self._receipts = Receipts(store, self._e2e, rng, tap)
        self._outgoing = Outgoing(
            identity, store, self._e2e, self._receipts, rng, keep_history=keep_history, tap=tap
        )
        self.link = LinkState.OFFLINE
        self.published = False  # prekeys published on the current connection
        self.synced = False  # the relay said it delivered everything it stored for us
        self.fatal: SecureChatError | None = None
        # Messages the relay refused for good (TOO_LARGE): id -> its reason. They leave
        # the outbox, so a command that sent them must say so instead of exiting 0.
        self.refused: OrderedDict[bytes, str] = OrderedDict()
        self.received_count = 0
        self._retry_at = 0  # when to resend the outbox after a refusal (0: not due)
        self._last_rotation = self._last_held = 0

    @property
    def state(self) -> e2e.E2EState:
        return self._e2e.state

    # --- the link ------------------------------------------------------------------------

    def connection_made(self, now_ms: int) -> Output:
        """The link is up: subscribe to presence, then resend the whole outbox, in order."""
        self.link, self._outgoing.online = LinkState.ONLINE, True
        self.published, self._retry_at = False, 0
        self._last_rotation = self._last_held = now_ms
        out = Output()
        if self._watch:
            out.frames.append(wire.PresenceSubscribe(tuple(p.dh for p in self._watch)))
        out.frames += self._outbox_frames()
        return out

    def connection_lost(self) -> None:
        self.link, self._outgoing.online = LinkState.OFFLINE, False
        self._outgoing.fetches.connection_lost()

    def _outbox_frames(self) -> list[wire.Frame]:
        return [wire.decode(item.frame) for item in self.store.outbox()]

    # --- what the user does --------------------------------------------------------------

    def send_text(self, conv: Conversation, text: str, now_ms: int) -> tuple[bytes, Output]:
        """Seal, persist and return the frame; or hold until prekeys come. Return the id too.

        Raises PeerKeyChangedError for a member whose key changed (nothing is
        stored), UsageError for a text that cannot be sent (too long, or too long
        for one frame to the whole group).
        """
        for peer in conv.peers:
            self.peers.check(peer)
        out = Output()
        msg_id = self._outgoing.send_text(conv, text, now_ms, out)
        return msg_id, out

    def check_peers(self, peers: Iterable[keys.PublicIdentity]) -> dict[str, PeerKeyChangedError]:
        """Record new peers (trust on first use); return ``{name: why}`` for changed keys."""
        changed = {}
        for peer in peers:
            try:
                self.peers.check(peer)
            except PeerKeyChangedError as exc:
                changed[peer.name] = exc
        return changed

    def watch(self, peers: Iterable[keys.PublicIdentity]) -> Output:
        """Report these peers' presence from now on (replaces the list)."""
        self._watch = tuple(peers)
        out = Output()
        if self.link is LinkState.ONLINE:
            out.frames.append(wire.PresenceSubscribe(tuple(p.dh for p in self._watch)))
        return out

    def pending(self) -> int:
        """Messages the user wrote that the relay has not accepted yet (held ones too)."""
        return self.store.outbox_count() + self.store.held_count()

    def history(self, conv: str, limit: int) -> list[dict[str, object]]:
        return [
            {**e.record, "status": e.status, "msg_id": e.msg_id.hex()}
            for e in self.store.history(conv, limit)
        ]

    # --- time ----------------------------------------------------------------------------

    def tick(self, now_ms: int) -> Output:
        """Timers: a refused outbox resent, the signed prekey rotated, held messages retried."""
        out = Output()
        if self.link is not LinkState.ONLINE:
            return out
        if self._retry_at and now_ms >= self._retry_at:
            self._retry_at = 0
            out.frames += self._outbox_frames()
        if due(self._last_rotation, ROTATION_CHECK, now_ms):
            self._last_rotation = now_ms
            self._publish_prekeys(None, now_ms, out)
        release = self._outgoing.fetches.expire(now_ms)
        if due(self._last_held, HELD_RETRY, now_ms):
            self._last_held = now_ms
            self._outgoing.fetches.retry()
            release = release or self.store.held_count() > 0
        if release:
            self._outgoing.release(now_ms, out)
        return out

    # --- what the relay sends ------------------------------------------------------------

    def receive(self, frames: Iterable[wire.Frame], now_ms: int) -> Output:
        """Handle a batch of frames; the acknowledgements come after every commit."""
        out = Output()
        acks: list[tuple[bytes, bytes]] = []
        release = False
        for frame in frames:
            if isinstance(frame, wire.Deliver):
                if not self._receive:
                    continue
                if self._tap is not None:
                    self._tap("in", frame)
                self._on_deliver(frame, now_ms, out)
                acks.append((frame.sender_key, frame.msg_id))
            elif isinstance(frame, wire.Accepted):
                self._receipts.accepted(frame.msg_id, out)
            elif isinstance(frame, wire.PrekeyCount):
                self._publish_prekeys(frame.remaining, now_ms, out)
            elif isinstance(frame, wire.Prekeys):
                release |= self._outgoing.fetches.answer(frame)
            elif isinstance(frame, wire.Synced):
                self.synced = release = True
                self._outgoing.fetches.retry()
            elif isinstance(frame, wire.Error):
                self._on_error(frame, now_ms, out)
            elif isinstance(frame, wire.Presence):
                self._on_presence(frame, out)
            # wire.Delivered: the relay's own receipt, not shown (✓✓ comes end to end)
        for start in range(0, len(acks), MAX_ACK_BATCH):
            out.frames.append(wire.Ack(tuple(acks[start : start + MAX_ACK_BATCH])))
        if release:
            self._outgoing.release(now_ms, out)
        self._receipts.flush(now_ms, out)
        return out

    def _on_deliver(self, frame: wire.Deliver, now_ms: int, out: Output) -> None:
        """Open and commit (with the receipt due); the caller acknowledges."""
        trusted = self.peers.trusted_identity(frame.sender_key)
        try:
            received = self.state.decrypt(
                frame.sender_key, frame.payload, now_ms, msg_id=frame.msg_id, trusted=trusted
            )
        except (ProtocolError, TrustError) as exc:
            label = (
                trusted.name
                if trusted is not None
                else "unknown key " + frame.sender_key.hex()[:16]
            )
            out.events.append(
                NoticeEvent(f"rejected a message claiming to be from {label}: {exc}", error=True)
            )
            self._receipts.owe_rejected(frame, now_ms)
            self._e2e.save_if_changed()  # e.g. an expired signed prekey was dropped
            return
        if received.duplicate:
            self._e2e.save_if_changed()  # a re-sent id still advanced the ratchet
            return
        if received.content.is_control:
            with self._e2e.transaction():
                self._receipts.on_control(
                    received, lambda: self.peers.name_of(received.sender)[0], out
                )
            return
        name, verified = self.peers.name_of(received.sender)
        fresh = self._store_received(received, name, verified, frame.timestamp_ms, now_ms)
        if received.fallback and self.state.has_prekeys:
            out.events.append(
                NoticeEvent(
                    f"{name} started this conversation without your prekeys (the no-prekey "
                    "mode: weaker if your key is ever stolen). If they had your prekeys, the "
                    "relay may be interfering; compare safety numbers",
                    error=True,
                )
            )
        if fresh:
            self.received_count += 1
            out.events.append(_message_event(received, self._conv_of(received), name, verified))

    def _store_received(
        self, received: e2e.Received, name: str, verified: bool, relay_ms: int, now_ms: int
    ) -> bool:
        """History line and receipt due, with the ratchet, in one transaction; False if seen.

        The line keeps the three times (the sender's clock, the relay's, ours) and who
        the sender and the group's members are (X25519 keys), for a daemon's events.
        """
        content = received.content
        with self._e2e.transaction():
            fresh = True
            if self._keep_history:
                record = {
                    "sender": name,
                    "fp": received.sender.fingerprint,
                    "sent_ms": content.sent_ms,
                    "text": content.text,
                    "out": False,
                    "verified": verified,
                    "from": received.sender.dh.hex(),
                    "relay_ms": relay_ms,
                    "received_ms": now_ms,
                }
                if content.group is not None:
                    record["members"] = [m.hex() for m in content.group.members]
                fresh = self.store.history_add(
                    self._conv_of(received), content.msg_id, Status.RECEIVED, record
                )
            self.store.receipt_due(received.sender.dh, envelope.CONTENT_RECEIPT, content.msg_id)
        return fresh

    def _conv_of(self, received: e2e.Received) -> str:
        if received.content.group is not None:
            return group_conv_id(received.content.group)
        return direct_conv_id(self.identity.public.dh, received.sender.dh)

    def _publish_prekeys(self, remaining: int | None, now_ms: int, out: Output) -> None:
        """Publish once per connection, then only when something changed.

        ``remaining`` None: the periodic check for the weekly signed-prekey rotation.
        """
        low = remaining is not None and remaining < PREKEY_LOW_WATER
        if self.published and not low and not self.state.rotation_due(now_ms):
            return
        wanted = PREKEY_TARGET - remaining if low and remaining is not None else 0
        signed, fresh = self.state.make_prekeys(
            self._rng, now_ms, one_time=min(wanted, wire.MAX_PUBLISH_OTKS)
        )
        self._e2e.save_if_changed()
        self.published = True
        out.frames.append(wire.PublishPrekeys(signed, fresh))

    def _on_error(self, frame: wire.Error, now_ms: int, out: Output) -> None:
        reason = wire.ERROR_NAMES.get(frame.code, str(frame.code))
        if frame.code == wire.REPLACED:
            self.fatal = InUseError(
                "another connection with this identity (a securechat process here or on "
                "another machine) replaced this one at the relay; this one stopped",
                hint="run one client per identity",
            )
            out.events.append(NoticeEvent(self.fatal.full_text(), error=True))
            return
        if frame.msg_id != wire.NO_ID and frame.code == wire.TOO_LARGE:
            with self.store.transaction():
                self.store.outbox_remove(frame.msg_id)
            remember(self.refused, frame.msg_id, frame.reason)
            out.events.append(
                NoticeEvent(f"the relay refused a message as too large: {frame.reason}", error=True)
            )
            return
        if frame.msg_id != wire.NO_ID:
            # Quota, rate or storage trouble at the relay: keep it and try again later.
            self._retry_at = now_ms + int(RETRY_AFTER_REFUSAL * 1000)
        out.events.append(NoticeEvent(f"relay: {reason}: {frame.reason}", error=True))

    def _on_presence(self, frame: wire.Presence, out: Output) -> None:
        for peer in self._watch:
            if peer.dh == frame.identity_key:
                out.events.append(PresenceEvent(peer.name, frame.online))


def _message_event(received: e2e.Received, conv: str, name: str, verified: bool) -> MessageEvent:
    content = received.content
    return MessageEvent(
        conv,
        content.msg_id,
        name,
        received.sender.fingerprint,
        verified,
        content.sent_ms,
        content.text,
        content.group is not None,
    )
