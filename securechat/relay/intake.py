"""A connection's intake: what its frames may cost, and the order they reach the rules in.

No I/O: the loop hands it decrypted bytes (``feed``) and its clock; it decodes,
charges and dispatches frames to the rules' handlers, and tells the loop when
to stop and resume reading a connection (``Loop.block`` / ``unblock`` with a
``B_*`` reason of ``conn.py``). Rules (``docs/protocol.md`` section 3.8):

* **Decode limit.** At most ``DECODE_LIMIT`` bytes of one connection's frames
  are decoded per loop turn; the rest waits, undecoded, and nothing more is
  read from it until that is decoded (``B_BACKLOG``).
* **Frame budget.** Every frame costs 1 of the connection's token bucket
  (``--rate-frames``; an Ack more, see ``delivery.py``). Beyond it the
  connection is not closed: the frames already read are handled, and it is not
  read again until the budget is back above zero (``B_DEBT``).
* **Shared budgets.** A handler may answer "wait this long" (its frame type's
  budget per identity and prefix is spent, ``guard.Budgets``): that frame and
  the ones after it are held, in order, and nothing more is read (``B_HOLD``)
  until then (at most ``HOLD_MAX_S`` before the budget is asked again).
* **Store work.** Each store request a connection's frame asks for costs its
  payload plus ``STORE_REQUEST_COST`` until answered; at ``MAX_CONN_STORE_COST``
  outstanding it is not read until half is answered (``B_CONN_STORE``), so one
  flooding sender waits in its own kernel buffer, not in the store's queue.
* **Deadlines.** A handshake must finish within ``--handshake-timeout``; an open
  connection that sends nothing for ``--idle-timeout`` is closed, and so is one
  that started a frame and did not finish it within ``--frame-timeout``, except
  while the relay is the one not reading it (``UNREAD``).
* **Partial frames.** What a connection makes the relay hold (a partial Noise
  record or frame, frames undecoded or held) counts against the per-prefix and
  global budgets of ``guard.PartialBytes``: over its prefix's it is closed; over
  the global one, the connections holding theirs the longest are closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from securechat.core import wire
from securechat.errors import FrameError, FrameTooLargeError
from securechat.relay.conn import (
    B_BACKLOG,
    B_CONN_STORE,
    B_DEBT,
    B_HOLD,
    CLOSED,
    HANDSHAKE,
    OPEN,
    UNREAD,
    Conn,
    Loop,
)
from securechat.relay.guard import PartialBytes
from securechat.relay.limits import (
    DECODE_LIMIT,
    HOLD_MAX_S,
    MAX_CONN_STORE_COST,
    STORE_REQUEST_COST,
    RelayConfig,
)
from securechat.relay.mailboxes import Mailboxes, Request

Wait: TypeAlias = float | None  # what a handler returns: None, or seconds to hold the frame
Handler: TypeAlias = Callable[[Conn, Any], Wait]


class Intake:
    """Decoding, frame budgets, holds and partial-frame accounting for one loop."""

    def __init__(
        self, loop: Loop, config: RelayConfig, store: Mailboxes, partial: PartialBytes[Conn]
    ) -> None:
        self.loop = loop
        self.config = config
        self.store = store
        self.partial = partial
        self.handlers: dict[type, Handler] = {}  # frame type -> rule (delivery, services)
        self.held: set[Conn] = set()  # holding frames until their budget allows (B_HOLD)
        self.indebted: set[Conn] = set()  # over their frame budget (B_DEBT)
        self.backlog: set[Conn] = set()  # frames left undecoded by DECODE_LIMIT (B_BACKLOG)
        self.partials: set[Conn] = set()  # holding a partial record or frame

    # --- frames in -----------------------------------------------------------------------------
    def feed(self, conn: Conn, plain: bytes) -> None:
        """Decode up to DECODE_LIMIT bytes of frames, charge them, handle them in order."""
        decoder = conn.decoder
        try:
            frames = decoder.feed(plain, DECODE_LIMIT)
        except FrameError as exc:
            code = wire.TOO_LARGE if isinstance(exc, FrameTooLargeError) else wire.BAD_FRAME
            self.loop.close(conn, f"bad frame: {exc}", (code, wire.NO_ID))
            return
        if frames:
            now = conn.frame_at = self.loop.now
            if not conn.bucket_frames.take(len(frames), now):  # (the common case inline)
                self.charge_frames(conn, len(frames))
            self.run(conn, frames)
            if conn.state != OPEN:
                return
        if decoder.more:
            if conn not in self.backlog:
                self.backlog.add(conn)
                self.loop.block(conn, B_BACKLOG)
        elif conn.blocks & B_BACKLOG:
            self.backlog.discard(conn)
            self.loop.unblock(conn, B_BACKLOG)

    def run(self, conn: Conn, frames: list[wire.Frame]) -> None:
        """Handle frames in order; a handler that returns a wait holds it and the rest."""
        table = self.handlers
        for i, frame in enumerate(frames):
            handler = table.get(type(frame))
            if handler is None:
                reason = f"{type(frame).__name__} is not a client frame"
                self.loop.close(conn, reason, (wire.BAD_FRAME, wire.NO_ID))
                return
            wait = handler(conn, frame)
            if conn.state != OPEN:
                return
            if wait:
                self._hold(conn, frames[i:], wait)
                return

    def backlogged(self) -> list[Conn]:
        """The connections whose undecoded frames are due this turn."""
        due = []
        for conn in list(self.backlog):
            if conn.state != OPEN or conn.held_frames is not None:
                self.backlog.discard(conn)  # a held connection continues once released
            else:
                due.append(conn)
        return due

    # --- budgets ---------------------------------------------------------------------------------
    def charge_frames(self, conn: Conn, cost: float) -> None:
        """Charge ``cost`` to the connection's frame budget; beyond it, stop reading
        until the debt is paid back (frames already read are still handled)."""
        bucket = conn.bucket_frames
        now = self.loop.now
        if bucket.take(cost, now):
            return
        conn.debt_until = now + bucket.charge(cost, now)
        if conn not in self.indebted:
            self.indebted.add(conn)
            self.loop.block(conn, B_DEBT)

    def release_debts(self, now: float) -> None:
        for conn in [c for c in self.indebted if c.debt_until <= now]:
            self.indebted.discard(conn)
            self.loop.unblock(conn, B_DEBT)

    def _hold(self, conn: Conn, frames: list[wire.Frame], wait: float) -> None:
        """Keep ``frames`` (in order) until ``wait`` seconds from now; read nothing meanwhile."""
        conn.held_frames = frames
        conn.hold_until = self.loop.now + min(wait, HOLD_MAX_S)
        self.held.add(conn)
        self.backlog.discard(conn)  # its undecoded rest waits for the release too
        self.loop.block(conn, B_HOLD)

    def due_holds(self, now: float) -> list[Conn]:
        return [c for c in self.held if c.hold_until <= now]

    def resume(self, conn: Conn) -> None:
        """A hold is over: handle the held frames (the budget may hold them again)."""
        self.held.discard(conn)
        frames, conn.held_frames = conn.held_frames, None
        if conn.state != OPEN or frames is None:
            return
        self.run(conn, frames)
        if conn.held_frames is None and conn.state == OPEN:
            if conn.decoder.more:  # what arrived behind the held frames
                self.backlog.add(conn)
                self.loop.block(conn, B_BACKLOG)
            else:
                conn.blocks &= ~B_BACKLOG
            self.loop.unblock(conn, B_HOLD)

    # --- store work ------------------------------------------------------------------------------
    def store_request(self, request: Request[Any], conn: Conn) -> None:
        """Submit ``request`` for ``conn``'s frame; its reply runs on this loop after COMMIT.

        Until answered it costs ``conn`` its payload plus ``STORE_REQUEST_COST``;
        at ``MAX_CONN_STORE_COST`` outstanding ``conn`` is not read until half is
        answered.
        """
        cost = request.size + STORE_REQUEST_COST
        conn.store_out += cost
        if conn.store_out >= MAX_CONN_STORE_COST:
            self.loop.block(conn, B_CONN_STORE)
        reply = request.reply

        def answered(result: Any) -> None:
            self.store_answered(conn, cost)
            if reply is not None:
                reply(result)

        request.reply = answered
        self.store.submit(request)

    def store_answered(self, conn: Conn, cost: int) -> None:
        conn.store_out -= cost
        if conn.blocks & B_CONN_STORE and conn.store_out <= MAX_CONN_STORE_COST // 2:
            self.loop.unblock(conn, B_CONN_STORE)

    # --- deadlines --------------------------------------------------------------------------------
    def overdue(self, now: float, conns: Iterable[Conn]) -> list[tuple[Conn, str]]:
        """The connections past a deadline, and why (checked once a second)."""
        cfg = self.config
        late = []
        for conn in conns:
            if conn.state == HANDSHAKE and now > conn.deadline:
                late.append((conn, "handshake timeout"))
            elif conn.blocks & UNREAD:
                continue  # we are the ones not reading it: neither idle nor slow
            elif conn.state == OPEN and now - conn.last_rx > cfg.idle_timeout:
                late.append((conn, "idle timeout"))
            elif conn in self.partials and now - conn.frame_at > cfg.frame_timeout:
                late.append((conn, "frame not completed in time"))
        return late

    # --- memory held for partial frames -----------------------------------------------------------
    def account(self, conn: Conn) -> None:
        """Account what ``conn`` makes us hold (a partial record or frame, frames not yet
        decoded, frames held for a budget) against the partial-frame budgets."""
        held_frames = conn.held_frames is not None
        if (conn.partial or conn.noise.buffered or conn.decoder.buffered or held_frames) and (
            conn.state != CLOSED
        ):
            held = conn.noise.buffered + conn.decoder.buffered
            self._track_partial(conn, held + (DECODE_LIMIT if held_frames else 0))

    def _track_partial(self, conn: Conn, held: int) -> None:
        if held == conn.partial:
            return
        ok, victims = self.partial.update(conn, conn.prefix, held)
        if not conn.partial:
            conn.frame_at = self.loop.now  # a frame started: its deadline runs from now
            self.partials.add(conn)
        conn.partial = held
        if not held:
            self.partials.discard(conn)
        for victim in victims:
            reason = "partial frames over the relay's memory budget"
            victim.loop.call_soon(victim.loop.close, victim, reason)
        if not ok:
            self.loop.close(conn, "its network holds too many partial frames")

    def forget(self, conn: Conn) -> None:
        """``conn`` closed: nothing of it is held, owed or accounted any more."""
        self.held.discard(conn)
        self.indebted.discard(conn)
        self.backlog.discard(conn)
        conn.held_frames = None
        if conn.partial:
            self.partials.discard(conn)
            self.partial.forget(conn)
            conn.partial = 0
