"""The daemon's methods and subscriptions, whatever carries the requests (shell).

Theory of operation
-------------------
One :class:`Daemon` per identity owns the :class:`~securechat.client.messenger.Messenger`
(and through it the store's lock, the relay link, the outbox and the receipts).
Connections (:mod:`securechat.daemon.server`) call :meth:`Daemon.call` one request
at a time; the methods are small: they check their parameters, call the
messenger, and shape the answer (:mod:`securechat.daemon.api`).

Nothing is lost for want of a subscriber. Every message stored, every mark
raised and every key change is a row of the store's event log, written in the
transaction that changed the history, whoever held the identity then (this
daemon, or ``talk`` before it started). Subscribers read that log from their
cursor (:mod:`securechat.daemon.log`); this module keeps the registry and
decides what happens to one that falls behind: events that are not history
(presence, the relay connection, notices and errors) are offered to every
subscriber as they happen, and a subscriber whose queue is full
(:data:`~securechat.daemon.server.MAX_QUEUED_EVENTS`) is dropped with an
``error`` event that carries its last cursor; it subscribes again from there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from securechat import __version__
from securechat.client import app, keystore
from securechat.client.events import Event, MessageEvent, PresenceEvent, StatusEvent
from securechat.client.messenger import Messenger
from securechat.client.peers import Conversation, KnownPeers
from securechat.client.relays import KnownRelays
from securechat.client.store import ClientStore, HistoryEntry
from securechat.core import envelope, keys
from securechat.daemon import api, rpc
from securechat.daemon.log import EventLog, Sink, Subscription
from securechat.errors import PeerKeyChangedError, SecureChatError, UsageError

# Chosen bounds on what one request may ask for.
MAX_RECIPIENTS: Final = envelope.MAX_GROUP_MEMBERS
MAX_LINE_CHARS: Final = 512  # a name or a public key line
MAX_HISTORY: Final = 1000  # history: messages per call
DEFAULT_HISTORY: Final = 50
MAX_STATUS_IDS: Final = 1000
MAX_SUBSCRIBERS: Final = 16  # subscriptions at once, over every connection
MAX_CURSOR: Final = 2**62
STOP_GRACE: Final = 2.0  # seconds a stopping daemon waits for each subscription thread


@dataclass(slots=True)
class Caller:
    """What the daemon knows of one connection: its sink and its subscription."""

    sink: Sink
    subscription: Subscription | None = None
    after: list[Callable[[], None]] = field(default_factory=list)  # run once answered


class Daemon:
    """See the module docstring."""

    def __init__(
        self,
        identity: keys.Identity,
        store: ClientStore,
        reader: ClientStore,
        relay_address: str,
        known_relays: KnownRelays,
        *,
        pinned_relay_key: bytes | None = None,
    ) -> None:
        self.identity = identity
        self.account = identity.name
        self.log = EventLog(reader, identity.name, identity.public.dh.hex())
        self._subs: set[Subscription] = set()
        self._subs_lock = threading.Lock()
        self._presence: dict[str, bool] = {}
        self._flagged: dict[str, str] = {}  # peer name -> the new fingerprint reported
        self._watched = {p.name for p in KnownPeers(store).identities()}
        self.messenger = Messenger(
            identity,
            store,
            relay_address,
            known_relays,
            self._on_event,
            pinned_relay_key=pinned_relay_key,
            watch=KnownPeers(store).identities(),
        )
        self.start_cursor = self.log.bounds()[1]
        self._methods: dict[str, tuple[Callable[[dict[str, Any], Caller], Any], frozenset[str]]]
        self._methods = {
            "version": (self._version, frozenset()),
            "status": (self._status, frozenset({"ids"})),
            "peers": (self._peers, frozenset()),
            "fingerprint": (self._fingerprint, frozenset({"peer"})),
            "safetyNumber": (self._safety_number, frozenset({"peer"})),
            "trust": (self._trust, frozenset({"peer"})),
            "checkPeers": (self._check_peers, frozenset({"to"})),
            "send": (self._send, frozenset({"to", "conv", "text"})),
            "history": (self._history, frozenset({"to", "conv", "limit", "before"})),
            "subscribe": (self._subscribe, frozenset({"since"})),
            "unsubscribe": (self._unsubscribe, frozenset()),
        }

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.messenger.start()

    def stop(self) -> None:
        """Stop the subscriptions and the messenger, then close the reading connection
        (under its lock: a subscription thread never reads a closed connection)."""
        with self._subs_lock:
            subs = list(self._subs)
            self._subs.clear()
        for sub in subs:
            sub.stop()
        self.log.wake()
        for sub in subs:
            sub.join(STOP_GRACE)
        self.messenger.stop()
        self.log.close()

    def close(self, caller: Caller) -> None:
        """A connection ended: its subscription goes with it."""
        if caller.subscription is not None:
            self._end(caller.subscription)
            caller.subscription = None

    # --- dispatch --------------------------------------------------------------------------

    def call(self, request: rpc.Request, caller: Caller) -> Any:
        """Run one request; raise :class:`~securechat.daemon.rpc.RpcError` for its error."""
        entry = self._methods.get(request.method)
        if entry is None:
            raise rpc.RpcError(
                rpc.METHOD_NOT_FOUND,
                f"no method {request.method!r}; the methods are {sorted(self._methods)}",
            )
        method, allowed = entry
        rpc.check_known(request.params, allowed)
        try:
            return method(request.params, caller)
        except SecureChatError as exc:
            raise rpc.RpcError.of(exc) from exc

    # --- events from the messenger (any thread) ---------------------------------------------

    def _on_event(self, event: Event) -> None:
        if not isinstance(event, MessageEvent | StatusEvent):
            self.log.wake()  # a notice may follow a log write too (a refused or held message)
        if isinstance(event, MessageEvent | StatusEvent):
            if isinstance(event, MessageEvent) and not event.verified:
                self._stranger_named_like_a_peer(event)
            self.log.wake()  # the log has it already (same transaction as the history)
            return
        if isinstance(event, PresenceEvent):
            self._presence[event.name] = event.online
        live = api.live(event, self.account)
        if live is not None:
            self._broadcast(live)

    def _broadcast(self, event: dict[str, Any]) -> None:
        with self._subs_lock:
            subs = list(self._subs)
        for sub in subs:
            if not sub.sink.offer(event):
                self._drop(sub)

    def _stranger_named_like_a_peer(self, event: MessageEvent) -> None:
        """A message from a key we do not know: if it uses a known peer's name, or a
        known peer's ``NAME.pub`` now holds another key, that peer's key changed (or
        someone pretends); say so once per new key, as ``keyChanged``. Costs one read
        of each known peer's small file per unverified message, which the relay's
        rate limits bound."""
        known = {p.name: p for p in self.messenger.peers.identities()}
        peer = known.get(event.sender_name)
        if peer is not None:
            self._flag(event.sender_name, peer.fingerprint, event.sender_fingerprint)
        for other in known.values():
            self._file_changed(other)

    def _flag(self, name: str, old: str, new: str) -> None:
        if self._flagged.get(name) == new:
            return  # said already: a flood of messages logs one event
        self._flagged[name] = new
        self.messenger.record_event({"type": "keyChanged", "peer": name, "old": old, "new": new})
        self.log.wake()

    # --- subscriptions ----------------------------------------------------------------------

    def _drop(self, sub: Subscription) -> None:
        if self._end(sub):
            sub.sink.fail(
                {
                    "type": "error",
                    "cursor": sub.cursor,
                    "account": self.account,
                    "code": rpc.SLOW_SUBSCRIBER,
                    "message": "events were not read fast enough: this subscription ended; "
                    f"subscribe again with since={sub.cursor} to resume (nothing is lost)",
                }
            )

    def _end(self, sub: Subscription) -> bool:
        with self._subs_lock:
            present = sub in self._subs
            self._subs.discard(sub)
        sub.stop()
        return present

    # --- the methods -----------------------------------------------------------------------

    def _version(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return {
            "version": __version__,
            "api": api.API_VERSION,
            "account": self.account,
            "fingerprint": self.identity.public.fingerprint,
            "publicKey": self.identity.public.to_line(),
            "relay": self.messenger.relay_address,
            "startCursor": self.start_cursor,
            "cursor": self.log.bounds()[1],
        }

    def _status(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        ids = (
            rpc.get_str_list(params, "ids", max_items=MAX_STATUS_IDS, max_chars=64)
            if "ids" in params
            else []
        )
        m = self.messenger
        refused = {}
        for hex_id in ids:
            reason = m.refused.get(_msg_id(hex_id))
            if reason is not None:
                refused[hex_id] = reason
        return {
            "connected": m.connected,
            "relay": m.relay_address,
            "pending": m.pending(),
            "synced": m.synced.is_set(),
            "fatal": _error_dict(m.fatal),
            "lastError": _error_dict(m.last_connect_error),
            "refused": refused,
        }

    def _peers(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        out = []
        for peer in sorted(self.messenger.peers.identities(), key=lambda p: p.name):
            out.append(
                {
                    "name": peer.name,
                    "fingerprint": peer.fingerprint,
                    "online": self._presence.get(peer.name),
                    "keyChanged": self._file_changed(peer) or peer.name in self._flagged,
                }
            )
        return {"peers": out}

    def _file_changed(self, known: keys.PublicIdentity) -> bool:
        """Whether ``NAME.pub`` in the key directory now holds another key (flagged once)."""
        try:
            current = keystore.load_public(known.name, peer=True)
        except SecureChatError:
            return known.name in self._flagged
        if current.same_keys(known):
            return False
        self._flag(known.name, known.fingerprint, current.fingerprint)
        return True

    def _fingerprint(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        if "peer" not in params:
            me = self.identity.public
            return {"name": me.name, "fingerprint": me.fingerprint}
        peer = self._peer_file(params)
        return {"name": peer.name, "fingerprint": peer.fingerprint}

    def _safety_number(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        peer = self._peer_file(params)
        return {
            "peer": peer.name,
            "fingerprint": peer.fingerprint,
            "safetyNumber": keys.safety_number(self.identity.public, peer),
        }

    def _trust(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        peer = self._peer_file(params)
        replaced = self.messenger.trust(peer)
        self._flagged.pop(peer.name, None)
        self._watched = set()
        self._rewatch()
        return {"peer": peer.name, "fingerprint": peer.fingerprint, "replaced": replaced}

    def _peer_file(self, params: dict[str, Any]) -> keys.PublicIdentity:
        """``NAME.pub`` from the key directory: a name only, never a path."""
        name = rpc.get_str(params, "peer", max_chars=keys.MAX_NAME)
        try:
            keys.check_name(name)
        except SecureChatError as exc:
            raise rpc.invalid(f"peer: {exc}") from exc
        return keystore.load_public(name, peer=True)

    def _check_peers(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        peers = self._recipients(params)
        changed = self.messenger.check_peers(peers)
        for name, _exc in changed.items():
            self._flag_from_file(name)
        self._rewatch()
        return {"changed": {name: str(exc) for name, exc in changed.items()}}

    def _flag_from_file(self, name: str) -> None:
        known = {p.name: p for p in self.messenger.peers.identities()}.get(name)
        if known is not None:
            self._file_changed(known)

    def _send(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        text = rpc.get_str(params, "text", max_chars=envelope.MAX_TEXT_BYTES)
        if not text.strip():
            raise rpc.invalid("text is empty")
        if len(text.encode()) > envelope.MAX_TEXT_BYTES:
            raise UsageError(
                f"the message is more than {envelope.MAX_TEXT_BYTES} bytes",
                hint="shorten it, or send it in parts",
            )
        conv = self._conversation(params)
        try:
            msg_id = self.messenger.send_text(conv, text)
        except PeerKeyChangedError:
            for peer in conv.peers:
                self._flag_from_file(peer.name)
            raise
        self.log.wake()
        self._rewatch()
        return {"id": msg_id.hex(), "conversation": conv.conv_id}

    def _rewatch(self) -> None:
        """Watch the presence of every known peer (a send may have added one)."""
        known = self.messenger.peers.identities()
        names = {p.name for p in known}
        if names != self._watched:
            self._watched = names
            self.messenger.watch(known)

    def _conversation(self, params: dict[str, Any]) -> Conversation:
        if ("to" in params) == ("conv" in params):
            raise rpc.invalid("give either to (names or public key lines) or conv (an id)")
        if "to" in params:
            return app.conversation(self.identity.public, self._recipients(params))
        conv_id = rpc.get_str(params, "conv", max_chars=80)
        entries = self.log.read(lambda reader: reader.history(conv_id, 1))
        if not entries:
            raise rpc.invalid(f"no conversation {conv_id!r} in the history; send with to")
        record = entries[0].record
        if record.get("out"):
            members = [str(k) for k in record.get("to", [])]
        else:
            members = [str(k) for k in record.get("members") or [record.get("from", "")]]
        peers = []
        for hex_key in members:
            if hex_key == self.log.me_hex:
                continue
            peer = self.messenger.peers.trusted_identity(bytes.fromhex(hex_key))
            if peer is None:
                raise UsageError(
                    f"a member of {conv_id} is not among your known peers",
                    hint="exchange keys with them (securechat invite) or send with to",
                )
            peers.append(peer)
        return app.conversation(self.identity.public, peers)

    def _recipients(self, params: dict[str, Any]) -> list[keys.PublicIdentity]:
        items = rpc.get_str_list(params, "to", max_items=MAX_RECIPIENTS, max_chars=MAX_LINE_CHARS)
        peers = []
        for item in items:
            if item.startswith(keys.PUBLIC_PREFIX):
                peers.append(keys.PublicIdentity.from_line(item))
            else:
                peers.append(self._peer_file({"peer": item}))
        return peers

    def _history(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        limit = rpc.get_int(params, "limit", low=1, high=MAX_HISTORY, default=DEFAULT_HISTORY)
        before = rpc.get_int(params, "before", low=1, high=MAX_CURSOR, default=MAX_CURSOR)
        if "conv" in params:
            conv_id = rpc.get_str(params, "conv", max_chars=80)
        elif "to" in params:
            conv_id = app.conversation(self.identity.public, self._recipients(params)).conv_id
        else:
            raise rpc.invalid("give to (names or public key lines) or conv (an id)")
        page, names = self.log.read(
            lambda reader: (reader.history_page(conv_id, before, limit), self.log.names(reader))
        )
        messages = [self._history_item(seq, e, names) for seq, e in page]
        return {"messages": messages, "before": page[0][0] if page else None}

    def _history_item(self, seq: int, entry: HistoryEntry, names: api.Names) -> dict[str, Any]:
        item = api.message(entry, self.account, self.log.me_hex, names, None)
        item["seq"] = seq
        return item

    def _subscribe(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        oldest, latest = self.log.bounds()
        since = rpc.get_int(params, "since", low=0, high=MAX_CURSOR, default=latest)
        if caller.subscription is not None:
            self._end(caller.subscription)
            caller.subscription = None
        sub = Subscription(self.log, caller.sink, since, self._drop, self._end)
        with self._subs_lock:
            if len(self._subs) >= MAX_SUBSCRIBERS:
                raise rpc.RpcError(
                    rpc.TOO_MANY_SUBSCRIBERS,
                    f"{MAX_SUBSCRIBERS} subscribers already; close one first",
                )
            self._subs.add(sub)
        caller.subscription = sub
        caller.after.append(sub.start)  # events only after the answer
        missed = oldest > 0 and since < oldest - 1
        return {"since": since, "oldest": oldest, "latest": latest, "missed": missed}

    def _unsubscribe(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        if caller.subscription is None:
            raise rpc.RpcError(rpc.NOT_SUBSCRIBED, "this connection has no subscription")
        self._end(caller.subscription)
        cursor = caller.subscription.cursor
        caller.subscription = None
        return {"cursor": cursor}


def _msg_id(hex_id: str) -> bytes:
    try:
        return bytes.fromhex(hex_id)
    except ValueError as exc:
        raise rpc.invalid("ids are hexadecimal message ids") from exc


def _error_dict(exc: SecureChatError | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    return {
        "code": exc.exit_code,
        "message": str(exc),
        "hint": exc.hint,
        "type": type(exc).__name__,
    }


def socket_path(home: Path, name: str) -> Path:
    """Where the daemon of ``name`` listens: ``NAME.sock`` in the key directory."""
    return home / f"{name}.sock"
