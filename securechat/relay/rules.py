"""The rules of one loop's connections, put together: what the loop feeds, and their timers.

A loop (``worker.Worker``, or a test's in-memory loop) owns one :class:`Rules`:
the intake (``intake.py``) decodes and charges what a connection sends and hands
each frame to its rule, delivery's (``delivery.py``) or the other services'
(``services.py``); ``timers`` is what they need of the clock. No I/O here
either: actions go out through the loop (``conn.Loop``) and the store
(``mailboxes.Mailboxes``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final, Protocol

from securechat.relay.conn import Conn, Loop
from securechat.relay.delivery import Delivery
from securechat.relay.guard import Budgets, PartialBytes
from securechat.relay.intake import Intake
from securechat.relay.limits import RelayConfig
from securechat.relay.mailboxes import Mailboxes
from securechat.relay.rendezvous import Rendezvous
from securechat.relay.router import Router
from securechat.relay.services import Services

INFLIGHT_CHECK_S: Final = 0.05  # resolution of the ack timeout (seconds)
SLOW_TIMERS_S: Final = 1.0  # deadlines and invite expiry: once a second is plenty

Guard = Callable[..., None]  # guard(conn, fn, *args): run fn, close conn if it raises


class Shared(Protocol):
    """What the loops of one relay share (``context.RelayContext``; in tests an
    in-memory relay). Read-only here, so a test may hand subclasses."""

    @property
    def config(self) -> RelayConfig: ...

    @property
    def router(self) -> Router: ...

    @property
    def store(self) -> Mailboxes: ...

    @property
    def budgets(self) -> Budgets: ...

    @property
    def rendezvous(self) -> Rendezvous[Conn]: ...

    @property
    def partial(self) -> PartialBytes[Conn]: ...


class Rules:
    """Intake, delivery and services for the connections of ``loop``."""

    def __init__(self, loop: Loop, shared: Shared) -> None:
        self.loop = loop
        self.intake = Intake(loop, shared.config, shared.store, shared.partial)
        self.services = Services(self.intake, shared.router, shared.budgets, shared.rendezvous)
        self.delivery = Delivery(self.intake, shared.router, self.services)
        self.intake.handlers = {**self.delivery.handlers(), **self.services.handlers()}
        self._next_inflight = 0.0
        self._next_slow = 0.0

    def timers(self, now: float, conns: Iterable[Conn], guard: Guard) -> None:
        """Holds and debts that ran out, ack deadlines, then (once a second) invite
        expiry and the connections' deadlines. ``guard`` runs a held connection's
        frames so that an exception closes that connection only."""
        intake = self.intake
        for conn in intake.due_holds(now) if intake.held else ():
            guard(conn, intake.resume, conn)
            intake.account(conn)
        if intake.indebted:
            intake.release_debts(now)
        if now >= self._next_inflight:  # ack deadlines are seconds: no need to look every turn
            self._next_inflight = now + INFLIGHT_CHECK_S
            self.delivery.expire(now)
        if now < self._next_slow:
            return
        self._next_slow = now + SLOW_TIMERS_S
        self.services.tick(now)  # invites past their time to live (no timer per invite)
        for conn, reason in intake.overdue(now, list(conns)):
            self.loop.close(conn, reason)

    def backlog(self, guard: Guard) -> None:
        """Decode the next share of what connections sent beyond the decode limit."""
        intake = self.intake
        for conn in intake.backlogged():
            guard(conn, intake.feed, conn, b"")
            intake.account(conn)
