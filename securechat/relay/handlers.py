"""What the relay does with each client frame (runs on the connection's worker).

Delivery rules, in the order they are applied to one copy (mailbox, sender, id):

1. acknowledged recently by the recipient -> ``Accepted(2)`` again, not delivered twice;
2. recipient offline -> stored; ``Accepted(1)`` after COMMIT (or QUOTA_EXCEEDED /
   STORE_FAILED, never a silent drop);
3. recipient online, live, with room -> ``Deliver`` now; the sender's
   ``Accepted(2)`` waits for the recipient's ``Ack`` (and is the receipt: a
   ``Delivered`` follows only for the copies of a SendMulti); no Ack within
   the ack timeout, or the recipient leaves -> stored, then ``Accepted(1)``;
4. recipient online but catching up from the store or stalled -> stored and
   fetched in order later (``Accepted(1)`` after COMMIT).

A SendMulti is one submission with one copy per recipient: ``Accepted`` (the
lowest status of its copies) once every copy is safe; ``Error`` as soon as one
copy is refused (the sender retries the whole frame; retries are idempotent).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from securechat import wire
from securechat.relay import store as st
from securechat.relay.limits import MAX_INFLIGHT
from securechat.relay.router import OPEN, Copy, Inflight, Submission, recent_key, resolve

if TYPE_CHECKING:
    from securechat.relay.worker import Conn, Worker

MAX_INFLIGHT_BYTES: Final = 4 * 1024 * 1024  # unacked live payload bytes per recipient
STALL_INFLIGHT_BYTES: Final = 128 * 1024  # with this much unacked ...
STALL_AFTER_S: Final = 0.25  # ... the oldest unacked for this long ...
STALL_TURNS: Final = 3  # ... and this many loop turns, nothing read since: stalled


def on_send(w: Worker, conn: Conn, f: wire.Send) -> None:
    route_copy(w, conn, Submission(conn, f.msg_id, 1), f.mailbox, f.payload, w.now_ms)


def on_send_multi(w: Worker, conn: Conn, f: wire.SendMulti) -> None:
    sub = Submission(conn, f.msg_id, len(f.recipients))
    ts = w.now_ms
    for mailbox, payload in f.recipients:
        route_copy(w, conn, sub, mailbox, payload, ts)


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
        target = router.route(mailbox, lambda: w.store_copy(copy, force=False, subs=[sub]))
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

    def stored(result: int | None) -> None:
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


def on_ack(w: Worker, conn: Conn, f: wire.Ack) -> None:
    mailbox = conn.mailbox
    assert mailbox is not None
    w.ctx.router.remember_acked_many([mailbox + s + m for s, m in f.entries])
    inflight = conn.inflight
    to_delete: list[tuple[bytes, bytes]] = []
    for key in f.entries:  # (sender, msg_id): the same tuple as the inflight key
        entry = inflight.pop(key, None)
        if entry is None:
            conn.sent_stored.discard(key)
            to_delete.append(key)
            continue
        size = len(entry.copy.payload)
        conn.inflight_bytes -= size
        w.inflight_bytes -= size
        first = entry.subs[0]
        # A single Send's Accepted(2) already says "delivered to the device"; only a
        # SendMulti's copies need their own receipt (its Accepted waits for all copies).
        receipt = wire.encode_delivered(key[1], mailbox) if first.copies > 1 else None
        for sub in entry.subs:
            resolve(sub, wire.STATUS_DELIVERED, receipt if sub is first else None)
    if not conn.inflight:
        w.awaiting.discard(conn)
    if not to_delete:
        return

    def op(store: st.MailboxStore, now: int) -> list[tuple[bytes, bytes]]:
        return [k for k in to_delete if store.delete(mailbox, k[0], k[1])]

    def done(deleted: list[tuple[bytes, bytes]] | None) -> None:
        for sender, msg_id in deleted or ():
            notify_delivered(w, sender, msg_id, mailbox)

    w.store_request(op, done)


def notify_delivered(w: Worker, sender: bytes, msg_id: bytes, mailbox: bytes) -> None:
    """Best-effort receipt to the sender, if it is connected (a stored copy was acked)."""
    target = w.ctx.router.online.get(wire.mailbox_address(sender))
    if target is not None:
        target.worker.call_soon(
            target.worker.queue_frame, target, wire.encode_delivered(msg_id, mailbox)
        )


def on_publish(w: Worker, conn: Conn, f: wire.PublishPrekeys) -> None:
    identity = conn.identity
    assert identity is not None

    def op(store: st.MailboxStore, now: int) -> int:
        return store.publish_prekeys(identity, f.signed_prekey, f.one_time_prekeys)

    w.store_request(op, lambda count: _reply_count(w, conn, count))


def _reply_count(w: Worker, conn: Conn, count: int | None) -> None:
    if count is None:
        frame = wire.Error(wire.STORE_FAILED, wire.NO_ID, "relay store failed")
        w.queue_frame(conn, wire.encode(frame))
    else:
        w.queue_frame(conn, wire.encode(wire.PrekeyCount(count)))


def on_fetch_prekeys(w: Worker, conn: Conn, f: wire.FetchPrekeys) -> None:
    def op(store: st.MailboxStore, now: int) -> tuple[bytes, bytes | None]:
        return store.take_prekeys(f.identity_key)

    def done(result: tuple[bytes, bytes | None] | None) -> None:
        if result is None:
            frame = wire.Error(wire.STORE_FAILED, wire.NO_ID, "relay store failed")
            w.queue_frame(conn, wire.encode(frame))
            return
        spk, otk = result
        w.queue_frame(conn, wire.encode(wire.Prekeys(f.identity_key, spk, otk)))

    w.store_request(op, done)


def on_ping(w: Worker, conn: Conn, f: wire.Ping) -> None:
    w.queue_frame(conn, wire.encode(wire.Pong(f.nonce)))


def on_pong(w: Worker, conn: Conn, f: wire.Pong) -> None:
    """A Pong keeps the connection alive like any frame; nothing else to do."""


def on_subscribe(w: Worker, conn: Conn, f: wire.PresenceSubscribe) -> None:
    new = frozenset(f.identity_keys)
    router = w.ctx.router
    router.watch(conn, conn.watching, new)
    conn.watching = new
    for key in f.identity_keys:
        online = wire.mailbox_address(key) in router.online
        w.queue_frame(conn, wire.encode(wire.Presence(key, online)))


HANDLERS: Final[dict[type, Callable[[Any, Any, Any], None]]] = {
    wire.Send: on_send,
    wire.SendMulti: on_send_multi,
    wire.Ack: on_ack,
    wire.PublishPrekeys: on_publish,
    wire.FetchPrekeys: on_fetch_prekeys,
    wire.Ping: on_ping,
    wire.Pong: on_pong,
    wire.PresenceSubscribe: on_subscribe,
}
