"""The client engine: sessions, outbox, history, and the relay connection (shell).

Theory of operation
-------------------
One network thread owns the :class:`~securechat.client.link.RelayLink`: it
connects (exponential backoff with full jitter while the relay is away),
resends the outbox, reads frames and handles them. The UI thread calls
:meth:`Messenger.send_text`; everything that touches the E2E state or the
store happens under one lock, and every user-visible change is reported as an
:class:`Event` through the ``on_event`` callback (called from either thread).

Never lose a word:
  * ``send_text`` seals the message for every member, then in ONE
    transaction saves the advanced ratchets, queues the exact frame in the
    outbox, and records the history line. Only then does it try the network.
    A crash before the commit loses nothing the user was told was sent; a
    crash after it resends the same frame on restart.
  * An outbox entry leaves the outbox only on the relay's ``Accepted`` (the
    relay's promise that the frame is durable or delivered).
  * An incoming message is acknowledged to the relay only after the ratchet
    state and the history line are committed, so a crash makes the relay
    deliver it again, and the E2E layer's duplicate detection hides the copy.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from securechat import e2e, envelope, keys, keystore, wire, x3dh
from securechat.client.link import KnownRelays, RelayLink
from securechat.client.store import ClientStore, OutboxItem
from securechat.errors import (
    AuthenticationError,
    InternalError,
    PeerKeyChangedError,
    ProtocolError,
    RelayKeyChangedError,
    SecureChatError,
    StorageError,
    TransportError,
)

STATUS_PENDING: Final = 0
STATUS_ACCEPTED: Final = 1  # the relay holds it durably (or delivered it)
STATUS_DELIVERED: Final = 2  # the recipient's device acknowledged it
STATUS_RECEIVED: Final = 3  # an incoming message

PREKEY_LOW_WATER: Final = 20  # replenish one-time prekeys below this many
PREKEY_TARGET: Final = 100
FETCH_TIMEOUT: Final = 5.0
BACKOFF_INITIAL: Final = 0.25
BACKOFF_MAX: Final = 15.0
POLL_INTERVAL: Final = 0.2
STOP_GRACE: Final = 2.0  # seconds a clean stop waits for the network thread
MAX_TRACKED_STATUSES: Final = 10_000  # sent messages whose delivery mark is remembered
PING_INTERVAL: Final = 20.0
RETRY_AFTER_REFUSAL: Final = 2.0
MAX_ACK_BATCH: Final = wire.MAX_ACKS


# --- events for the UI -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageEvent:
    conv: str
    msg_id: bytes
    sender_name: str
    sender_fingerprint: str
    verified: bool  # the sender is a known peer whose key matches
    sent_ms: int
    text: str
    group: bool


@dataclass(frozen=True, slots=True)
class StatusEvent:
    msg_id: bytes
    status: int


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    connected: bool
    detail: str


@dataclass(frozen=True, slots=True)
class NoticeEvent:
    text: str
    error: bool = False


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    name: str
    online: bool


Event = MessageEvent | StatusEvent | ConnectionEvent | NoticeEvent | PresenceEvent


# --- conversations and trust -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conversation:
    """Who a message goes to: one peer, or a group of several with a stable id."""

    conv_id: str
    peers: tuple[keys.PublicIdentity, ...]
    group: envelope.Group | None

    @classmethod
    def with_peers(
        cls, me: keys.PublicIdentity, peers: Iterable[keys.PublicIdentity]
    ) -> Conversation:
        unique = {p.dh: p for p in peers if p.dh != me.dh}
        members = tuple(unique.values())
        if not members:
            raise SecureChatError("a conversation needs at least one peer other than yourself")
        if len(members) == 1:
            return cls(direct_conv_id(me.dh, members[0].dh), members, None)
        member_keys = tuple(sorted([me.dh, *unique]))
        group_id = _hash(b"group", b"".join(member_keys))[: envelope.GROUP_ID_SIZE]
        return cls(f"group-{group_id.hex()}", members, envelope.Group(group_id, member_keys))


def _hash(label: bytes, data: bytes) -> bytes:
    import nacl.bindings

    return bytes(
        nacl.bindings.crypto_generichash_blake2b_salt_personal(
            data, digest_size=32, key=b"securechat/v1/client/" + label
        )
    )


def direct_conv_id(a: bytes, b: bytes) -> str:
    return "dm-" + _hash(b"direct", b"".join(sorted([a, b])))[:16].hex()


class KnownPeers:
    """Trust on first use, per name, like known_hosts; stored sealed in the client store."""

    BLOB: Final = "known_peers"

    def __init__(self, store: ClientStore) -> None:
        self._store = store

    def _all(self) -> dict[str, str]:
        value = self._store.get_json(self.BLOB)
        return dict(value) if isinstance(value, dict) else {}

    def check(self, peer: keys.PublicIdentity) -> None:
        """Record a new name; refuse a known name whose key changed."""
        entries = self._all()
        line = entries.get(peer.name)
        if line is None:
            entries[peer.name] = peer.to_line()
            self._store.put_json(self.BLOB, entries)
            return
        known = keys.PublicIdentity.from_line(line)
        if not known.same_keys(peer):
            raise PeerKeyChangedError(
                f"WARNING: the key for {peer.name!r} has CHANGED (was {known.fingerprint}, now "
                f"{peer.fingerprint}). Someone may be impersonating {peer.name}. Refusing to send. "
                f"Verify the new safety number with {peer.name} out of band, then run "
                f"'securechat trust {peer.name}'"
            )

    def trust(self, peer: keys.PublicIdentity) -> bool:
        """Accept ``peer``'s current key; True if it replaced another."""
        entries = self._all()
        old = entries.get(peer.name)
        entries[peer.name] = peer.to_line()
        self._store.put_json(self.BLOB, entries)
        return old is not None and old.split(" ")[0] != peer.to_line().split(" ")[0]

    def name_of(self, sender: keys.PublicIdentity) -> tuple[str, bool]:
        """Display name and whether it is verified (a known peer with these keys).

        A sender not yet known but whose ``NAME.pub`` the user put in the key
        directory is recorded under that name on first sight, as ``talk --peer
        NAME`` would have done.
        """
        entries = self._all()
        for name, line in entries.items():
            if keys.PublicIdentity.from_line(line).same_keys(sender):
                return name, True
        for path in sorted(keystore.home().glob(f"*{keystore.PUBLIC_SUFFIX}")):
            try:
                candidate = keystore.load_public(str(path))
            except SecureChatError:
                continue
            if candidate.same_keys(sender) and candidate.name not in entries:
                self.trust(candidate)
                return candidate.name, True
        return (sender.name or "unknown"), False

    def identities(self) -> list[keys.PublicIdentity]:
        return [keys.PublicIdentity.from_line(line) for line in self._all().values()]


# --- the engine ----------------------------------------------------------------------------------


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
        self._known_relays = known_relays
        self._pinned = pinned_relay_key
        self._emit = on_event
        self._keep_history = keep_history
        self._watch = tuple(watch)
        self._lock = threading.RLock()
        self._state = self._load_state()
        self._link: RelayLink | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fetches: dict[bytes, tuple[threading.Event, list[wire.Prekeys]]] = {}
        self._retry_at = 0.0
        self._statuses: dict[bytes, int] = {}  # newest delivery mark per sent message
        self._receipts: dict[bytes, tuple[int, set[bytes]]] = {}  # recipients, receipts seen
        self.synced = threading.Event()
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
        return e2e.E2EState.load(self.identity, core, peers.items())

    @contextlib.contextmanager
    def _save_state(self) -> Iterator[None]:
        """A store transaction that also writes the E2E rows changed since the last one.

        If it fails (the body raises or COMMIT does), those rows roll back with
        the rest and are marked changed again, so the next transaction writes them.
        """
        changes = self._state.take_changes()
        try:
            with self.store.transaction():
                self.store.put_e2e_rows(changes.core, changes.peers)
                yield
        except BaseException:
            self._state.requeue(changes)
            raise

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
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE)
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
            self.fatal = InternalError(
                f"the network thread failed ({type(exc).__name__}: {exc}); nothing unacknowledged "
                "was lost: restart to retry"
            )
            self._emit(NoticeEvent(str(self.fatal), error=True))

    def _connect_loop(self) -> None:
        delay = BACKOFF_INITIAL
        while not self._stop.is_set():
            try:
                link = RelayLink.connect(
                    self.relay_address,
                    self.identity.dh_private,
                    self._known_relays,
                    pinned_key=self._pinned,
                )
            except RelayKeyChangedError as exc:
                self.fatal = exc
                self._emit(NoticeEvent(str(exc), error=True))
                return
            except SecureChatError as exc:
                self.last_connect_error = exc
                # Full jitter (AWS architecture blog): spread reconnects of many clients.
                wait = random.uniform(0, delay)
                self._emit(ConnectionEvent(False, f"offline ({exc}); retrying in {wait:.1f}s"))
                self._stop.wait(wait)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_INITIAL
            self.last_connect_error = None
            self._serve(link)

    def _serve(self, link: RelayLink) -> None:
        try:
            with self._lock:
                # Publishing the link and resending the outbox under the lock that
                # send_text holds while sending keeps every message behind older ones.
                self._link = link
                self._on_connect(link)
            self._emit(ConnectionEvent(True, f"connected to {self.relay_address}"))
            last_ping = time.monotonic()
            while not self._stop.is_set():
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
        """Seal, persist and (if connected) send; return the message id."""
        with self._lock:
            for peer in conv.peers:
                self.peers.check(peer)
        bundles = self._bundles_for(conv.peers)
        msg_id = os.urandom(wire.ID_SIZE)
        now = int(time.time() * 1000)
        content = envelope.Content(msg_id, now, text, conv.group)
        with self._lock:
            payloads = [
                (wire.mailbox_address(peer.dh),
                 self._state.encrypt(peer, content, os.urandom, now, bundles.get(peer.dh)))
                for peer in conv.peers
            ]
            frame: wire.Frame
            if len(payloads) == 1:
                frame = wire.Send(msg_id, payloads[0][0], payloads[0][1])
            else:
                frame = wire.SendMulti(msg_id, tuple(payloads))
            encoded = wire.encode(frame)
            self._receipts[msg_id] = (len(payloads), set())
            while len(self._receipts) > MAX_TRACKED_STATUSES:
                del self._receipts[next(iter(self._receipts))]
            with self._save_state():
                self.store.outbox_add(OutboxItem(msg_id, conv.conv_id, encoded, now))
                if self._keep_history:
                    self.store.history_add(conv.conv_id, msg_id, STATUS_PENDING, {
                        "sender": self.identity.name, "fp": self.identity.public.fingerprint,
                        "sent_ms": now, "text": text, "out": True,
                    })
            if self._tap is not None:
                self._tap("out", frame)
            link = self._link
            if link is not None:
                # On failure it stays in the outbox; the network thread resends on reconnect.
                with contextlib.suppress(TransportError):
                    link.send([frame])
        return msg_id

    def _bundles_for(self, peers: Iterable[keys.PublicIdentity]) -> dict[bytes, x3dh.Bundle]:
        """Prekey bundles for peers we have no session with (only when online).

        Offline, or if the peer never published one, the E2E layer falls back
        to the no-bundle agreement (weaker: see docs/threat-model.md).
        """
        with self._lock:
            missing = [p for p in peers if not self._state.has_session(p)]
        bundles: dict[bytes, x3dh.Bundle] = {}
        link = self._link
        if link is None:
            return bundles
        for peer in missing:
            reply = self._fetch(link, peer.dh)
            if reply is not None and reply.signed_prekey:
                bundles[peer.dh] = x3dh.parse_bundle(reply.signed_prekey, reply.one_time_prekey)
        return bundles

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

    def pending(self) -> int:
        with self._lock:
            return self.store.outbox_count()

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
                # status 2: every copy was delivered and acknowledged already
                status = STATUS_DELIVERED if frame.status == wire.STATUS_DELIVERED else (
                    STATUS_ACCEPTED)
                self._on_status(frame.msg_id, status, remove=True)
            elif isinstance(frame, wire.Delivered):
                # A receipt for ONE recipient's copy: for a group the other copies may
                # not be safe yet, so only Accepted takes a message out of the outbox,
                # and the message shows as delivered once every member's device has it.
                if self._all_receipts_in(frame):
                    self._on_status(frame.msg_id, STATUS_DELIVERED, remove=False)
            elif isinstance(frame, wire.PrekeyCount):
                self._replenish(link, frame.remaining)
            elif isinstance(frame, wire.Prekeys):
                self._on_prekeys(frame)
            elif isinstance(frame, wire.Synced):
                self.synced.set()
            elif isinstance(frame, wire.Error):
                self._on_error(frame)
            elif isinstance(frame, wire.Presence):
                self._on_presence(frame)
        for start in range(0, len(acks), MAX_ACK_BATCH):
            link.send([wire.Ack(tuple(acks[start : start + MAX_ACK_BATCH]))])

    def _on_deliver(self, frame: wire.Deliver) -> None:
        """Open, commit, then (by the caller) acknowledge; forged input is dropped and reported."""
        now = int(time.time() * 1000)
        with self._lock:
            try:
                received = self._state.decrypt(frame.sender_key, frame.payload, now)
            except (AuthenticationError, ProtocolError) as exc:
                self._emit(NoticeEvent(
                    f"rejected a message claiming to be from {self._sender_label(frame)}: "
                    f"{exc}", error=True))
                return
            if received.duplicate:
                return
            content = received.content
            name, verified = self.peers.name_of(received.sender)
            if content.group is not None:
                conv = f"group-{content.group.group_id.hex()}"
            else:
                conv = direct_conv_id(self.identity.public.dh, received.sender.dh)
            with self._save_state():
                fresh = True
                if self._keep_history:
                    fresh = self.store.history_add(conv, content.msg_id, STATUS_RECEIVED, {
                        "sender": name, "fp": received.sender.fingerprint,
                        "sent_ms": content.sent_ms, "text": content.text, "out": False,
                        "verified": verified,
                    })
        if fresh:
            self.received_count += 1
            self._emit(MessageEvent(conv, content.msg_id, name, received.sender.fingerprint,
                                    verified, content.sent_ms, content.text,
                                    content.group is not None))

    def _all_receipts_in(self, frame: wire.Delivered) -> bool:
        """Count one recipient's receipt; True once every recipient's has come.

        A message sent before this process started is not tracked: its receipt
        counts as complete (after a restart a group mark may be early, never lost).
        """
        with self._lock:
            entry = self._receipts.get(frame.msg_id)
            if entry is None:
                return True
            expected, seen = entry
            seen.add(frame.mailbox)
            if len(seen) < expected:
                return False
            del self._receipts[frame.msg_id]
            return True

    def _on_status(self, msg_id: bytes, status: int, *, remove: bool) -> None:
        with self._lock, self.store.transaction():
            if remove:
                self.store.outbox_remove(msg_id)
            self.store.history_set_status(msg_id, status)
            # A group's Accepted(1) can follow a member's Delivered receipt: the mark a
            # user sees only ever moves forward.
            shown = max(self._statuses.pop(msg_id, STATUS_PENDING), status)
            self._statuses[msg_id] = shown
            while len(self._statuses) > MAX_TRACKED_STATUSES:
                del self._statuses[next(iter(self._statuses))]
        if shown == status:
            self._emit(StatusEvent(msg_id, status))

    def _replenish(self, link: RelayLink, remaining: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            wanted = PREKEY_TARGET - remaining if remaining < PREKEY_LOW_WATER else 0
            wanted = min(wanted, wire.MAX_PUBLISH_OTKS)
            signed, fresh = self._state.make_prekeys(os.urandom, now, one_time=wanted)
            with self._save_state():
                pass
        link.send([wire.PublishPrekeys(signed, fresh)])

    def _on_prekeys(self, frame: wire.Prekeys) -> None:
        with self._lock:
            waiter = self._fetches.get(frame.identity_key)
        if waiter is not None:
            waiter[1].append(frame)
            waiter[0].set()

    def _on_error(self, frame: wire.Error) -> None:
        reason = wire.ERROR_NAMES.get(frame.code, str(frame.code))
        if frame.msg_id != wire.NO_ID and frame.code == wire.TOO_LARGE:
            with self._lock, self.store.transaction():
                self.store.outbox_remove(frame.msg_id)
            self._emit(NoticeEvent(f"the relay refused a message as too large: {frame.reason}",
                                   error=True))
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
        for peer in self.peers.identities():
            if peer.dh == frame.sender_key:
                return peer.name
        return "unknown key " + frame.sender_key.hex()[:16]

    # --- local queries ---------------------------------------------------------------------------

    def history(self, conv: str, limit: int) -> list[dict[str, object]]:
        with self._lock:
            return [
                {**e.record, "status": e.status, "msg_id": e.msg_id.hex()}
                for e in self.store.history(conv, limit)
            ]


