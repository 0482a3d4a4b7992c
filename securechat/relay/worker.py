"""I/O workers: each a ``selectors`` loop over its share of connections.

Per loop turn a worker: reads every readable socket once (one large recv),
feeds the bytes to the connection's Noise state and frame decoder, handles
every complete frame, runs the callbacks other threads posted, and finally
encrypts *all* output queued for a connection during the turn with one
``NoiseConnection.send`` and writes it with one ``send`` (write coalescing).

Connection states::

    HANDSHAKE --(Noise XX complete)--> OPEN --(error, EOF, timeout, shutdown, replaced)--> CLOSED
    HANDSHAKE --(bad record, deadline, EOF, evicted for a newcomer)--------------------> CLOSED

Reading a connection stops while any of these holds (``Conn.blocks``), and its
bytes wait in the kernel: its output is above the high-water mark (B_OUT); the
store's queue is too long (B_STORE, every connection); it has too many store
requests of its own outstanding (B_CONN_STORE); a frame of an expensive type is
over its shared budget (B_HOLD: the frame and those after it wait, in order,
until the budget allows; see ``guard.Budgets``); it spent beyond its frame
budget (B_DEBT: frames already read are handled, and reading waits until the
budget is back above zero); frames it sent earlier still wait to be decoded
(B_BACKLOG: at most ``DECODE_LIMIT`` bytes of frames are decoded per connection
per loop turn; after a hold, what arrived behind the held frames).

A recipient connection's delivery mode (see ``docs/protocol.md`` section 3.3)::

    STORE --(fetch returned the last stored row, no insert pending, buffer has room)--> LIVE
    LIVE  --(output above high water, too many unacked, reader stalled,
             or the worker's unsent output above its cap)--> STORE

In STORE mode new copies are appended to the store and fetched in order, so a
sender's frames never overtake each other. Exceptions while handling one
connection close that connection, never the worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from securechat.core import wire
from securechat.core.encoding import fingerprint
from securechat.core.noise import HandshakeComplete, NoiseConnection
from securechat.errors import FrameError, FrameTooLargeError, ProtocolError, SecureChatError
from securechat.relay import handlers, rendezvous
from securechat.relay.guard import Admission, Budgets, PartialBytes, prefix_of
from securechat.relay.limits import (
    DECODE_LIMIT,
    FETCH_BATCH,
    FETCH_BYTES,
    HOLD_MAX_S,
    INITIAL_FRAME_ALLOWANCE,
    MAX_CONN_STORE_COST,
    OUT_HARD_LIMIT,
    RECV_SIZE,
    STORE_REQUEST_COST,
    TICK_S,
    RelayConfig,
    TokenBucket,
)
from securechat.relay.mailboxes import Fetch, Insert, InsertResult, MarkKnown, Request, Row
from securechat.relay.oserrors import describe
from securechat.relay.router import (
    CLOSED,
    HANDSHAKE,
    OPEN,
    Copy,
    Inflight,
    Router,
    Submission,
    insert_outcome,
    resolve,
)
from securechat.relay.store_thread import StoreThread

log = logging.getLogger("securechat.relay")

_READ: Final = selectors.EVENT_READ
_WRITE: Final = selectors.EVENT_WRITE
_SLOW_TIMERS_S: Final = 1.0
_ACCEPT_BATCH: Final = 64  # connections accepted per listener event (then serve the others)
_ACCEPT_BACKOFF_S: Final = 0.05  # after accept failed (e.g. out of descriptors): do not spin
_LISTENER: Final = object()  # selector data of the listening socket
_INFLIGHT_CHECK_S: Final = 0.05  # resolution of the ack timeout (seconds)
# Why reading a connection is stopped (bits of Conn.blocks); read again when all clear.
B_OUT: Final = 1  # its output is above the high-water mark (it does not read)
B_STORE: Final = 2  # the store thread's queue is above its high-water mark
B_CONN_STORE: Final = 4  # its outstanding store requests cost MAX_CONN_STORE_COST
B_HOLD: Final = 8  # a frame waits for its shared budget (guard.Budgets)
B_DEBT: Final = 16  # it spent more than its frame budget: not read until it is paid back
B_BACKLOG: Final = 32  # decoded frames wait in its decoder: decode those before reading more
# Blocks during which we are the ones not reading: no idle timeout then.
_UNREAD: Final = B_STORE | B_CONN_STORE | B_HOLD | B_DEBT | B_BACKLOG

# The message-3 payload a client may send: nothing (older clients) or its Ed25519 key.
ED25519_KEY_SIZE: Final = 32
# Log label of a client that did not send its signing key: its X25519 key's fingerprint,
# which is NOT the identity fingerprint users compare (that one covers both keys).
X25519_ONLY_LABEL: Final = "x25519-only:"


class RelayContext:
    """What every worker shares: configuration, routing table, store, relay key."""

    def __init__(
        self,
        config: RelayConfig,
        router: Router,
        store: StoreThread,
        static_private: bytes,
    ) -> None:
        self.config = config
        self.router = router
        self.store = store
        self.static_private = static_private
        self.admission: Admission[Conn] = Admission(config)
        self.budgets = Budgets(config)
        self.partial: PartialBytes[Conn] = PartialBytes(
            config.partial_bytes, config.partial_bytes_per_prefix
        )
        self.rendezvous: rendezvous.Rendezvous[Conn] = rendezvous.Rendezvous(config)  # invites
        self.listener: socket.socket | None = None  # set by the relay before workers start


class Conn:
    """One client connection; touched only by its worker's thread."""

    __slots__ = (
        "addr",
        "blocks",
        "bucket_bytes",
        "bucket_frames",
        "cursor",
        "deadline",
        "debt_until",
        "decoder",
        "dirty",
        "fetching",
        "fp",
        "frame_at",
        "held_frames",
        "hold_until",
        "identity",
        "inflight",
        "inflight_bytes",
        "ip",
        "last_rx",
        "live",
        "mailbox",
        "noise",
        "origin",
        "out",
        "own_inserts",
        "partial",
        "pending",
        "pending_size",
        "prefix",
        "sent_stored",
        "sock",
        "state",
        "store_dirty",
        "store_out",
        "synced",
        "watching",
        "worker",
    )  # fmt: skip

    def __init__(
        self,
        worker: Worker,
        sock: socket.socket,
        addr: tuple[str, int],
        now: float,
        prefix: str,
    ) -> None:
        cfg = worker.ctx.config
        self.worker = worker
        self.sock = sock
        self.ip = addr[0]
        self.addr = f"{addr[0]}:{addr[1]}"
        self.prefix = prefix
        self.origin = self.prefix.encode()  # the store's per-prefix quota key
        self.noise = NoiseConnection(
            initiator=False, static_private=worker.ctx.static_private, rng=os.urandom
        )
        self.decoder = wire.FrameDecoder()
        self.state = HANDSHAKE
        self.deadline = now + cfg.handshake_timeout
        self.last_rx = now
        self.identity: bytes | None = None
        self.mailbox: bytes | None = None
        self.fp = ""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.dirty = False
        self.out = bytearray()
        self.blocks = 0  # B_* bits: reasons not to read this connection now
        self.store_out = 0  # cost of its store requests not answered yet
        self.held_frames: list[wire.Frame] | None = None  # frames waiting for a budget
        self.hold_until = 0.0
        self.debt_until = 0.0
        self.partial = 0  # bytes held for an incomplete record or frame
        self.frame_at = now  # when a frame last completed (the frame deadline)
        self.bucket_frames = TokenBucket(
            cfg.rate_frames, cfg.burst_frames, now, INITIAL_FRAME_ALLOWANCE
        )
        self.bucket_bytes = TokenBucket(cfg.rate_bytes, cfg.burst_bytes, now)
        self.inflight: dict[tuple[bytes, bytes], Inflight] = {}
        self.inflight_bytes = 0
        self.sent_stored: set[tuple[bytes, bytes]] = set()
        self.live = False
        self.fetching = False
        self.store_dirty = False
        self.cursor = 0
        self.own_inserts = 0
        self.synced = False
        self.watching: frozenset[bytes] = frozenset()

    def name(self) -> str:
        return self.fp or self.addr

    def backlog(self) -> int:
        return len(self.out) + self.pending_size


class Worker:
    """A selector loop owning a set of connections."""

    def __init__(self, index: int, ctx: RelayContext) -> None:
        self.index = index
        self.ctx = ctx
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, _READ, None)
        self._accept_resume = 0.0  # when a paused listener is watched again (0: not paused)
        self._queue: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._local: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._signaled = False
        self._dirty: list[Conn] = []
        self.conns: set[Conn] = set()
        self.awaiting: set[Conn] = set()  # connections with live deliveries awaiting Ack
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"relay-io-{index}", daemon=True)
        self._tid = 0
        self.now = time.monotonic()
        self.now_ms = int(time.time() * 1000)  # wall clock per loop turn: frame timestamps
        self._next_slow = 0.0
        self._next_inflight = 0.0
        self.turns = 0  # loop turns so far
        # Ciphertext the kernel did not take yet, over all connections: above
        # ``worker_high_water`` new copies go to the store instead, so a burst to many
        # slow readers cannot grow memory (unacked bytes: see handlers._stalled).
        self.held_bytes = 0
        # Payload of live deliveries awaiting their Ack, over all connections (bounded
        # by worker_inflight_high_water, see handlers.incoming).
        self.inflight_bytes = 0
        self.paused: set[Conn] = set()  # not read while the store's queue is too long
        self.held: set[Conn] = set()  # holding frames until their budget allows (B_HOLD)
        self.indebted: set[Conn] = set()  # over their frame budget (B_DEBT)
        self.backlog: set[Conn] = set()  # frames left undecoded by DECODE_LIMIT (B_BACKLOG)
        self.partials: set[Conn] = set()  # holding a partial record or frame
        # One receive buffer per worker: ``recv(256 KiB)`` would allocate (mmap) and
        # free 256 KiB per call, about 13 us here; ``recv_into`` + copy of what came: 2 us.
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)

    # --- cross-thread interface --------------------------------------------------------------
    def start(self) -> None:
        if self.ctx.listener is not None:
            self.sel.register(self.ctx.listener, _READ, _LISTENER)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def on_own_thread(self) -> bool:
        return threading.get_ident() == self._tid

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on this worker's thread (soon, in posting order)."""
        if threading.get_ident() == self._tid:
            self._local.append((fn, args))
            return
        self._queue.append((fn, args))
        if not self._signaled:
            self._signaled = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"\0")

    # --- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        self._tid = threading.get_ident()
        while True:
            timeout = 0.0 if (self._local or self._queue or self.backlog) else TICK_S
            try:
                events = self.sel.select(timeout)
            except OSError as exc:  # pragma: no cover - selector broken: nothing sane left
                log.error("worker %d selector failed: %s", self.index, exc)
                break
            self.now = time.monotonic()
            self.now_ms = int(time.time() * 1000)
            self.turns += 1
            for key, mask in events:
                conn = key.data
                if conn is None:
                    self._drain_wakeups()
                    continue
                if conn is _LISTENER:
                    self._accept()
                    continue
                try:  # inline _guard: this is the per-event hot path
                    if mask & _READ and conn.state != CLOSED:
                        self._on_readable(conn)
                    if mask & _WRITE and conn.state != CLOSED:
                        self._on_writable(conn)
                except Exception:
                    self._internal_error(conn)
            if self.backlog:
                self._decode_backlog()
            self._run_callbacks()
            self._timers()
            self._flush_dirty()
            if self._stopping:
                break
        self.sel.close()

    def _guard(self, conn: Conn | None, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._internal_error(conn)

    def _internal_error(self, conn: Conn | None) -> None:
        log.exception("internal error handling %s", conn.name() if conn else "a callback")
        if conn is not None and conn.state != CLOSED:
            self.close(conn, "internal error")

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _run_callbacks(self) -> None:
        self._signaled = False
        for _ in range(2):
            queue = self._queue
            while queue:
                fn, args = queue.popleft()
                self._guard(None, fn, *args)
            local = self._local
            while local:
                fn, args = local.popleft()
                self._guard(None, fn, *args)

    # --- accepting and closing ----------------------------------------------------------------
    def _accept(self) -> None:
        """Take waiting connections from the shared listener (every worker watches it).

        Accepting in the worker that will serve the connection, instead of in
        an acceptor thread that hands it over, saves a thread switch, a
        wake-up write and a GIL hand-off per connection (handshakes/s). With
        several workers each accepts what it wins; the others see EAGAIN.
        """
        listener = self.ctx.listener
        assert listener is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: pause, do not spin
                log.warning("accept failed: %s", describe(exc))
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(listener)
                self._accept_resume = self.now + _ACCEPT_BACKOFF_S
                return
            self.add_connection(sock, (addr[0], addr[1]))

    def add_connection(self, sock: socket.socket, addr: tuple[str, int]) -> None:
        """Admit (or refuse) a new TCP connection; see ``guard.Admission`` for the rules."""
        if self._stopping:
            sock.close()
            return
        ip = addr[0]
        prefix = prefix_of(ip)
        now = self.now
        conn, reason, victims = self.ctx.admission.admit(
            ip, prefix, now, lambda: Conn(self, sock, addr, now, prefix)
        )
        for victim in victims:  # the oldest unfinished handshakes make room
            victim.worker.call_soon(
                victim.worker.close, victim, "evicted: too many unfinished handshakes"
            )
        if conn is None:
            log.debug("refused %s:%d: over the limit of %s", ip, addr[1], reason)
            sock.close()
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conns.add(conn)
        self.sel.register(sock, _READ, conn)
        log.debug("client connected from %s", conn.addr)

    def close(self, conn: Conn, reason: str, error: tuple[int, bytes] | None = None) -> None:
        """Close one connection: send ``Error`` first if possible, keep every copy safe."""
        if conn.state == CLOSED:
            return
        if error is not None and conn.state == OPEN:
            code, msg_id = error
            self.queue_frame(conn, wire.encode(wire.Error(code, msg_id, reason[:200])))
            self._flush(conn)
        was_open = conn.state == OPEN
        conn.state = CLOSED
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.discard(conn)
        self.awaiting.discard(conn)
        self.paused.discard(conn)
        self.held.discard(conn)
        self.indebted.discard(conn)
        self.backlog.discard(conn)
        conn.held_frames = None
        if conn.partial:
            self.partials.discard(conn)
            self.ctx.partial.forget(conn)
            conn.partial = 0
        self.ctx.admission.release(conn, conn.ip, conn.prefix)
        self.held_bytes -= len(conn.out)
        conn.pending.clear()
        conn.pending_size = 0
        conn.out = bytearray()
        if was_open:
            log.info("disconnected %s: %s", conn.fp, reason)
            self._after_close(conn)
        else:  # unauthenticated: routine under attack, so not at INFO
            log.debug("closed %s: %s", conn.addr, reason)

    def _after_close(self, conn: Conn) -> None:
        ctx = self.ctx
        if ctx.router.unregister(conn):
            self._presence_changed(conn, online=False)
        if conn.watching:
            ctx.router.watch(conn, conn.watching, frozenset())
        rendezvous.closed(self, conn)  # its invites end; the other parties are told
        for entry in conn.inflight.values():  # delivered but never acked: persist
            self.store_copy(entry.copy, force=True, subs=entry.subs)
        conn.inflight.clear()
        self.inflight_bytes -= conn.inflight_bytes
        conn.inflight_bytes = 0

    def shutdown(self) -> None:
        if self.ctx.listener is not None:  # stop accepting first
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(self.ctx.listener)
            self._accept_resume = 0.0
        for conn in list(self.conns):
            self.close(conn, "relay shutting down", (wire.SERVER_SHUTDOWN, wire.NO_ID))
        self._stopping = True

    # --- reading ------------------------------------------------------------------------------
    def _on_readable(self, conn: Conn) -> None:
        if self.ctx.store.queued_bytes > self.ctx.config.store_high_water and conn.state == OPEN:
            self._pause(conn)  # the store is behind: leave the bytes in the kernel for now
            return
        try:
            size = conn.sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(conn, f"read error: {describe(exc)}")
            return
        if not size:
            self.close(conn, "peer closed the connection")
            return
        data = self._rview[:size].tobytes()
        conn.last_rx = self.now
        if conn.state == HANDSHAKE:
            self._handshake_data(conn, data)
        else:
            if not conn.bucket_bytes.take(len(data), self.now):
                self.close(conn, "rate limit exceeded (bytes)", (wire.RATE_LIMITED, wire.NO_ID))
                return
            try:
                _, plain, _ = conn.noise.receive_data(data)
            except ProtocolError:
                self.close(conn, "link record failed authentication")
                return
            if plain:
                self._decode(conn, plain)
        self._account(conn)

    def _account(self, conn: Conn) -> None:
        """Account what ``conn`` makes us hold (a partial record or frame, frames not yet
        decoded, frames held for a budget) against the partial-frame budgets (guard)."""
        held_frames = conn.held_frames is not None
        if (conn.partial or conn.noise.buffered or conn.decoder.buffered or held_frames) and (
            conn.state != CLOSED
        ):
            held = conn.noise.buffered + conn.decoder.buffered
            self._track_partial(conn, held + (DECODE_LIMIT if held_frames else 0))

    def _track_partial(self, conn: Conn, held: int) -> None:
        if held == conn.partial:
            return
        ok, victims = self.ctx.partial.update(conn, conn.prefix, held)
        if not conn.partial:
            conn.frame_at = self.now  # a frame started: its deadline runs from now
            self.partials.add(conn)
        conn.partial = held
        if not held:
            self.partials.discard(conn)
        for victim in victims:
            victim.worker.call_soon(
                victim.worker.close, victim, "partial frames over the relay's memory budget"
            )
        if not ok:
            self.close(conn, "its network holds too many partial frames")

    def _handshake_data(self, conn: Conn, data: bytes) -> None:
        try:
            events, plain, reply = conn.noise.receive_data(data)
        except SecureChatError as exc:
            self.close(conn, f"handshake failed: {exc}")
            return
        if reply:
            self._write(conn, reply)
        if events and conn.state == HANDSHAKE:
            self._authenticated(conn, events[0])
            if plain and conn.state == OPEN:
                self._decode(conn, plain)

    def _decode(self, conn: Conn, plain: bytes) -> None:
        """Decode up to DECODE_LIMIT bytes of frames, charge them, handle them in order."""
        decoder = conn.decoder
        try:
            frames = decoder.feed(plain, DECODE_LIMIT)
        except FrameError as exc:
            code = wire.TOO_LARGE if isinstance(exc, FrameTooLargeError) else wire.BAD_FRAME
            self.close(conn, f"bad frame: {exc}", (code, wire.NO_ID))
            return
        if frames:
            now = conn.frame_at = self.now
            if not conn.bucket_frames.take(len(frames), now):  # (the common case inline)
                self.charge_frames(conn, len(frames))
            self._run_frames(conn, frames)
            if conn.state != OPEN:
                return
        if decoder.more:
            if conn not in self.backlog:
                self.backlog.add(conn)
                self._block(conn, B_BACKLOG)
        elif conn.blocks & B_BACKLOG:
            self.backlog.discard(conn)
            self._unblock(conn, B_BACKLOG)

    def _decode_backlog(self) -> None:
        """Next turn's share for each connection with frames left undecoded."""
        for conn in list(self.backlog):
            if conn.state != OPEN or conn.held_frames is not None:
                self.backlog.discard(conn)  # a held connection continues once released
            else:
                self._guard(conn, self._decode, conn, b"")
                self._account(conn)

    def charge_frames(self, conn: Conn, cost: float) -> None:
        """Charge ``cost`` to the connection's frame budget; beyond it, stop reading
        until the debt is paid back (frames already read are still handled)."""
        bucket = conn.bucket_frames
        now = self.now
        if bucket.take(cost, now):
            return
        debt = bucket.charge(cost, now)
        conn.debt_until = now + debt
        if conn not in self.indebted:
            self.indebted.add(conn)
            self._block(conn, B_DEBT)

    def _release_debts(self, now: float) -> None:
        for conn in [c for c in self.indebted if c.debt_until <= now]:
            self.indebted.discard(conn)
            self._unblock(conn, B_DEBT)

    def _run_frames(self, conn: Conn, frames: list[wire.Frame]) -> None:
        """Handle frames in order; a handler that returns a wait holds it and the rest."""
        table = handlers.HANDLERS
        for i, frame in enumerate(frames):
            handler = table.get(type(frame))
            if handler is None:
                self.close(
                    conn,
                    f"{type(frame).__name__} is not a client frame",
                    (wire.BAD_FRAME, wire.NO_ID),
                )
                return
            wait = handler(self, conn, frame)
            if conn.state != OPEN:
                return
            if wait:
                self._hold(conn, frames[i:], wait)
                return

    def _hold(self, conn: Conn, frames: list[wire.Frame], wait: float) -> None:
        """Keep ``frames`` (in order) until ``wait`` seconds from now; read nothing meanwhile."""
        conn.held_frames = frames
        conn.hold_until = self.now + min(wait, HOLD_MAX_S)
        self.held.add(conn)
        self.backlog.discard(conn)  # its undecoded rest waits for the release too
        self._block(conn, B_HOLD)

    def _release_holds(self, now: float) -> None:
        for conn in [c for c in self.held if c.hold_until <= now]:
            self.held.discard(conn)
            frames, conn.held_frames = conn.held_frames, None
            if conn.state != OPEN or frames is None:
                continue
            self._guard(conn, self._run_frames, conn, frames)
            if conn.held_frames is None and conn.state == OPEN:
                if conn.decoder.more:  # what arrived behind the held frames
                    self.backlog.add(conn)
                    self._block(conn, B_BACKLOG)
                else:
                    conn.blocks &= ~B_BACKLOG
                self._unblock(conn, B_HOLD)
            self._account(conn)

    def _authenticated(self, conn: Conn, event: HandshakeComplete) -> None:
        identity = event.remote_static
        claim = event.payload
        if len(claim) not in (0, ED25519_KEY_SIZE):
            self.close(conn, "handshake payload must be empty or a 32-byte Ed25519 key")
            return
        self.ctx.admission.handshake_done(conn)
        conn.state = OPEN
        conn.identity = identity
        conn.mailbox = wire.mailbox_address(identity)
        # The identity fingerprint users see covers both keys; only the owner of the
        # X25519 key can send this claim, and a false one only changes its own log line.
        conn.fp = (
            fingerprint(identity + claim) if claim else X25519_ONLY_LABEL + fingerprint(identity)
        )
        log.info("authenticated %s from %s", conn.fp, conn.addr)
        store = self.ctx.store
        mailbox = conn.mailbox
        if not store.is_known(mailbox):  # its identity's first connection (since a restart)
            if store.may_hold(mailbox):  # frames wait with a short life: extend them now
                store.submit(MarkKnown(None, None, mailbox))
            else:  # recorded within a second, in one batch with others: not a write each
                store.note_known(mailbox)
        conn.fetching = True
        old = self.ctx.router.register(conn, lambda: self._first_sync(conn))
        if old is not None:
            old.worker.call_soon(
                old.worker.close, old, "replaced by a newer connection", (wire.REPLACED, wire.NO_ID)
            )
        else:
            self._presence_changed(conn, online=True)
        self.drained(conn)

    def _first_sync(self, conn: Conn) -> None:
        """Under the router's lock at registration: fetch the backlog, if there can be one.

        Most connections find their mailbox empty; asking the store would cost
        two thread hand-offs per connection (handshakes/s). See
        ``StoreThread.may_hold`` for why "no" is safe to trust here.
        """
        mailbox = conn.mailbox
        assert mailbox is not None
        if self.ctx.store.may_hold(mailbox):
            self.request_fetch(conn)
        else:
            conn.fetching = False
            self._synced(conn)

    def _synced(self, conn: Conn) -> None:
        """The backlog is sent: ``Synced``, then the prekey count (protocol 3.3)."""
        identity = conn.identity
        assert identity is not None
        conn.synced = True
        self.queue_frame(conn, wire.encode(wire.Synced()))
        count = self.ctx.store.prekey_count(identity)
        self.queue_frame(conn, wire.encode(wire.PrekeyCount(count)))

    # --- writing ------------------------------------------------------------------------------
    def queue_frame(self, conn: Conn, data: bytes) -> None:
        """Queue one encoded frame; it goes out, coalesced, at the end of this loop turn."""
        if conn.state != OPEN:
            return
        conn.pending.append(data)
        conn.pending_size += len(data)
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _flush_dirty(self) -> None:
        dirty = self._dirty
        self._dirty = []
        for conn in dirty:
            conn.dirty = False
            if conn.state == OPEN:
                self._guard(conn, self._flush, conn)

    def _flush(self, conn: Conn) -> None:
        if not conn.pending:
            return
        plain = b"".join(conn.pending) if len(conn.pending) > 1 else conn.pending[0]
        conn.pending.clear()
        conn.pending_size = 0
        self._write(conn, conn.noise.send(plain))

    def _write(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            self.held_bytes += len(data)
        else:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(conn, f"write error: {describe(exc)}")
                return
            if sent == len(data):
                return
            conn.out += memoryview(data)[sent:]
            self.held_bytes += len(data) - sent
            self._update_interest(conn)
        if len(conn.out) > OUT_HARD_LIMIT:
            self.close(conn, "peer is not reading (output buffer full)")
        elif len(conn.out) > self.ctx.config.out_high_water:
            self._block(conn, B_OUT)  # back-pressure: stop reading a peer that does not read

    def _on_writable(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(conn, f"write error: {describe(exc)}")
            return
        del conn.out[:sent]
        self.held_bytes -= sent
        if len(conn.out) <= self.ctx.config.out_low_water:
            conn.blocks &= ~B_OUT
            self.drained(conn)
        self._update_interest(conn)

    def _block(self, conn: Conn, reason: int) -> None:
        """Stop reading ``conn`` for ``reason`` (a B_* bit) until ``_unblock``."""
        if not conn.blocks & reason:
            was = conn.blocks
            conn.blocks |= reason
            if not was:
                self._update_interest(conn)

    def _unblock(self, conn: Conn, reason: int) -> None:
        if conn.blocks & reason:
            conn.blocks &= ~reason
            if not conn.blocks:
                self._update_interest(conn)

    def _update_interest(self, conn: Conn) -> None:
        if conn.state == CLOSED:
            return
        events = (0 if conn.blocks else _READ) | (_WRITE if conn.out else 0)
        if events == 0:  # not read for a while (see B_*): unwatched until unblocked
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn.sock)
            return
        try:
            self.sel.modify(conn.sock, events, conn)
        except KeyError:
            self.sel.register(conn.sock, events, conn)

    # --- timers -------------------------------------------------------------------------------
    def _timers(self) -> None:
        now = self.now
        if self._accept_resume and now >= self._accept_resume and not self._stopping:
            self._accept_resume = 0.0
            assert self.ctx.listener is not None
            self.sel.register(self.ctx.listener, _READ, _LISTENER)
        if self.paused and self.ctx.store.queued_bytes <= self.ctx.config.store_low_water:
            self._resume_all()
        if self.held:
            self._release_holds(now)
        if self.indebted:
            self._release_debts(now)
        if now >= self._next_inflight:  # ack deadlines are seconds: no need to look every turn
            self._next_inflight = now + _INFLIGHT_CHECK_S
            for conn in list(self.awaiting):
                self._expire_inflight(conn, now)
        if now < self._next_slow:
            return
        self._next_slow = now + _SLOW_TIMERS_S
        rendezvous.tick(self)  # invites past their time to live (no timer per invite)
        cfg = self.ctx.config
        idle = cfg.idle_timeout
        for conn in list(self.conns):
            if conn.state == HANDSHAKE and now > conn.deadline:
                self.close(conn, "handshake timeout")
            elif conn.state == OPEN and now - conn.last_rx > idle and not conn.blocks & _UNREAD:
                self.close(conn, "idle timeout")
        for conn in list(self.partials):  # a frame started must finish in time
            if now - conn.frame_at > cfg.frame_timeout and not conn.blocks & _UNREAD:
                self.close(conn, "frame not completed in time")  # (not while we hold it)

    def _expire_inflight(self, conn: Conn, now: float) -> None:
        expired = []
        for key, entry in conn.inflight.items():
            if entry.deadline > now:
                break
            expired.append(key)
        for key in expired:
            entry = conn.inflight.pop(key)
            size = len(entry.copy.payload)
            conn.inflight_bytes -= size
            self.inflight_bytes -= size
            conn.sent_stored.add(key)  # the device has it; the store keeps it until acked
            self.store_copy(entry.copy, force=True, subs=entry.subs)
        if not conn.inflight:
            self.awaiting.discard(conn)

    def _pause(self, conn: Conn) -> None:
        self.paused.add(conn)
        self._block(conn, B_STORE)

    def _resume_all(self) -> None:
        paused, self.paused = self.paused, set()
        for conn in paused:
            self._unblock(conn, B_STORE)

    # --- store plumbing -----------------------------------------------------------------------
    def store_request(self, request: Request[Any], conn: Conn) -> None:
        """Submit ``request``; its reply runs here after COMMIT.

        ``conn``: the connection whose frame asked for it (on this worker). Its
        outstanding requests may cost ``MAX_CONN_STORE_COST`` (payload plus
        ``STORE_REQUEST_COST`` each); beyond that it is not read until half is
        answered, so one client's flood of stored sends or acknowledgements waits in
        its own kernel buffer, not in the store's queue (which would stop everyone).
        """
        cost = request.size + STORE_REQUEST_COST
        conn.store_out += cost
        if conn.store_out >= MAX_CONN_STORE_COST:
            self._block(conn, B_CONN_STORE)
        request.reply = self._counted(conn, request.reply, cost)
        self.ctx.store.submit(request)

    def _counted(
        self, conn: Conn, fn: Callable[..., None] | None, cost: int
    ) -> Callable[..., None]:
        def done(result: Any) -> None:
            self._store_answered(conn, cost)
            if fn is not None:
                fn(result)

        return done

    def _store_answered(self, conn: Conn, cost: int) -> None:
        conn.store_out -= cost
        if conn.blocks & B_CONN_STORE and conn.store_out <= MAX_CONN_STORE_COST // 2:
            self._unblock(conn, B_CONN_STORE)

    def store_copy(
        self,
        copy: Copy,
        *,
        force: bool,
        subs: list[Submission],
        then: Callable[[InsertResult | None], None] | None = None,
        conn: Conn | None = None,
    ) -> None:
        """Persist one copy; when committed, tell its submissions (and ``then``).

        ``conn``: the sender's connection when this runs on its worker (see
        ``store_request``); the sender's address prefix is charged either way.
        """
        origin = copy.sub.conn.origin
        size = len(copy.payload)
        cost = size + STORE_REQUEST_COST
        if conn is not None:  # (store_request's accounting, inline: the stored-send path)
            conn.store_out += cost
            if conn.store_out >= MAX_CONN_STORE_COST:
                self._block(conn, B_CONN_STORE)

        def done(result: InsertResult | None) -> None:
            if conn is not None:
                self._store_answered(conn, cost)
            outcome = insert_outcome(result)
            for sub in subs:
                resolve(sub, outcome)
            if then is not None:
                then(result)

        self.ctx.store.submit(
            Insert(
                self,
                done,
                copy.mailbox,
                copy.sender,
                copy.msg_id,
                copy.ts,
                copy.payload,
                force=force,
                origin=origin,
            )
        )

    def request_fetch(self, conn: Conn) -> None:
        """Queue a fetch of the next stored rows for ``conn`` (called under the router lock
        on registration, so it is FIFO-ordered with every offline insert)."""
        mailbox = conn.mailbox
        assert mailbox is not None
        after = conn.cursor
        conn.fetching = True
        conn.store_dirty = False

        def done(rows: list[Row] | None) -> None:
            self._fetched(conn, rows)

        self.ctx.store.submit(Fetch(self, done, mailbox, after, FETCH_BATCH, FETCH_BYTES))

    def _fetched(self, conn: Conn, rows: list[Row] | None) -> None:
        conn.fetching = False
        if conn.state != OPEN:
            return
        if rows is None:
            self.close(conn, "relay store failed", (wire.STORE_FAILED, wire.NO_ID))
            return
        size = 0
        for seq, sender, msg_id, ts, payload in rows:
            conn.cursor = seq
            size += len(payload)
            key = (bytes(sender), bytes(msg_id))
            if key in conn.sent_stored or key in conn.inflight:
                continue
            conn.sent_stored.add(key)
            self.queue_frame(conn, wire.encode_deliver(key[1], key[0], ts, bytes(payload)))
        if len(rows) == FETCH_BATCH or size >= FETCH_BYTES:
            conn.store_dirty = True
        elif not conn.synced:
            self._synced(conn)
        self.drained(conn)

    def drained(self, conn: Conn) -> None:
        """Room in the output again: fetch stored rows, or go live when caught up."""
        if conn.state != OPEN or conn.backlog() > self.ctx.config.out_low_water:
            return
        if conn.store_dirty and not conn.fetching:
            self.request_fetch(conn)
        elif not (conn.live or conn.fetching or conn.store_dirty or conn.own_inserts):
            conn.live = True

    def new_rows(self, conn: Conn) -> None:
        """Posted by the store thread: rows were committed for this connection's mailbox."""
        if conn.state == OPEN:
            conn.store_dirty = True
            self.drained(conn)

    # --- presence -----------------------------------------------------------------------------
    def _presence_changed(self, conn: Conn, *, online: bool) -> None:
        identity = conn.identity
        assert identity is not None
        frame = wire.encode(wire.Presence(identity, online))
        for watcher in self.ctx.router.watchers_of(identity):
            watcher.worker.call_soon(watcher.worker.queue_frame, watcher, frame)
