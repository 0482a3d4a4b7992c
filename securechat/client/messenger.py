"""The client engine: sessions, outbox, receipts, history, and the relay connection (shell).

Theory of operation
-------------------
One network thread owns the :class:`~securechat.client.link.RelayLink`: it
connects (exponential backoff with full jitter while the relay is away),
resends the outbox, reads frames and handles them. The UI thread calls
:meth:`Messenger.send_text`; everything that touches the E2E state or the
store happens under one lock, and every user-visible change is reported as an
:class:`~securechat.client.events.Event` through ``on_event`` (from either thread).

Never lose a word:
  * ``send_text`` seals the message for every member, then in ONE
    transaction saves the advanced ratchets, queues the exact frame in the
    outbox, and records the history line. Only then does it try the network.
  * An outbox entry leaves the outbox only on the relay's ``Accepted``.
  * An incoming message is acknowledged to the relay only after the ratchet
    state, the history line and the receipt due to its sender are committed
    (one transaction), so a crash makes the relay deliver it again and the
    E2E layer's duplicate detection hides the copy.

Never a silent downgrade: a session is started with the peer's prekey bundle.
Without one (offline, no answer, or a relay that says "none" for a peer that
published prekeys before) the message is *held*, sealed only at rest, and a
notice says why; it goes out, in order, once a bundle arrives. Only a peer
never seen with prekeys gets the documented no-prekey start.

Delivery marks: ``Accepted`` from the relay is the relay's word (✓); ✓✓ comes
only from the recipient's device, an end-to-end RECEIPT it sends after it
decrypted and stored the message. A message that does not open is reported
here, and, when we have a session with the claimed sender, reported back to
it (REJECTED, at most one per peer per :data:`REJECT_INTERVAL`).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from securechat.client.events import (
    STATUS_ACCEPTED,
    STATUS_DELIVERED,
    STATUS_PENDING,
    STATUS_RECEIVED,
    ConnectionEvent,
    Event,
    MessageEvent,
    NoticeEvent,
    PresenceEvent,
    StatusEvent,
)
from securechat.client.link import KnownRelays, RelayLink, split_relays
from securechat.client.peers import Conversation, KnownPeers, direct_conv_id, group_conv_id
from securechat.client.store import ClientStore
from securechat.core import e2e, envelope, keys, wire, x3dh
from securechat.errors import (
    InternalError,
    InUseError,
    ProtocolError,
    RelayKeyChangedError,
    SecureChatError,
    StorageError,
    TransportError,
    TrustError,
    UsageError,
)

__all__ = [  # the event types are re-exported for the shells that import them from here
    "STATUS_ACCEPTED",
    "STATUS_DELIVERED",
    "STATUS_PENDING",
    "STATUS_RECEIVED",
    "ConnectionEvent",
    "Conversation",
    "Event",
    "KnownPeers",
    "MessageEvent",
    "Messenger",
    "NoticeEvent",
    "PresenceEvent",
    "StatusEvent",
    "direct_conv_id",
]

PREKEY_LOW_WATER: Final = 20  # replenish one-time prekeys below this many
PREKEY_TARGET: Final = 100
FETCH_TIMEOUT: Final = 5.0
BACKOFF_INITIAL: Final = 0.25
BACKOFF_MAX: Final = 15.0
POLL_INTERVAL: Final = 0.2
STOP_GRACE: Final = 2.0  # seconds a clean stop waits for the network thread
MAX_TRACKED: Final = 10_000  # sent messages whose recipients and mark are remembered
PING_INTERVAL: Final = 20.0
ROTATION_CHECK: Final = 3600.0  # seconds between checks that the signed prekey is due
HELD_RETRY: Final = 10.0  # seconds between attempts to release held messages
RETRY_AFTER_REFUSAL: Final = 2.0
REJECT_INTERVAL: Final = 60.0  # at most one REJECTED per peer per minute
MAX_ACK_BATCH: Final = wire.MAX_ACKS
PREKEY_PEERS: Final = "prekey_peers"  # meta blob: peers once seen with a bundle


def _now_ms() -> int:
    return int(time.time() * 1000)


def _frame_size(peers: int, padded: int) -> int:
    """The largest SendMulti a message padded to ``padded`` bytes can make (all INITIAL)."""
    copy = envelope.MAX_ENVELOPE_SIZE - envelope.PAD_BUCKETS[-1] + padded
    return wire.HEADER_SIZE + wire.ID_SIZE + 2 + peers * (wire.MAILBOX_SIZE + 4 + copy)


def _check_frame_size(conv: Conversation, content: envelope.Content, padded: int) -> None:
    """Refuse, before sealing, a group message whose SendMulti would exceed the frame limit.

    One frame carries every member's copy: 63 copies of the largest padding bucket
    do not fit, 63 of the next smaller one do. Say how much text would.
    """
    if _frame_size(len(conv.peers), padded) <= wire.MAX_FRAME:
        return
    empty = envelope.Content(content.msg_id, content.sent_ms, "", content.group)
    overhead = len(envelope.unpad(envelope.encode_content(empty)))
    fits = [b for b in envelope.PAD_BUCKETS if _frame_size(len(conv.peers), b) <= wire.MAX_FRAME]
    most = max(fits[-1] - 1 - overhead, 0) if fits else 0
    raise UsageError(
        f"message too long for a group of {len(conv.peers) + 1}: one frame carries every "
        f"member's copy, so at most {most} bytes of text fit"
    )


class Messenger:
    """See the module docstring."""

    LEGACY_E2E_BLOB: Final = "e2e_state"  # schema 1: the whole E2E state in one blob

    def __init__(
        self,
        identity: keys.Identity,
        store: ClientStore,
        relay_address: str,
        known_relays: KnownRelays,
        on_event: Callable[[Event], None],
        *,
        pinned_relay_key: bytes | None = None,
        keep_history: bool = True,
        watch: Iterable[keys.PublicIdentity] = (),
        tap: Callable[[str, wire.Frame], None] | None = None,
        receive: bool = True,
    ) -> None:
        self.identity = identity
        # send-only clients (``securechat send``) leave incoming messages with the
        # relay (unacknowledged, so it keeps them) for the next receive or talk.
        self._receive = receive
        self._tap = tap  # sees message frames as the relay does (the demo shows them)
        self.store = store
        self.peers = KnownPeers(store)
        self.relay_address = relay_address
        # Several addresses (``a:5050,b:5050``): the nodes of one relay cluster, tried in
        # turn; once one of them proved the relay key, every other must present the same.
        self._relays = split_relays(relay_address) if "," in relay_address else [relay_address]
        self._relay_index = 0
        self._cluster_key: bytes | None = None
        self._known_relays = known_relays
        self._pinned = pinned_relay_key
        self._emit = on_event
        self._keep_history = keep_history
        self._watch = tuple(watch)
        self._lock = threading.RLock()
        self._state = self._load_state()
        self._prekey_peers = set(self.store.get_json(PREKEY_PEERS) or ())
        self._link: RelayLink | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held_thread: threading.Thread | None = None
        self._held_wake = threading.Event()
        self._fetches: dict[bytes, tuple[threading.Event, list[wire.Prekeys]]] = {}
        self._retry_at = 0.0
        self._published = False  # prekeys published on the current connection
        self._statuses: OrderedDict[bytes, int] = OrderedDict()  # newest mark per message
        self._recipients: OrderedDict[bytes, frozenset[bytes]] = OrderedDict()
        self._rejected_at: OrderedDict[bytes, float] = OrderedDict()
        self._held_notices: set[str] = set()
        self.synced = threading.Event()
        # Messages the relay refused for good (TOO_LARGE): id -> its reason. They leave
        # the outbox, so a command that sent them must say so instead of exiting 0.
        self.refused: OrderedDict[bytes, str] = OrderedDict()
        self.fatal: SecureChatError | None = None
        # Why the last connection attempt failed (None once connected): lets commands
        # say "connection refused" at once instead of waiting out their timeout.
        self.last_connect_error: SecureChatError | None = None
        self.received_count = 0

    # --- state -------------------------------------------------------------------------------

    def _load_state(self) -> e2e.E2EState:
        """The E2E state from its rows, after moving a schema 1 single blob into rows.

        The move is one transaction (rows written, blob deleted), so a crash
        leaves either the blob or the rows. Rows already there can only be older
        than a blob (a downgraded client wrote it): the blob's core and peers win.
        """
        with self.store.transaction():
            legacy = self.store.get_blob(self.LEGACY_E2E_BLOB)
            if legacy is not None:
                changes = e2e.E2EState.deserialize(self.identity, legacy).take_changes()
                self.store.put_e2e_rows(changes.core, changes.peers)
                self.store.delete_blob(self.LEGACY_E2E_BLOB)
            core, peers = self.store.e2e_rows()
        if core is None:
            if peers:
                raise StorageError(
                    f"{self.store.path} has sessions but no end-to-end core state (corrupt?); "
                    "move it away to start fresh"
                )
            return e2e.E2EState.new(self.identity)  # its core is written by the first save
        return e2e.E2EState.load(self.identity, core, peers, key_of=self.store.peer_key)

    @contextlib.contextmanager
    def _save_state(self) -> Iterator[None]:
        """A store transaction that also writes the E2E rows changed since the last one.

        If it fails (the body raises or COMMIT does), those rows roll back with
        the rest and are marked changed again, so the next transaction writes them.
        """
        changes = self._state.take_changes()
        try:
            with self.store.transaction():
                self.store.put_e2e_rows(changes.core, changes.peers, changes.deleted)
                yield
        except BaseException:
            self._state.requeue(changes)
            raise

    def _save_if_changed(self) -> None:
        """Write the E2E rows that changed, if any (no empty transaction while idle)."""
        if self._state.has_changes():
            with self._save_state():
                pass

    @property
    def connected(self) -> bool:
        return self._link is not None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="securechat-net", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop cleanly: the network thread finishes the frames in hand (and sends
        their acknowledgements) before the link closes, so a clean exit never makes
        the relay redeliver what this client already committed."""
        self._stop.set()
        self._held_wake.set()
        for thread in (self._thread, self._held_thread):
            if thread is not None:
                thread.join(timeout=STOP_GRACE)
        link = self._link
        if link is not None:
            link.close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE)

    def _run(self) -> None:
        """The network thread: any exception that escapes is a bug, never a silent death.

        It becomes :attr:`fatal` (an :class:`InternalError`), so every command that
        waits on the messenger ends with a clear error and a non-zero exit.
        """
        try:
            self._connect_loop()
        except Exception as exc:
            self._die(exc)

    def _die(self, exc: Exception) -> None:
        self.fatal = InternalError(
            f"the network thread failed ({type(exc).__name__}: {exc}); nothing unacknowledged "
            "was lost: restart to retry"
        )
        self._emit(NoticeEvent(str(self.fatal), error=True))

    def _connect_loop(self) -> None:
        delay = BACKOFF_INITIAL
        failed = 0  # attempts failed in a row: with a list, each address once before waiting
        while not self._stop.is_set() and self.fatal is None:
            address = self._relays[self._relay_index]
            try:
                link = RelayLink.connect(
                    address,
                    self.identity.dh_private,
                    self._known_relays,
                    pinned_key=self._pinned if self._pinned is not None else self._cluster_key,
                    sign_public=self.identity.public.sign,
                )
            except RelayKeyChangedError as exc:
                self.fatal = exc
                self._emit(NoticeEvent(str(exc), error=True))
                return
            except SecureChatError as exc:
                failed += 1
                self._next_relay()
                if failed % len(self._relays):  # another address to try first: now
                    continue
                self.last_connect_error = exc  # every address failed: say why, back off
                # Full jitter (AWS architecture blog): spread reconnects of many clients.
                wait = random.uniform(0, delay)
                self._emit(ConnectionEvent(False, f"offline ({exc}); retrying in {wait:.1f}s"))
                self._stop.wait(wait)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_INITIAL
            failed = 0
            self.last_connect_error = None
            if len(self._relays) > 1:
                self._cluster_key = link.relay_key
            self._serve(link)
            self._next_relay()  # a node that dropped us may be going away: try the next

    def _next_relay(self) -> None:
        """Fail over to the next address of a relay cluster (no-op with one address)."""
        self._relay_index = (self._relay_index + 1) % len(self._relays)

    def _serve(self, link: RelayLink) -> None:
        try:
            with self._lock:
                # Publishing the link and resending the outbox under the lock that
                # send_text holds while sending keeps every message behind older ones.
                self._link = link
                self._published = False
                self._on_connect(link)
            self._emit(ConnectionEvent(True, f"connected to {link.address}"))
            now = time.monotonic()
            last_ping = last_rotation = last_held = now
            while not self._stop.is_set() and self.fatal is None:
                frames = link.receive(POLL_INTERVAL)
                if frames:
                    self._handle(link, frames)
                now = time.monotonic()
                if self._retry_at and now >= self._retry_at:
                    self._retry_at = 0.0
                    self._resend_outbox(link)
                if now - last_ping > PING_INTERVAL:
                    link.send([wire.Ping(int(now))])
                    last_ping = now
                if now - last_rotation > ROTATION_CHECK:
                    last_rotation = now
                    self._publish_prekeys(link, None)
                if now - last_held > HELD_RETRY:
                    last_held = now
                    self._wake_held()
        except TransportError as exc:
            if not self._stop.is_set():
                self._emit(ConnectionEvent(False, f"disconnected: {exc}"))
        except ProtocolError as exc:
            self._emit(NoticeEvent(f"relay connection failed: {exc}", error=True))
        finally:
            self._link = None
            link.close()

    def _on_connect(self, link: RelayLink) -> None:
        watch = [p.dh for p in self._watch]
        if watch:
            link.send([wire.PresenceSubscribe(tuple(watch))])
        self._resend_outbox(link)

    def _resend_outbox(self, link: RelayLink) -> None:
        with self._lock:
            frames = [wire.decode(item.frame) for item in self.store.outbox()]
        if frames:
            link.send(frames)

    # --- sending -------------------------------------------------------------------------------

    def send_text(self, conv: Conversation, text: str) -> bytes:
        """Seal, persist and (if connected) send; or hold until prekeys come. Return the id."""
        with self._lock:
            for peer in conv.peers:
                self.peers.check(peer)
        msg_id = os.urandom(wire.ID_SIZE)
        content = envelope.Content(msg_id, _now_ms(), text, conv.group)
        padded = len(envelope.encode_content(content))  # too long or malformed: refused here
        _check_frame_size(conv, content, padded)
        with self._lock:
            queued_behind = self.store.held_count(conv.conv_id) > 0
        reason = "earlier messages to them are waiting" if queued_behind else None
        bundles: dict[bytes, x3dh.Bundle] = {}
        if reason is None:
            bundles, reason = self._bundles_for(conv.peers)
        if reason is not None:
            self._hold(conv, content, reason)
        else:
            self._seal_and_queue(conv, content, bundles, from_held=False)
        return msg_id

    def _history_record(self, conv: Conversation, content: envelope.Content) -> dict[str, Any]:
        return {
            "sender": self.identity.name,
            "fp": self.identity.public.fingerprint,
            "sent_ms": content.sent_ms,
            "text": content.text,
            "out": True,
            "to": [p.dh.hex() for p in conv.peers],
        }

    def _seal_and_queue(
        self,
        conv: Conversation,
        content: envelope.Content,
        bundles: dict[bytes, x3dh.Bundle],
        *,
        from_held: bool,
    ) -> None:
        """Seal for every member; in one transaction: ratchets, outbox, history; then send."""
        msg_id, now = content.msg_id, _now_ms()
        with self._lock:
            payloads = [
                (
                    wire.mailbox_address(peer.dh),
                    self._state.encrypt(peer, content, os.urandom, now, bundles.get(peer.dh)),
                )
                for peer in conv.peers
            ]
            frame: wire.Frame
            if len(payloads) == 1:
                frame = wire.Send(msg_id, payloads[0][0], payloads[0][1])
            else:
                frame = wire.SendMulti(msg_id, tuple(payloads))
            encoded = wire.encode(frame)
            self._track(self._recipients, msg_id, frozenset(p.dh for p in conv.peers))
            with self._save_state():
                self.store.outbox_add(msg_id, encoded)
                if from_held:
                    self.store.held_remove(msg_id)
                elif self._keep_history:
                    self.store.history_add(
                        conv.conv_id, msg_id, STATUS_PENDING, self._history_record(conv, content)
                    )
            self._send_now([frame])

    def _send_now(self, frames: list[wire.Frame], *, receipts: bool = False) -> None:
        """Write frames if connected (under the lock, so order holds); else the outbox waits."""
        if self._tap is not None:
            for frame in frames:
                self._tap("receipt" if receipts else "out", frame)
        link = self._link
        if link is not None:
            with contextlib.suppress(TransportError):
                link.send(frames)

    @staticmethod
    def _track(table: OrderedDict[bytes, Any], key: bytes, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > MAX_TRACKED:
            table.popitem(last=False)

    # --- prekey bundles and held messages --------------------------------------------------------

    def _bundles_for(
        self, peers: Iterable[keys.PublicIdentity]
    ) -> tuple[dict[bytes, x3dh.Bundle], str | None]:
        """Bundles for peers we have no session with, or why we must wait for them."""
        with self._lock:
            missing = [p for p in peers if not self._state.has_session(p)]
        bundles: dict[bytes, x3dh.Bundle] = {}
        for peer in missing:
            link = self._link
            if link is None:
                return bundles, f"offline: the message to {peer.name} waits for the relay"
            reply = self._fetch(link, peer.dh)
            if reply is None:
                return bundles, f"the relay did not answer for {peer.name}'s prekeys"
            if not reply.signed_prekey:
                if peer.dh.hex() in self._prekey_peers:
                    return bundles, (
                        f"the relay says {peer.name} has no prekeys, but {peer.name} published "
                        "some before: holding the message rather than starting without them "
                        "(the relay may be interfering)"
                    )
                continue  # never published any: the documented no-prekey start
            try:
                bundle = x3dh.parse_bundle(reply.signed_prekey, reply.one_time_prekey)
                assert bundle.signed_prekey is not None
                bundle.signed_prekey.verify(peer)
            except (ProtocolError, SecureChatError):
                return bundles, (
                    f"the relay handed out prekeys for {peer.name} that {peer.name} did not "
                    "sign (the relay may be interfering); holding the message"
                )
            bundles[peer.dh] = bundle
            self._saw_prekeys(peer)
        return bundles, None

    def _saw_prekeys(self, peer: keys.PublicIdentity) -> None:
        key = peer.dh.hex()
        if key in self._prekey_peers:
            return
        with self._lock, self.store.transaction():
            self._prekey_peers.add(key)
            self.store.put_json(PREKEY_PEERS, sorted(self._prekey_peers))

    def _fetch(self, link: RelayLink, identity_key: bytes) -> wire.Prekeys | None:
        done = threading.Event()
        box: list[wire.Prekeys] = []
        with self._lock:
            self._fetches[identity_key] = (done, box)
        try:
            link.send([wire.FetchPrekeys(identity_key)])
            done.wait(FETCH_TIMEOUT)
        except TransportError:
            return None
        finally:
            with self._lock:
                self._fetches.pop(identity_key, None)
        return box[0] if box else None

    def _hold(self, conv: Conversation, content: envelope.Content, reason: str) -> None:
        """Keep the text (sealed at rest) until a bundle arrives; say why, once per conversation."""
        record = {
            "peers": [p.to_line() for p in conv.peers],
            "msg_id": content.msg_id.hex(),
            "sent_ms": content.sent_ms,
            "text": content.text,
        }
        with self._lock, self.store.transaction():
            self.store.held_add(conv.conv_id, content.msg_id, record)
            if self._keep_history:
                self.store.history_add(
                    conv.conv_id,
                    content.msg_id,
                    STATUS_PENDING,
                    self._history_record(conv, content),
                )
        if conv.conv_id not in self._held_notices:
            self._held_notices.add(conv.conv_id)
            self._emit(NoticeEvent(f"waiting to send: {reason}", error=True))
        self._wake_held()

    def _wake_held(self) -> None:
        """Start (or nudge) the thread that seals held messages once bundles can come.

        Not the network thread: fetching a bundle waits for a frame that only the
        network thread reads.
        """
        with self._lock:
            if self._link is None or self.store.held_count() == 0 or self._stop.is_set():
                return
            self._held_wake.set()
            if self._held_thread is not None and self._held_thread.is_alive():
                return
            self._held_thread = threading.Thread(
                target=self._held_loop, name="securechat-held", daemon=True
            )
            self._held_thread.start()

    def _held_loop(self) -> None:
        try:
            while self._held_wake.is_set() and not self._stop.is_set():
                self._held_wake.clear()
                self._release_held()
        except Exception as exc:
            self._die(exc)

    def _release_held(self) -> None:
        """Seal held messages in order; stop at the first that still cannot go."""
        with self._lock:
            held = self.store.held()
        for record in held:
            if self._link is None or self._stop.is_set():
                return
            peers = [keys.PublicIdentity.from_line(line) for line in record["peers"]]
            conv = Conversation.with_peers(self.identity.public, peers)
            bundles, reason = self._bundles_for(conv.peers)
            if reason is not None:
                return
            content = envelope.Content(
                bytes.fromhex(record["msg_id"]),
                int(record["sent_ms"]),
                record["text"],
                conv.group,
            )
            self._seal_and_queue(conv, content, bundles, from_held=True)
            self._held_notices.discard(conv.conv_id)

    def pending(self) -> int:
        """Messages the user wrote that the relay has not accepted yet (held ones too)."""
        with self._lock:
            return self.store.outbox_count() + self.store.held_count()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._link is None and self.fatal is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._link is not None

    def wait_all_accepted(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending() == 0:
                return True
            if self.fatal is not None:
                return False
            time.sleep(0.05)
        return self.pending() == 0

    # --- receiving -----------------------------------------------------------------------------

    def _handle(self, link: RelayLink, frames: list[wire.Frame]) -> None:
        acks: list[tuple[bytes, bytes]] = []
        for frame in frames:
            if isinstance(frame, wire.Deliver):
                if not self._receive:
                    continue
                if self._tap is not None:
                    self._tap("in", frame)
                self._on_deliver(frame)
                acks.append((frame.sender_key, frame.msg_id))
            elif isinstance(frame, wire.Accepted):
                self._on_accepted(frame.msg_id)
            elif isinstance(frame, wire.PrekeyCount):
                self._publish_prekeys(link, frame.remaining)
            elif isinstance(frame, wire.Prekeys):
                self._on_prekeys(frame)
            elif isinstance(frame, wire.Synced):
                self.synced.set()
                self._wake_held()
            elif isinstance(frame, wire.Error):
                self._on_error(frame)
            elif isinstance(frame, wire.Presence):
                self._on_presence(frame)
            # wire.Delivered: the relay's own receipt, no longer shown (see the docstring)
        for start in range(0, len(acks), MAX_ACK_BATCH):
            link.send([wire.Ack(tuple(acks[start : start + MAX_ACK_BATCH]))])
        self._flush_receipts()

    def _on_deliver(self, frame: wire.Deliver) -> None:
        """Open, commit (with the receipt due), then (by the caller) acknowledge."""
        now = _now_ms()
        with self._lock:
            trusted = self.peers.trusted_identity(frame.sender_key)
            try:
                received = self._state.decrypt(
                    frame.sender_key, frame.payload, now, msg_id=frame.msg_id, trusted=trusted
                )
            except (ProtocolError, TrustError) as exc:
                self._rejected(frame, exc)
                self._save_if_changed()  # e.g. an expired signed prekey was dropped
                return
            content = received.content
            if received.duplicate:
                self._save_if_changed()  # a re-sent id still advanced the ratchet
                return
            if content.is_control:
                with self._save_state():
                    self._on_control(received)
                return
            name, verified = self.peers.name_of(received.sender)
            if content.group is not None:
                conv = group_conv_id(content.group)
            else:
                conv = direct_conv_id(self.identity.public.dh, received.sender.dh)
            with self._save_state():
                fresh = True
                if self._keep_history:
                    fresh = self.store.history_add(
                        conv,
                        content.msg_id,
                        STATUS_RECEIVED,
                        {
                            "sender": name,
                            "fp": received.sender.fingerprint,
                            "sent_ms": content.sent_ms,
                            "text": content.text,
                            "out": False,
                            "verified": verified,
                        },
                    )
                self.store.receipt_due(received.sender.dh, envelope.CONTENT_RECEIPT, content.msg_id)
            weak = received.fallback and self._state.has_prekeys
        if weak:
            self._emit(
                NoticeEvent(
                    f"{name} started this conversation without your prekeys (the no-prekey "
                    "mode: weaker if your key is ever stolen). If they had your prekeys, the "
                    "relay may be "
                    "interfering; compare safety numbers",
                    error=True,
                )
            )
        if fresh:
            self.received_count += 1
            self._emit(
                MessageEvent(
                    conv,
                    content.msg_id,
                    name,
                    received.sender.fingerprint,
                    verified,
                    content.sent_ms,
                    content.text,
                    content.group is not None,
                )
            )

    def _rejected(self, frame: wire.Deliver, exc: SecureChatError) -> None:
        """Report a message that did not open, here and (rate-limited) to its sender."""
        self._emit(
            NoticeEvent(
                f"rejected a message claiming to be from {self._sender_label(frame)}: {exc}",
                error=True,
            )
        )
        sender = self._state.peer_identity(frame.sender_key)
        if sender is None:
            return  # no session to tell them through
        now = time.monotonic()
        last = self._rejected_at.get(frame.sender_key)
        if last is not None and now - last < REJECT_INTERVAL:
            return
        self._track(self._rejected_at, frame.sender_key, now)
        with self._save_state():
            self.store.receipt_due(frame.sender_key, envelope.CONTENT_REJECTED, frame.msg_id)

    def _on_control(self, received: e2e.Received) -> None:
        """A RECEIPT or REJECTED from a peer about messages we sent (inside a transaction)."""
        sender = received.sender
        if received.content.kind == envelope.CONTENT_RECEIPT:
            for msg_id in received.content.ids:
                if self._count_receipt(msg_id, sender.dh):
                    self._set_status(msg_id, STATUS_DELIVERED, write=True)
            return
        name, _ = self.peers.name_of(sender)
        for msg_id in received.content.ids:
            if sender.dh not in self._recipients_of(msg_id):
                continue
            entry = self.store.history_of(msg_id)
            what = f"'{entry.record['text'][:40]}'" if entry is not None else msg_id.hex()[:8]
            self._emit(
                NoticeEvent(
                    f"{name}'s device could not open your message {what}; send it again if it "
                    "matters (their client may have lost its session)",
                    error=True,
                )
            )

    def _recipients_of(self, msg_id: bytes) -> frozenset[bytes]:
        known = self._recipients.get(msg_id)
        if known is not None:
            return known
        entry = self.store.history_of(msg_id)
        if entry is None or not entry.record.get("out"):
            return frozenset()
        return frozenset(bytes.fromhex(h) for h in entry.record.get("to", ()))

    def _count_receipt(self, msg_id: bytes, peer_dh: bytes) -> bool:
        """Count one recipient's end-to-end receipt; True once every recipient's is in."""
        expected = self._recipients_of(msg_id)
        if peer_dh not in expected:
            return False  # not a message we sent to them: ignore
        return self.store.delivered_add(msg_id, peer_dh) >= len(expected)

    def _flush_receipts(self) -> None:
        """Seal the receipts due, one per peer and kind, queue them in the outbox, send."""
        while True:
            with self._lock:
                due = self.store.receipts_due(limit=envelope.MAX_CONTROL_IDS)
                if not due:
                    return
                now, frames = _now_ms(), list[wire.Frame]()
                groups: dict[tuple[bytes, int], list[bytes]] = {}
                for item in due:
                    groups.setdefault((item.peer, item.kind), []).append(item.msg_id)
                sealed: list[tuple[bytes, bytes]] = []
                for (peer_dh, kind), ids in groups.items():
                    peer = self._state.peer_identity(peer_dh)
                    if peer is None:
                        continue  # the session is gone (evicted): nothing to say it through
                    content = envelope.control(kind, os.urandom(wire.ID_SIZE), now, ids)
                    payload = self._state.encrypt(peer, content, os.urandom, now, pin=False)
                    frame = wire.Send(content.msg_id, wire.mailbox_address(peer_dh), payload)
                    frames.append(frame)
                    sealed.append((content.msg_id, wire.encode(frame)))
                with self._save_state():
                    for msg_id, encoded in sealed:
                        self.store.outbox_add(msg_id, encoded, control=True)
                    self.store.receipts_done(item.seq for item in due)
                self._send_now(frames, receipts=True)

    def _on_accepted(self, msg_id: bytes) -> None:
        with self._lock, self.store.transaction():
            self.store.outbox_remove(msg_id)
            self._set_status(msg_id, STATUS_ACCEPTED, write=True)

    def _set_status(self, msg_id: bytes, status: int, *, write: bool) -> None:
        """Raise a sent message's mark (never lower it) and tell the UI when it moved."""
        if write:
            self.store.history_set_status(msg_id, status)
        shown = self._statuses.get(msg_id, STATUS_PENDING)
        if status <= shown:
            return
        self._track(self._statuses, msg_id, status)
        self._emit(StatusEvent(msg_id, status))

    def _publish_prekeys(self, link: RelayLink, remaining: int | None) -> None:
        """Publish once per connection, then only when something changed.

        The relay answers every publish with a ``PrekeyCount``; answering every
        count with a publish made an idle client loop forever (issue 11.10).
        ``remaining`` None: a periodic check for the weekly signed-prekey rotation.
        """
        now = _now_ms()
        with self._lock:
            low = remaining is not None and remaining < PREKEY_LOW_WATER
            if self._published and not low and not self._state.rotation_due(now):
                return
            wanted = PREKEY_TARGET - remaining if low and remaining is not None else 0
            signed, fresh = self._state.make_prekeys(
                os.urandom, now, one_time=min(wanted, wire.MAX_PUBLISH_OTKS)
            )
            self._save_if_changed()
            self._published = True
        link.send([wire.PublishPrekeys(signed, fresh)])

    def _on_prekeys(self, frame: wire.Prekeys) -> None:
        with self._lock:
            waiter = self._fetches.get(frame.identity_key)
        if waiter is not None:
            waiter[1].append(frame)
            waiter[0].set()

    def _on_error(self, frame: wire.Error) -> None:
        reason = wire.ERROR_NAMES.get(frame.code, str(frame.code))
        if frame.code == wire.REPLACED:
            # Reconnecting would replace the other connection in turn, back and forth.
            self.fatal = InUseError(
                "another connection with this identity (a securechat process here or on "
                "another machine) replaced this one at the relay; this one stopped. Run one "
                "client per identity"
            )
            self._emit(NoticeEvent(str(self.fatal), error=True))
            return
        if frame.msg_id != wire.NO_ID and frame.code == wire.TOO_LARGE:
            with self._lock, self.store.transaction():
                self.store.outbox_remove(frame.msg_id)
                self._track(self.refused, frame.msg_id, frame.reason)
            self._emit(
                NoticeEvent(f"the relay refused a message as too large: {frame.reason}", error=True)
            )
            return
        if frame.msg_id != wire.NO_ID:
            # Quota, rate or storage trouble at the relay: keep it and try again later.
            self._retry_at = time.monotonic() + RETRY_AFTER_REFUSAL
        self._emit(NoticeEvent(f"relay: {reason}: {frame.reason}", error=True))

    def _on_presence(self, frame: wire.Presence) -> None:
        for peer in self._watch:
            if peer.dh == frame.identity_key:
                self._emit(PresenceEvent(peer.name, frame.online))

    def _sender_label(self, frame: wire.Deliver) -> str:
        known = self.peers.trusted_identity(frame.sender_key)
        return known.name if known is not None else "unknown key " + frame.sender_key.hex()[:16]

    # --- local queries ---------------------------------------------------------------------------

    def history(self, conv: str, limit: int) -> list[dict[str, object]]:
        with self._lock:
            return [
                {**e.record, "status": e.status, "msg_id": e.msg_id.hex()}
                for e in self.store.history(conv, limit)
            ]
