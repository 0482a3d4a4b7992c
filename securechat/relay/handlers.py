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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from securechat import wire
from securechat.relay import store as st
from securechat.relay.limits import MAX_INFLIGHT
from securechat.relay.router import OPEN, Copy, Inflight, Submission, recent_key, resolve

if TYPE_CHECKING:
    from securechat.relay.worker import Conn, Worker

MAX_INFLIGHT_BYTES: Final = 4 * 1024 * 1024  # unacked live payload bytes per recipient


def _now_ms() -> int:
    return int(time.time() * 1000)


def on_send(w: Worker, conn: Conn, f: wire.Send) -> None:
    sub = Submission(conn, f.msg_id, 1)
    route_copy(w, conn, sub, f.mailbox, f.payload, _now_ms())


def on_send_multi(w: Worker, conn: Conn, f: wire.SendMulti) -> None:
    sub = Submission(conn, f.msg_id, len(f.recipients))
    ts = _now_ms()
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
    target = router.route(mailbox, lambda: w.store_copy(copy, force=False, subs=[sub]))
    if target is not None:
        target.worker.call_soon(incoming, target.worker, target, copy)


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
        and conn.backlog() < cfg.out_high_water
        and len(conn.inflight) < MAX_INFLIGHT
        and conn.inflight_bytes < MAX_INFLIGHT_BYTES
    ):
        conn.inflight[key] = Inflight(copy, w.now + cfg.ack_timeout)
        conn.inflight_bytes += len(copy.payload)
        w.awaiting.add(conn)
        w.queue_frame(conn, wire.encode_deliver(copy.msg_id, copy.sender, copy.ts, copy.payload))
        return
    conn.live = False  # from now on, in order through the store until caught up
    conn.own_inserts += 1

    def stored(result: int | None) -> None:
        conn.own_inserts -= 1
        w.new_rows(conn)

    w.store_copy(copy, force=False, subs=[copy.sub], then=stored)


def on_ack(w: Worker, conn: Conn, f: wire.Ack) -> None:
    mailbox = conn.mailbox
    assert mailbox is not None
    router = w.ctx.router
    to_delete: list[tuple[bytes, bytes]] = []
    for sender, msg_id in f.entries:
        key = (sender, msg_id)
        router.remember_acked(recent_key(mailbox, sender, msg_id))
        entry = conn.inflight.pop(key, None)
        if entry is None:
            conn.sent_stored.discard(key)
            to_delete.append(key)
            continue
        conn.inflight_bytes -= len(entry.copy.payload)
        for sub in entry.subs:
            resolve(sub, wire.STATUS_DELIVERED)
        notify_delivered(w, sender, msg_id, mailbox)
    if not to_delete:
        return

    def op(store: st.MailboxStore, now: int) -> list[tuple[bytes, bytes]]:
        return [k for k in to_delete if store.delete(mailbox, k[0], k[1])]

    def done(deleted: list[tuple[bytes, bytes]] | None) -> None:
        for sender, msg_id in deleted or ():
            notify_delivered(w, sender, msg_id, mailbox)

    w.store_request(op, done)


def notify_delivered(w: Worker, sender: bytes, msg_id: bytes, mailbox: bytes) -> None:
    """Best-effort receipt to the sender, if it is connected."""
    target = w.ctx.router.online.get(wire.mailbox_address(sender))
    if target is not None:
        frame = wire.encode(wire.Delivered(msg_id, mailbox))
        target.worker.call_soon(target.worker.queue_frame, target, frame)


def on_publish(w: Worker, conn: Conn, f: wire.PublishPrekeys) -> None:
    identity = conn.identity
    assert identity is not None

    def op(store: st.MailboxStore, now: int) -> int:
        return store.publish_prekeys(identity, f.signed_prekey, f.one_time_prekeys)

    w.store_request(op, lambda count: _reply_count(w, conn, count))


def send_prekey_count(w: Worker, conn: Conn) -> None:
    identity = conn.identity
    assert identity is not None
    w.store_request(lambda s, now: s.count_prekeys(identity), lambda n: _reply_count(w, conn, n))


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
