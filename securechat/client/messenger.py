"""The client's network pump: one thread that connects, reads, feeds the session, writes (shell).

Theory of operation
-------------------
The rules are in :class:`~securechat.client.session.ClientSession` (no I/O).
This module only moves bytes and time: one network thread owns the
:class:`~securechat.client.link.RelayLink`; it connects (exponential backoff
with full jitter while the relay is away), tells the session, writes what the
session returns (the outbox first), then loops: read frames for up to
:data:`POLL_INTERVAL`, feed them and the clock to the session, write its frames,
ping when idle. The UI thread calls :meth:`Messenger.send_text`.

One lock guards the session: every call into it, and the write of the frames it
returned, happens under the lock, so frames leave in the order the session made
them (an old message before a new one). Events are handed to ``on_event``
after the lock is released, by the thread whose call produced them.

A clean :meth:`stop` lets the network thread finish the frames in hand, and so
send their acknowledgements, before the link closes: a clean exit never makes the
relay redeliver what this client committed. An exception that escapes the
thread is a bug and becomes :attr:`Messenger.fatal` (an InternalError), never a
silent death.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

from securechat.client.events import ConnectionEvent, Event, NoticeEvent, Output
from securechat.client.link import RelayLink
from securechat.client.peers import Conversation, KnownPeers
from securechat.client.relays import KnownRelays, split_relays
from securechat.client.session import ClientSession, Tap
from securechat.client.store import ClientStore
from securechat.core import keys, wire
from securechat.errors import (
    InternalError,
    PeerKeyChangedError,
    ProtocolError,
    RelayKeyChangedError,
    SecureChatError,
    TransportError,
)

BACKOFF_INITIAL: Final = 0.25
BACKOFF_MAX: Final = 15.0
POLL_INTERVAL: Final = 0.2
STOP_GRACE: Final = 2.0  # seconds a clean stop waits for the network thread
PING_INTERVAL: Final = 20.0
_WAIT_STEP: Final = 0.02  # polling step of the wait_* helpers for commands


def now_ms() -> int:
    """The wall clock in milliseconds: message times and the E2E rules use it."""
    return int(time.time() * 1000)


class Messenger:
    """See the module docstring. Attributes of the session are shown through properties."""

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
        tap: Tap | None = None,
        receive: bool = True,
    ) -> None:
        self.session = ClientSession(
            identity,
            store,
            os.urandom,
            keep_history=keep_history,
            watch=watch,
            receive=receive,
            tap=tap,
        )
        self.relay_address = relay_address
        # Several addresses (``a:5050,b:5050``): the nodes of one relay cluster, tried in
        # turn; once one of them proved the relay key, every other must present the same.
        self._relays = split_relays(relay_address) if "," in relay_address else [relay_address]
        self._relay_index = 0
        self._cluster_key: bytes | None = None
        self._known_relays = known_relays
        self._pinned = pinned_relay_key
        self._emit = on_event
        self._lock = threading.RLock()
        self._link: RelayLink | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: SecureChatError | None = None
        self.synced = threading.Event()
        # Why the last connection attempt failed (None once connected): lets commands
        # say "connection refused" at once instead of waiting out their timeout.
        self.last_connect_error: SecureChatError | None = None

    # --- what the session knows ------------------------------------------------------------

    @property
    def identity(self) -> keys.Identity:
        return self.session.identity

    @property
    def store(self) -> ClientStore:
        return self.session.store

    @property
    def peers(self) -> KnownPeers:
        return self.session.peers

    @property
    def fatal(self) -> SecureChatError | None:
        """Why the messenger stopped for good (a changed relay key, REPLACED, a bug)."""
        return self._fatal or self.session.fatal

    @property
    def refused(self) -> OrderedDict[bytes, str]:
        return self.session.refused

    @property
    def received_count(self) -> int:
        return self.session.received_count

    @property
    def connected(self) -> bool:
        return self._link is not None

    # --- what the user does --------------------------------------------------------------

    def send_text(self, conv: Conversation, text: str) -> bytes:
        """Seal, persist and (if connected) send; or hold until prekeys come. Return the id."""
        with self._lock:
            msg_id, out = self.session.send_text(conv, text, now_ms())
            self._write_quietly(out.frames)
        self._report(out)
        return msg_id

    def check_peers(self, peers: Iterable[keys.PublicIdentity]) -> dict[str, PeerKeyChangedError]:
        """Record new peers; ``{name: why}`` for those whose key changed."""
        with self._lock:
            return self.session.check_peers(peers)

    def trust(self, peer: keys.PublicIdentity) -> bool:
        """Accept ``peer``'s current key; True if it replaced another."""
        with self._lock, self.store.transaction():
            return self.peers.trust(peer)

    def pending(self) -> int:
        with self._lock:
            return self.session.pending()

    def record_event(self, event: dict[str, object]) -> int:
        """Append an event to the store's log (a daemon's ``keyChanged``); return its cursor."""
        with self._lock, self.store.transaction():
            return self.store.event_add(event)

    def watch(self, peers: Iterable[keys.PublicIdentity]) -> None:
        """Report these peers' presence from now on (replaces the list)."""
        with self._lock:
            out = self.session.watch(peers)
            self._write_quietly(out.frames)

    def history(self, conv: str, limit: int) -> list[dict[str, object]]:
        with self._lock:
            return self.session.history(conv, limit)

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._link is None and self.fatal is None and time.monotonic() < deadline:
            time.sleep(_WAIT_STEP)
        return self._link is not None

    def wait_all_accepted(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending() == 0:
                return True
            if self.fatal is not None:
                return False
            time.sleep(_WAIT_STEP)
        return self.pending() == 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="securechat-net", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop cleanly: the frames in hand are handled (and acknowledged) first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE)
        link = self._link
        if link is not None:
            link.close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE)

    def _run(self) -> None:
        try:
            self._connect_loop()
        except Exception as exc:
            self._fatal = InternalError(
                f"the network thread failed ({type(exc).__name__}: {exc}); nothing "
                "unacknowledged was lost",
                hint="restart to retry; this is a bug, please report it",
            )
            self._emit(NoticeEvent(self._fatal.full_text(), error=True))

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
                    pinned_from=(
                        "--relay-key"
                        if self._pinned is not None
                        else "the other addresses of --relay (one relay's nodes share one key)"
                    ),
                    sign_public=self.identity.public.sign,
                )
            except RelayKeyChangedError as exc:
                self._fatal = exc
                self._emit(NoticeEvent(exc.full_text(), error=True))
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
                out = self.session.connection_made(now_ms())
                link.send(out.frames)
            self._emit(ConnectionEvent(True, f"connected to {link.address}"))
            self._report(out)
            self._pump(link)
        except TransportError as exc:
            if not self._stop.is_set():
                self._emit(ConnectionEvent(False, f"disconnected: {exc}"))
        except ProtocolError as exc:
            self._emit(NoticeEvent(f"relay connection failed: {exc}", error=True))
        finally:
            with self._lock:
                self._link = None
                self.session.connection_lost()
            link.close()

    def _pump(self, link: RelayLink) -> None:
        """Read, feed the session, write what it returns; ping an idle link."""
        last_ping = time.monotonic()
        while not self._stop.is_set() and self.fatal is None:
            frames = link.receive(POLL_INTERVAL)
            with self._lock:
                out = self.session.receive(frames, now_ms()) if frames else Output()
                out.extend(self.session.tick(now_ms()))
                link.send(out.frames)
            if self.session.synced:
                self.synced.set()
            self._report(out)
            if time.monotonic() - last_ping > PING_INTERVAL:
                link.send([wire.Ping(int(time.monotonic()))])
                last_ping = time.monotonic()

    def _write_quietly(self, frames: list[wire.Frame]) -> None:
        """Write if connected (called under the lock); a failure is the network thread's news."""
        link = self._link
        if link is not None:
            # On failure the outbox holds them; the network thread reconnects and resends.
            with contextlib.suppress(TransportError):
                link.send(frames)

    def _report(self, out: Output) -> None:
        for event in out.events:
            self._emit(event)
