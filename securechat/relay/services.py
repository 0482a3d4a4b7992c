"""The relay's services besides delivery: prekeys, presence, keep-alive, invites (no I/O).

Rules (``docs/protocol.md`` sections 3.4, 3.5, 3.8 and 7.1):

* **PublishPrekeys** (budget: 1 per publish) stores the bundle of the
  connection's own identity and answers ``PrekeyCount`` only when something
  changed; one-time prekeys without any signed prekey close the connection
  (``BAD_FRAME``) and store nothing.
* **FetchPrekeys** (budget: 1) returns the target's bundle; its one-time prekey
  only while the target's hand-out budget allows (never "no bundle" for an
  identity with a signed prekey). A hand-out that takes the owner's count below
  a mark of ``PREKEY_LOW_MARKS`` pushes ``PrekeyCount`` to the owner, if online.
* **PresenceSubscribe** (budget: ``1 + n // 16``) replaces the watch list and
  answers one ``Presence`` per key; watchers hear when the identity connects or
  leaves (a replacement is neither).
* **Ping** gets ``Pong`` with its nonce; **Pong** only keeps the connection alive.
* **Invites**: ``InviteOpen``, ``InviteJoin`` (budget: 1, a guess at someone's
  nameplate) and ``InviteData`` go to the rendezvous (``rendezvous.py``), whose
  answers are queued on the connections they name.

A frame whose budget (``guard.Budgets``, per identity and per prefix) is spent is
not refused: its handler returns the seconds to wait, and the connection's intake
holds it, and the frames after it, until then (``intake.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from securechat.core import wire
from securechat.relay import guard
from securechat.relay.conn import Conn
from securechat.relay.intake import Intake, Wait
from securechat.relay.limits import PREKEY_LOW_MARKS, SUBSCRIBE_KEYS_PER_COST
from securechat.relay.mailboxes import Bundle, Publish, Published, TakePrekeys
from securechat.relay.rendezvous import Action, Rendezvous
from securechat.relay.router import Router

log = logging.getLogger("securechat.relay")

_STORE_FAILED = "relay store failed"


def crossed_low_mark(left: int) -> bool:
    """Did taking one prekey (``left + 1`` -> ``left``) go below a low-water mark?"""
    return any(left < mark <= left + 1 for mark in PREKEY_LOW_MARKS)


class Services:
    """Prekeys, presence, keep-alive and invites for the connections of one loop."""

    def __init__(
        self, intake: Intake, router: Router, budgets: guard.Budgets, rendezvous: Rendezvous[Conn]
    ) -> None:
        self.loop = intake.loop  # the loop and store are the intake's
        self.intake = intake
        self.router = router
        self.store = intake.store
        self.budgets = budgets
        self.rendezvous = rendezvous

    def handlers(self) -> dict[type, Callable[[Conn, Any], Wait]]:
        return {
            wire.PublishPrekeys: self.on_publish,
            wire.FetchPrekeys: self.on_fetch_prekeys,
            wire.Ping: self.on_ping,
            wire.Pong: self.on_pong,
            wire.PresenceSubscribe: self.on_subscribe,
            wire.InviteOpen: self.on_invite_open,
            wire.InviteJoin: self.on_invite_join,
            wire.InviteData: self.on_invite_data,
        }

    def _charge(self, kind: guard.Budget, conn: Conn, cost: float) -> float:
        assert conn.identity is not None
        return self.budgets.charge(kind, conn.identity, conn.prefix, cost, self.loop.now)

    # --- prekeys -------------------------------------------------------------------------------
    def on_publish(self, conn: Conn, f: wire.PublishPrekeys) -> Wait:
        assert conn.identity is not None
        wait = self._charge(guard.Budget.PUBLISH, conn, 1.0)
        if wait:
            return wait
        loop = self.loop

        def done(result: Published | None) -> None:
            if result is None:
                frame = wire.Error(wire.STORE_FAILED, wire.NO_ID, _STORE_FAILED)
                loop.queue_frame(conn, wire.encode(frame))
            elif result.refused:
                reason = "one-time prekeys without a signed prekey (publish one first)"
                loop.close(conn, reason, (wire.BAD_FRAME, wire.NO_ID))
            elif result.changed:  # an unchanged bundle gets no answer: that ends a publish loop
                loop.queue_frame(conn, wire.encode(wire.PrekeyCount(result.held)))

        request = Publish(loop, done, conn.identity, f.signed_prekey, f.one_time_prekeys)
        self.intake.store_request(request, conn)
        return None

    def on_fetch_prekeys(self, conn: Conn, f: wire.FetchPrekeys) -> Wait:
        wait = self._charge(guard.Budget.FETCH, conn, 1.0)
        if wait:
            return wait
        target = f.identity_key
        # Beyond the target's hand-out budget the bundle goes without a one-time prekey
        # (never "no bundle": a client reads that as "this peer has published none").
        one_time = self.store.prekey_count(target) > 0 and self.budgets.take_one_time_prekey(
            target, self.loop.now
        )
        loop = self.loop

        def done(result: Bundle | None) -> None:
            if result is None:
                frame = wire.Error(wire.STORE_FAILED, wire.NO_ID, _STORE_FAILED)
                loop.queue_frame(conn, wire.encode(frame))
                return
            spk, otk, left = result
            loop.queue_frame(conn, wire.encode(wire.Prekeys(target, spk, otk)))
            if otk is not None and crossed_low_mark(left):
                self._tell_owner(target, left)

        self.intake.store_request(TakePrekeys(loop, done, target, one_time=one_time), conn)
        return None

    def _tell_owner(self, owner: bytes, left: int) -> None:
        """Push ``PrekeyCount`` to the owner of the prekeys, if it is connected."""
        target = self.router.online.get(wire.mailbox_address(owner))
        if target is not None:
            frame = wire.encode(wire.PrekeyCount(left))
            target.loop.call_soon(target.loop.queue_frame, target, frame)

    # --- presence and keep-alive ---------------------------------------------------------------
    def on_subscribe(self, conn: Conn, f: wire.PresenceSubscribe) -> Wait:
        cost = 1.0 + len(f.identity_keys) // SUBSCRIBE_KEYS_PER_COST
        wait = self._charge(guard.Budget.SUBSCRIBE, conn, cost)
        if wait:
            return wait
        new = frozenset(f.identity_keys)
        router = self.router
        router.watch(conn, conn.watching, new)
        conn.watching = new
        for key in f.identity_keys:
            online = wire.mailbox_address(key) in router.online
            self.loop.queue_frame(conn, wire.encode(wire.Presence(key, online)))
        return None

    def presence_changed(self, conn: Conn, *, online: bool) -> None:
        """``conn``'s identity came online or left: tell whoever watches it."""
        assert conn.identity is not None
        frame = wire.encode(wire.Presence(conn.identity, online))
        for watcher in self.router.watchers_of(conn.identity):
            watcher.loop.call_soon(watcher.loop.queue_frame, watcher, frame)

    def on_ping(self, conn: Conn, f: wire.Ping) -> Wait:
        self.loop.queue_frame(conn, wire.encode(wire.Pong(f.nonce)))
        return None

    def on_pong(self, conn: Conn, f: wire.Pong) -> Wait:
        """A Pong keeps the connection alive like any frame; nothing else to do."""
        return None

    # --- invites (the rendezvous, protocol section 7) ------------------------------------------
    def on_invite_open(self, conn: Conn, f: wire.InviteOpen) -> Wait:
        assert conn.identity is not None
        actions = self.rendezvous.open(conn, conn.identity, conn.prefix, self.loop.now)
        log.debug("invite open by %s: %s", conn.fp, actions[0][1])
        self._send(actions)
        return None

    def on_invite_join(self, conn: Conn, f: wire.InviteJoin) -> Wait:
        wait = self._charge(guard.Budget.JOIN, conn, 1.0)
        if wait:
            return wait  # over budget: held (and nothing more read from it) until it allows
        self._send(self.rendezvous.join(conn, f.nameplate))
        return None

    def on_invite_data(self, conn: Conn, f: wire.InviteData) -> Wait:
        self._send(self.rendezvous.data(conn, f.nameplate, f.payload))
        return None

    def tick(self, now: float) -> None:
        """From the loop's once-a-second timers: expire old invites (no timer per invite)."""
        self._send(self.rendezvous.expire(now))

    def closed(self, conn: Conn) -> None:
        """``conn`` closed: its watches end, and its invites (the other parties are told)."""
        if conn.watching:
            self.router.watch(conn, conn.watching, frozenset())
        self._send(self.rendezvous.dropped(conn))  # a dictionary look-up when it had none

    def _send(self, actions: list[Action[Conn]]) -> None:
        for target, frame in actions:
            data = wire.encode(frame)
            loop = target.loop
            if loop is self.loop:
                loop.queue_frame(target, data)
            else:
                loop.call_soon(loop.queue_frame, target, data)
