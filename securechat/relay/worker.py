"""I/O workers: each a ``selectors`` loop over its share of connections.

Only the loop lives here: read, feed, write. Per turn a worker reads every
readable socket once (one large ``recv_into``), feeds the bytes to the
connection's Noise state and then to its rules (``rules.py``: the intake
decodes and charges, and hands each complete frame to delivery's rule or the
other services'); it runs the callbacks other threads posted, the timers, and
finally encrypts *all* output the rules queued for a connection during the
turn with one ``NoiseConnection.send`` and writes it with one ``send`` (write
coalescing). What a connection is and its states: ``conn.py``.

Reading a connection stops while any ``B_*`` reason of ``conn.py`` holds (its
bytes wait in the kernel): this loop sets ``B_OUT`` (output above the
high-water mark) and ``B_STORE`` (the store's queue is too long); the intake
sets the others. Exceptions while handling one connection close that connection,
never the worker; ``OSError`` on a socket closes that connection with
``oserrors.describe`` as the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from securechat.core import wire
from securechat.core.noise import HandshakeComplete, NoiseConnection
from securechat.errors import ProtocolError, SecureChatError
from securechat.relay.calls import Calls
from securechat.relay.conn import B_OUT, B_STORE, CLOSED, HANDSHAKE, OPEN, Conn
from securechat.relay.context import RelayContext
from securechat.relay.guard import prefix_of
from securechat.relay.limits import OUT_HARD_LIMIT, RECV_SIZE, TICK_S
from securechat.relay.oserrors import describe
from securechat.relay.rules import Rules

log = logging.getLogger("securechat.relay")

_READ: Final = selectors.EVENT_READ
_WRITE: Final = selectors.EVENT_WRITE
_ACCEPT_BATCH: Final = 64  # connections accepted per listener event (then serve the others)
_ACCEPT_BACKOFF_S: Final = 0.05  # after accept failed (e.g. out of descriptors): do not spin
_LISTENER: Final = object()  # selector data of the listening socket


class Worker:
    """A selector loop owning a set of connections (the ``conn.Loop`` of their rules)."""

    def __init__(self, index: int, ctx: RelayContext) -> None:
        self.index = index
        self.ctx = ctx
        self.sel = selectors.DefaultSelector()
        self._calls = Calls()  # what other threads post here
        self.sel.register(self._calls.wake, _READ, None)
        self._accept_resume = 0.0  # when a paused listener is watched again (0: not paused)
        self._dirty: list[Conn] = []
        self.conns: set[Conn] = set()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"relay-io-{index}", daemon=True)
        self.now = time.monotonic()
        self.now_ms = int(time.time() * 1000)  # wall clock per loop turn: frame timestamps
        self.turns = 0  # loop turns so far
        # Ciphertext the kernel did not take yet, over all connections: above
        # ``worker_high_water`` new copies go to the store instead, so a burst to many
        # slow readers cannot grow memory (unacked bytes: see Delivery.stalled).
        self.held_bytes = 0
        self.paused: set[Conn] = set()  # not read while the store's queue is too long
        # One receive buffer per worker: ``recv(256 KiB)`` would allocate (mmap) and
        # free 256 KiB per call, about 13 us here; ``recv_into`` + copy of what came: 2 us.
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        # The rules of its connections (no I/O), fed by this loop.
        rules = self.rules = Rules(self, ctx)
        self.intake, self.delivery = rules.intake, rules.delivery

    # --- cross-thread interface --------------------------------------------------------------
    def start(self) -> None:
        if self.ctx.listener is not None:
            self.sel.register(self.ctx.listener, _READ, _LISTENER)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def on_own_thread(self) -> bool:
        return threading.get_ident() == self._calls.owner

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on this worker's thread (soon, in posting order)."""
        self._calls.post(fn, args)

    # --- the loop -----------------------------------------------------------------------------
    def _run(self) -> None:
        calls = self._calls
        calls.owner = threading.get_ident()
        intake = self.intake
        guard, guard_call = self._guard, self._guard_call  # bound once, not an object per turn
        while True:
            timeout = 0.0 if (calls or intake.backlog) else TICK_S
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
                    calls.woken()
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
            if intake.backlog:
                self.rules.backlog(guard)
            calls.run(guard_call)
            self._timers(guard)
            self._flush_dirty()
            if self._stopping:
                break
        self.sel.close()

    def _guard(self, conn: Conn | None, fn: Callable[..., object], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._internal_error(conn)

    def _internal_error(self, conn: Conn | None) -> None:
        log.exception("internal error handling %s", conn.name() if conn else "a callback")
        if conn is not None and conn.state != CLOSED:
            self.close(conn, "internal error")

    def _guard_call(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
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
            ip, prefix, now, lambda: self._new_conn(sock, addr, prefix)
        )
        for victim in victims:  # the oldest unfinished handshakes make room
            victim.loop.call_soon(
                victim.loop.close, victim, "evicted: too many unfinished handshakes"
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

    def _new_conn(self, sock: socket.socket, addr: tuple[str, int], prefix: str) -> Conn:
        noise = NoiseConnection(
            initiator=False, static_private=self.ctx.static_private, rng=os.urandom
        )
        return Conn(self, sock, addr, prefix, self.now, self.ctx.config, noise)

    def close(self, conn: Conn, reason: str, error: tuple[int, bytes] | None = None) -> None:
        """Close one connection: send ``Error`` first if possible, keep every copy safe."""
        was_open = conn.state == OPEN
        if conn.state == CLOSED:
            return
        if error is not None and was_open:
            code, msg_id = error
            self.queue_frame(conn, wire.encode(wire.Error(code, msg_id, reason[:200])))
            if not self._flush(conn):  # that write failed and closed it (released once only)
                return
        conn.enter(CLOSED)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.conns.discard(conn)
        self.paused.discard(conn)
        self.intake.forget(conn)
        self.ctx.admission.release(conn, conn.ip, conn.prefix)
        self.held_bytes -= conn.drop_output()
        if was_open:
            log.info("disconnected %s: %s", conn.fp, reason)
            self.delivery.closed(conn)
        else:  # unauthenticated: routine under attack, so not at INFO
            log.debug("closed %s: %s", conn.addr, reason)

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
            self.paused.add(conn)  # the store is behind: leave the bytes in the kernel for now
            self.block(conn, B_STORE)
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
                self.intake.feed(conn, plain)
        self.intake.account(conn)

    def _handshake_data(self, conn: Conn, data: bytes) -> None:
        try:
            events, plain, reply = conn.noise.receive_data(data)
        except SecureChatError as exc:
            self.close(conn, f"handshake failed: {exc}")
            return
        if reply:
            self._write(conn, reply)
        if events and conn.state == HANDSHAKE and self._authenticated(conn, events[0]) and plain:
            self.intake.feed(conn, plain)

    def _authenticated(self, conn: Conn, event: HandshakeComplete) -> bool:
        """The handshake is complete: open the connection (True), or close it (False)."""
        if not conn.authenticate(event.remote_static, event.payload):
            self.close(conn, "handshake payload must be empty or a 32-byte Ed25519 key")
            return False
        self.ctx.admission.handshake_done(conn)
        log.info("authenticated %s from %s", conn.fp, conn.addr)
        self.delivery.opened(conn)
        return conn.state == OPEN

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

    def _flush(self, conn: Conn) -> bool:
        """Encrypt and write what was queued this turn; False if that closed ``conn``."""
        if not conn.pending:
            return True
        plain = b"".join(conn.pending) if len(conn.pending) > 1 else conn.pending[0]
        conn.pending.clear()
        conn.pending_size = 0
        return self._write(conn, conn.noise.send(plain))

    def _write(self, conn: Conn, data: bytes) -> bool:
        """Send ``data`` or keep what the kernel refused; False if that closed ``conn``."""
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
                return False
            if sent == len(data):
                return True
            conn.out += memoryview(data)[sent:]
            self.held_bytes += len(data) - sent
            self._update_interest(conn)
        if len(conn.out) > OUT_HARD_LIMIT:
            self.close(conn, "peer is not reading (output buffer full)")
            return False
        if len(conn.out) > self.ctx.config.out_high_water:
            self.block(conn, B_OUT)  # back-pressure: stop reading a peer that does not read
        return True

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
            self.delivery.drained(conn)
        self._update_interest(conn)

    def block(self, conn: Conn, reason: int) -> None:
        """Stop reading ``conn`` for ``reason`` (a ``B_*`` bit) until ``unblock``."""
        if not conn.blocks & reason:
            was = conn.blocks
            conn.blocks |= reason
            if not was:
                self._update_interest(conn)

    def unblock(self, conn: Conn, reason: int) -> None:
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
    def _timers(self, guard: Callable[..., None]) -> None:
        now = self.now
        if self._accept_resume and now >= self._accept_resume and not self._stopping:
            self._accept_resume = 0.0
            assert self.ctx.listener is not None
            self.sel.register(self.ctx.listener, _READ, _LISTENER)
        if self.paused and self.ctx.store.queued_bytes <= self.ctx.config.store_low_water:
            paused, self.paused = self.paused, set()
            for conn in paused:
                self.unblock(conn, B_STORE)
        self.rules.timers(now, self.conns, guard)
