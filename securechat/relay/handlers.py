"""What the relay does with each client frame (runs on the connection's worker).

Delivery rules, in the order they are applied to one copy (mailbox, sender, id):

1. acknowledged recently by the recipient -> ``Accepted(2)`` again, not delivered twice;
2. recipient offline -> stored; ``Accepted(1)`` after COMMIT (or QUOTA_EXCEEDED /
   STORE_FAILED, never a silent drop);
3. recipient online, live, with room -> ``Deliver`` now; the sender's
   ``Accepted(2)`` waits for the recipient's ``Ack``; no Ack within the ack
   timeout, or the recipient leaves -> stored, then ``Accepted(1)``;
4. recipient online but catching up from the store or stalled -> stored and
   fetched in order later (``Accepted(1)`` after COMMIT).

A SendMulti is one submission with one copy per recipient: ``Accepted`` (the
lowest status of its copies) once every copy is safe; ``Error`` as soon as one
copy is refused (the sender retries the whole frame; retries are idempotent).
The relay sends no ``Delivered`` receipts (deprecated): what reached the peer's
device is for the peers' end-to-end receipts to say, which a relay cannot forge.

An ``Ack`` entry counts only for a copy this connection was actually given (live,
awaiting its Ack, or sent from the store on this connection); any other entry is
ignored without touching the store, so acknowledgements cannot be used to make
the relay work for nothing.

Handlers return None, or the seconds to wait when a frame's shared budget
(``guard.Budgets``: FetchPrekeys, PresenceSubscribe, PublishPrekeys) is spent:
the worker then holds that frame and the ones after it and reads nothing more
from the connection until the budget allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from securechat.core import wire
from securechat.relay import guard, rendezvous
from securechat.relay.limits import (
    ACK_ENTRIES_PER_COST,
    MAX_INFLIGHT,
    PREKEY_LOW_MARKS,
    SUBSCRIBE_KEYS_PER_COST,
)
from securechat.relay.mailboxes import Bundle, Delete, Publish, Published, TakePrekeys
from securechat.relay.router import OPEN, Copy, Inflight, Submission, recent_key, resolve

if TYPE_CHECKING:
    from securechat.relay.worker import Conn, Worker

MAX_INFLIGHT_BYTES: Final = 4 * 1024 * 1024  # unacked live payload bytes per recipient
STALL_INFLIGHT_BYTES: Final = 128 * 1024  # with this much unacked ...
STALL_AFTER_S: Final = 0.25  # ... the oldest unacked for this long ...
STALL_TURNS: Final = 3  # ... and this many loop turns, nothing read since: stalled


Wait = float | None  # what a handler returns: None, or seconds to hold the frame


def on_send(w: Worker, conn: Conn, f: wire.Send) -> Wait:
    route_copy(w, conn, Submission(conn, f.msg_id, 1), f.mailbox, f.payload, w.now_ms)
    return None


def on_send_multi(w: Worker, conn: Conn, f: wire.SendMulti) -> Wait:
    sub = Submission(conn, f.msg_id, len(f.recipients))
    ts = w.now_ms
    for mailbox, payload in f.recipients:
        route_copy(w, conn, sub, mailbox, payload, ts)
    return None


def route_copy(
    w: Worker, conn: Conn, sub: Submission, mailbox: bytes, payload: bytes, ts: int
) -> None:
    sender = conn.identity
    assert sender is not None
    router = w.ctx.router
    if router.was_acked(recent_key(mailbox, sender, sub.msg_id)):
        resolve(sub, wire.STATUS_DELIVERED)
        return
    copy = Copy(sub, mailbox, sender, sub.msg_id, ts, payload)
    # Lock-free look-up first (the common, online case); only "offline, so store"
    # needs the router's lock, and only then do we build the closure for it.
    target = router.online.get(mailbox)
    if target is None:
        target = router.route(
            mailbox, lambda: w.store_copy(copy, force=False, subs=[sub], conn=conn)
        )
        if target is None:
            return
    tw = target.worker
    if tw is w:  # same thread: no hand-off (and no wake-up) needed
        incoming(w, target, copy)
    else:
        tw.call_soon(incoming, tw, target, copy)


def incoming(w: Worker, conn: Conn, copy: Copy) -> None:
    """A copy for ``conn``'s mailbox arrived on ``conn``'s worker: deliver or store."""
    if conn.state != OPEN:  # closed meanwhile: the store keeps it
        w.store_copy(copy, force=False, subs=[copy.sub])
        return
    key = (copy.sender, copy.msg_id)
    entry = conn.inflight.get(key)
    if entry is not None:  # a retry while the first delivery awaits its Ack
        entry.subs.append(copy.sub)
        return
    if key in conn.sent_stored:  # already stored and sent: the insert is a no-op
        w.store_copy(copy, force=False, subs=[copy.sub])
        return
    cfg = w.ctx.config
    if (
        conn.live
        and len(conn.out) < cfg.out_high_water  # what the kernel refused: a slow reader
        and len(conn.inflight) < MAX_INFLIGHT
        and conn.inflight_bytes < MAX_INFLIGHT_BYTES
        and w.held_bytes < cfg.worker_high_water
        and not _stalled(w, conn)
    ):
        conn.inflight[key] = Inflight(copy, w.now, w.turns, cfg.ack_timeout)
        size = len(copy.payload)
        conn.inflight_bytes += size
        w.inflight_bytes += size
        w.awaiting.add(conn)
        w.queue_frame(conn, wire.encode_deliver(copy.msg_id, copy.sender, copy.ts, copy.payload))
        return
    conn.live = False  # from now on, in order through the store until caught up
    conn.own_inserts += 1

    def stored(result: object) -> None:
        conn.own_inserts -= 1
        w.new_rows(conn)

    w.store_copy(copy, force=False, subs=[copy.sub], then=stored)


def _stalled(w: Worker, conn: Conn) -> bool:
    """Many unacked bytes, and nothing read from the reader since the oldest was sent,
    for several loop turns and a while (or at once when the worker holds too much).

    Its copies then go to the store, so a burst to many readers that stopped
    reading keeps memory bounded; a busy reader that is acking is read every
    turn, however long the relay's turns get under load, and stays live.
    "A while" (0.25 s) spares a reader that is merely slow for a moment; but
    when the worker's unacknowledged live payload is over its high-water mark
    the wait is skipped: in that quarter second a burst to a hundred silent
    readers held 50-70 MiB.
    """
    if conn.inflight_bytes < STALL_INFLIGHT_BYTES:
        return False
    oldest = next(iter(conn.inflight.values()))
    if conn.last_rx >= oldest.sent or w.turns - oldest.turn <= STALL_TURNS:
        return False
    return (
        w.now - oldest.sent > STALL_AFTER_S
        or w.inflight_bytes > w.ctx.config.worker_inflight_high_water
    )


def on_ack(w: Worker, conn: Conn, f: wire.Ack) -> Wait:
    mailbox = conn.mailbox
    assert mailbox is not None
    entries = f.entries
    extra = len(entries) // ACK_ENTRIES_PER_COST  # each entry is decoded and looked up
    if extra:
        w.charge_frames(conn, extra)
    inflight = conn.inflight
    sent_stored = conn.sent_stored
    acked: list[bytes] = []
    to_delete: list[tuple[bytes, bytes]] = []
    for key in entries:  # (sender, msg_id): the same tuple as the inflight key
        entry = inflight.pop(key, None)
        if entry is None:
            if key in sent_stored:  # sent from the store on this connection
                sent_stored.discard(key)
                to_delete.append(key)
                acked.append(mailbox + key[0] + key[1])
            continue  # anything else: not ours to acknowledge, ignored
        acked.append(mailbox + key[0] + key[1])
        size = len(entry.copy.payload)
        conn.inflight_bytes -= size
        w.inflight_bytes -= size
        for sub in entry.subs:
            resolve(sub, wire.STATUS_DELIVERED)
    if acked:
        w.ctx.router.remember_acked_many(acked)
    if not inflight:
        w.awaiting.discard(conn)
    if to_delete:
        w.store_request(Delete(w, None, mailbox, to_delete), conn)
    return None


def on_publish(w: Worker, conn: Conn, f: wire.PublishPrekeys) -> Wait:
    identity = conn.identity
    assert identity is not None
    wait = w.ctx.budgets.charge(guard.PUBLISH, identity, conn.prefix, 1.0, w.now)
    if wait:
        return wait

    def done(result: Published | None) -> None:
        if result is None:
            frame = wire.Error(wire.STORE_FAILED, wire.NO_ID, "relay store failed")
            w.queue_frame(conn, wire.encode(frame))
            return
        if result.refused:
            reason = "one-time prekeys without a signed prekey (publish one first)"
            w.close(conn, reason, (wire.BAD_FRAME, wire.NO_ID))
        elif result.changed:  # an unchanged bundle gets no answer: that ends a publish loop
            w.queue_frame(conn, wire.encode(wire.PrekeyCount(result.held)))

    w.store_request(Publish(w, done, identity, f.signed_prekey, f.one_time_prekeys), conn)
    return None


def on_fetch_prekeys(w: Worker, conn: Conn, f: wire.FetchPrekeys) -> Wait:
    identity = conn.identity
    assert identity is not None
    budgets = w.ctx.budgets
    wait = budgets.charge(guard.FETCH, identity, conn.prefix, 1.0, w.now)
    if wait:
        return wait
    target = f.identity_key
    # Beyond the target's hand-out budget the bundle goes without a one-time prekey
    # (never "no bundle": a client reads that as "this peer has published none").
    one_time = w.ctx.store.prekey_count(target) > 0 and budgets.take_one_time_prekey(target, w.now)

    def done(result: Bundle | None) -> None:
        if result is None:
            frame = wire.Error(wire.STORE_FAILED, wire.NO_ID, "relay store failed")
            w.queue_frame(conn, wire.encode(frame))
            return
        spk, otk, left = result
        w.queue_frame(conn, wire.encode(wire.Prekeys(target, spk, otk)))
        if otk is not None and _crossed_low_mark(left):
            _tell_owner(w, target, left)

    w.store_request(TakePrekeys(w, done, target, one_time=one_time), conn)
    return None


def _crossed_low_mark(left: int) -> bool:
    """Did taking one prekey (``left + 1`` -> ``left``) go below a low-water mark?"""
    return any(left < mark <= left + 1 for mark in PREKEY_LOW_MARKS)


def _tell_owner(w: Worker, owner: bytes, left: int) -> None:
    """Push ``PrekeyCount`` to the owner of the prekeys, if it is connected."""
    target = w.ctx.router.online.get(wire.mailbox_address(owner))
    if target is not None:
        frame = wire.encode(wire.PrekeyCount(left))
        target.worker.call_soon(target.worker.queue_frame, target, frame)


def on_ping(w: Worker, conn: Conn, f: wire.Ping) -> Wait:
    w.queue_frame(conn, wire.encode(wire.Pong(f.nonce)))
    return None


def on_pong(w: Worker, conn: Conn, f: wire.Pong) -> Wait:
    """A Pong keeps the connection alive like any frame; nothing else to do."""
    return None


def on_subscribe(w: Worker, conn: Conn, f: wire.PresenceSubscribe) -> Wait:
    identity = conn.identity
    assert identity is not None
    cost = 1.0 + len(f.identity_keys) // SUBSCRIBE_KEYS_PER_COST
    wait = w.ctx.budgets.charge(guard.SUBSCRIBE, identity, conn.prefix, cost, w.now)
    if wait:
        return wait
    new = frozenset(f.identity_keys)
    router = w.ctx.router
    router.watch(conn, conn.watching, new)
    conn.watching = new
    for key in f.identity_keys:
        online = wire.mailbox_address(key) in router.online
        w.queue_frame(conn, wire.encode(wire.Presence(key, online)))
    return None


HANDLERS: Final[dict[type, Callable[[Any, Any, Any], Wait]]] = {
    wire.Send: on_send,
    wire.SendMulti: on_send_multi,
    wire.Ack: on_ack,
    wire.PublishPrekeys: on_publish,
    wire.FetchPrekeys: on_fetch_prekeys,
    wire.Ping: on_ping,
    wire.Pong: on_pong,
    wire.PresenceSubscribe: on_subscribe,
    wire.InviteOpen: rendezvous.on_invite_open,  # the invite rendezvous (protocol 7)
    wire.InviteJoin: rendezvous.on_invite_join,
    wire.InviteData: rendezvous.on_invite_data,
}
