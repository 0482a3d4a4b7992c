"""The delivery rules: what becomes of every copy of every message (no I/O).

Rules, in the order they apply to one copy (mailbox, sender, msg_id):

1. acknowledged recently by the recipient -> ``Accepted(2)`` again, not delivered twice;
2. recipient offline -> stored; ``Accepted(1)`` after COMMIT (or QUOTA_EXCEEDED /
   STORE_FAILED, never a silent drop);
3. recipient online, LIVE, with room -> ``Deliver`` now; the sender's ``Accepted(2)``
   waits for the recipient's ``Ack``; no Ack within the ack timeout, or the
   recipient leaves -> stored (no quota: it was accepted), then ``Accepted(1)``;
4. recipient online but SYNCING or STORE (catching up), or out of room -> stored and
   fetched in order later (``Accepted(1)`` after COMMIT); out of room also turns it
   to STORE (``conn.py`` has the modes and their transitions).

A SendMulti is one submission with one copy per recipient: ``Accepted`` (the
lowest status of its copies) once every copy is safe; ``Error`` as soon as one
copy is refused (the sender retries the whole frame; retries are idempotent).
The relay sends no ``Delivered`` receipts (deprecated): what reached the peer's
device is for the peers' end-to-end receipts to say, which a relay cannot forge.

An ``Ack`` entry counts only for a copy this connection was given (live and
awaiting its Ack, or sent from the store on this connection): the first deletes
nothing (it was never stored), the second deletes the stored row; any other
entry is ignored without touching the store, so acknowledgements cannot make
the relay work for nothing. An Ack of n entries costs ``1 + n // 4`` frames.

On connect the backlog is sent (fetched in ``seq`` order, ``FETCH_BATCH`` rows or
``FETCH_BYTES`` at a time, each fetch when the output has room), then ``Synced``,
then ``PrekeyCount``. A newer connection of the same identity takes the mailbox
over: the old one gets ``Error(REPLACED)`` and is closed, and its unacknowledged
live copies are stored.

In and out. A :class:`Delivery` serves the connections of one loop. In: frames
(``on_send``, ``on_send_multi``, ``on_ack``), store results (the replies to its
requests), copies that other loops route to its connections (``incoming``), rows
committed for them (``new_rows``), connections opening and closing, and the
clock (``Loop.now``, ``expire``). Out, through narrow ports and never a socket,
thread or selector: the connection's :class:`~securechat.relay.conn.Loop`
(queue a frame, close, post to another loop), the
:class:`~securechat.relay.mailboxes.Mailboxes` (submit a request) and the
:class:`~securechat.relay.router.Router` (who is online where). Why ports rather
than returned lists of actions (h11 returns events): Send -> Deliver -> Ack runs
tens of thousands of times a second, and a list and an action object per frame
are allocations the loop then pays for in garbage collection; a call on a port
allocates nothing, and a test's port records the same actions
(``tests/unit/test_relay_delivery_rules.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from securechat.core import wire
from securechat.relay.conn import (
    B_CONN_STORE,
    LIVE,
    OPEN,
    STORE,
    SYNCING,
    Conn,
    Copy,
    Inflight,
    Submission,
)
from securechat.relay.intake import Intake, Wait
from securechat.relay.limits import (
    ACK_ENTRIES_PER_COST,
    FETCH_BATCH,
    FETCH_BYTES,
    MAX_CONN_STORE_COST,
    MAX_INFLIGHT,
    STORE_REQUEST_COST,
)
from securechat.relay.mailboxes import (
    Delete,
    Fetch,
    Insert,
    InsertResult,
    MarkKnown,
    Row,
)
from securechat.relay.outcome import DELIVERED, insert_outcome, resolve
from securechat.relay.router import Router, recent_key
from securechat.relay.services import Services

MAX_INFLIGHT_BYTES: Final = 4 * 1024 * 1024  # unacked live payload bytes per recipient
STALL_INFLIGHT_BYTES: Final = 128 * 1024  # with this much unacked ...
STALL_AFTER_S: Final = 0.25  # ... the oldest unacked for this long ...
STALL_TURNS: Final = 3  # ... and this many loop turns, nothing read since: stalled


class Delivery:
    """The delivery rules for the connections of one loop; see the module docstring."""

    def __init__(self, intake: Intake, router: Router, services: Services) -> None:
        # The loop, store and config are the intake's: one place says whose they are.
        self.loop = intake.loop
        self.intake = intake
        self.router = router
        self.store = intake.store
        self.config = intake.config
        self.services = services
        # Payload of live deliveries awaiting their Ack, over all of the loop's connections
        # (bounded by worker_inflight_high_water, see ``stalled``).
        self.inflight_bytes = 0
        self.awaiting: set[Conn] = set()  # its connections with live copies awaiting an Ack

    def handlers(self) -> dict[type, Callable[[Conn, Any], Wait]]:
        return {wire.Send: self.on_send, wire.SendMulti: self.on_send_multi, wire.Ack: self.on_ack}

    # --- a connection opens and closes -----------------------------------------------------
    def opened(self, conn: Conn) -> None:
        """``conn`` authenticated: it takes its mailbox over (a connection it replaces is
        closed with REPLACED), and its backlog is fetched before anything goes live."""
        mailbox = conn.mailbox
        assert mailbox is not None
        store = self.store
        if not store.is_known(mailbox):  # its identity's first connection (since a restart)
            if store.may_hold(mailbox):  # frames wait with a short life: extend them now
                store.submit(MarkKnown(None, None, mailbox))
            else:  # recorded within a second, in one batch with others: not a write each
                store.note_known(mailbox)
        conn.fetching = True
        old = self.router.register(conn, lambda: self._first_sync(conn))
        if old is not None:
            reason = "replaced by a newer connection"
            old.loop.call_soon(old.loop.close, old, reason, (wire.REPLACED, wire.NO_ID))
        else:
            self.services.presence_changed(conn, online=True)
        self.drained(conn)

    def _first_sync(self, conn: Conn) -> None:
        """Under the router's lock at registration: fetch the backlog, if there can be one.

        Most connections find their mailbox empty; asking the store would cost
        two thread hand-offs per connection (handshakes/s). See
        ``StoreThread.may_hold`` for why "no" is safe to trust here.
        """
        assert conn.mailbox is not None
        if self.store.may_hold(conn.mailbox):
            self.request_fetch(conn)
        else:
            conn.fetching = False
            self._synced(conn)

    def _synced(self, conn: Conn) -> None:
        """The backlog is sent: ``Synced``, then the prekey count (protocol 3.3)."""
        assert conn.identity is not None
        conn.switch(STORE)
        self.loop.queue_frame(conn, wire.encode(wire.Synced()))
        count = self.store.prekey_count(conn.identity)
        self.loop.queue_frame(conn, wire.encode(wire.PrekeyCount(count)))

    def closed(self, conn: Conn) -> None:
        """``conn`` (open until now) closed: it leaves its mailbox, its watches and
        invites end, and its live copies not acknowledged are stored."""
        if self.router.unregister(conn):
            self.services.presence_changed(conn, online=False)
        self.services.closed(conn)
        self.awaiting.discard(conn)
        for entry in conn.inflight.values():  # delivered but never acked: persist
            self.store_copy(entry.copy, force=True, subs=entry.subs)
        conn.inflight.clear()
        self.inflight_bytes -= conn.inflight_bytes
        conn.inflight_bytes = 0

    # --- Send, SendMulti: route every copy --------------------------------------------------
    def on_send(self, conn: Conn, f: wire.Send) -> Wait:
        self.route(conn, Submission(conn, f.msg_id, 1), f.mailbox, f.payload, self.loop.now_ms)
        return None

    def on_send_multi(self, conn: Conn, f: wire.SendMulti) -> Wait:
        sub = Submission(conn, f.msg_id, len(f.recipients))
        ts = self.loop.now_ms
        for mailbox, payload in f.recipients:
            self.route(conn, sub, mailbox, payload, ts)
        return None

    def route(self, conn: Conn, sub: Submission, mailbox: bytes, payload: bytes, ts: int) -> None:
        """Rules 1 and 2 here; the recipient's own loop applies 3 and 4 (``incoming``)."""
        sender = conn.identity
        assert sender is not None
        router = self.router
        if router.was_acked(recent_key(mailbox, sender, sub.msg_id)):
            resolve(sub, DELIVERED)
            return
        copy = Copy(sub, mailbox, sender, sub.msg_id, ts, payload)
        # Lock-free look-up first (the common, online case); only "offline, so store"
        # needs the router's lock, and only then do we build the closure for it.
        target = router.online.get(mailbox)
        if target is None:
            target = router.route(
                mailbox, lambda: self.store_copy(copy, force=False, subs=[sub], conn=conn)
            )
            if target is None:
                return
        loop = target.loop
        if loop is self.loop:  # same thread: no hand-off (and no wake-up) needed
            self.incoming(target, copy)
        else:
            loop.call_soon(loop.delivery.incoming, target, copy)

    def incoming(self, conn: Conn, copy: Copy) -> None:
        """A copy for ``conn``'s mailbox, on ``conn``'s loop: deliver live or store."""
        if conn.state != OPEN:  # closed meanwhile: the store keeps it
            self.store_copy(copy, force=False, subs=[copy.sub])
            return
        key = (copy.sender, copy.msg_id)
        entry = conn.inflight.get(key)
        if entry is not None:  # a retry while the first delivery awaits its Ack
            entry.subs.append(copy.sub)
            return
        if key in conn.sent_stored:  # already stored and sent: the insert is a no-op
            self.store_copy(copy, force=False, subs=[copy.sub])
            return
        loop = self.loop
        cfg = self.config
        if (
            conn.mode == LIVE
            and len(conn.out) < cfg.out_high_water  # what the kernel refused: a slow reader
            and len(conn.inflight) < MAX_INFLIGHT
            and conn.inflight_bytes < MAX_INFLIGHT_BYTES
            and loop.held_bytes < cfg.worker_high_water
            and not self.stalled(conn)
        ):
            conn.inflight[key] = Inflight(copy, loop.now, loop.turns, cfg.ack_timeout)
            size = len(copy.payload)
            conn.inflight_bytes += size
            self.inflight_bytes += size
            self.awaiting.add(conn)
            loop.queue_frame(
                conn, wire.encode_deliver(copy.msg_id, copy.sender, copy.ts, copy.payload)
            )
            return
        if conn.mode == LIVE:  # from now on, in order through the store until caught up
            conn.switch(STORE)
        conn.spilled += 1

        def stored(result: InsertResult | None) -> None:
            conn.spilled -= 1
            self.new_rows(conn)

        self.store_copy(copy, force=False, subs=[copy.sub], then=stored)

    def stalled(self, conn: Conn) -> bool:
        """Many unacked bytes, and nothing read from the reader since the oldest was sent,
        for several loop turns and a while (or at once when the loop holds too much).

        Its copies then go to the store, so a burst to many readers that stopped
        reading keeps memory bounded; a busy reader that is acking is read every
        turn, however long the relay's turns get under load, and stays live.
        "A while" (0.25 s) spares a reader that is merely slow for a moment; but
        when the loop's unacknowledged live payload is over its high-water mark
        the wait is skipped: in that quarter second a burst to a hundred silent
        readers held 50-70 MiB.
        """
        if conn.inflight_bytes < STALL_INFLIGHT_BYTES:
            return False
        oldest = next(iter(conn.inflight.values()))
        loop = self.loop
        if conn.last_rx >= oldest.sent or loop.turns - oldest.turn <= STALL_TURNS:
            return False
        return (
            loop.now - oldest.sent > STALL_AFTER_S
            or self.inflight_bytes > self.config.worker_inflight_high_water
        )

    # --- Ack ------------------------------------------------------------------------------------
    def on_ack(self, conn: Conn, f: wire.Ack) -> Wait:
        mailbox = conn.mailbox
        assert mailbox is not None
        entries = f.entries
        extra = len(entries) // ACK_ENTRIES_PER_COST  # each entry is decoded and looked up
        if extra:
            self.intake.charge_frames(conn, extra)
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
            self.inflight_bytes -= size
            for sub in entry.subs:
                resolve(sub, DELIVERED)
        if acked:
            self.router.remember_acked_many(acked)
        if not inflight:
            self.awaiting.discard(conn)
        if to_delete:
            self.intake.store_request(Delete(self.loop, None, mailbox, to_delete), conn)
        return None

    def expire(self, now: float) -> None:
        """Live copies not acknowledged in time are stored (the device may have them:
        they are sent again on the next connection, which deduplicates)."""
        for conn in list(self.awaiting):
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

    # --- the store ---------------------------------------------------------------------------
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

        ``conn``: the sender's connection when this runs on its loop (its
        outstanding store cost is charged, see ``Intake.store_request``); the
        sender's address prefix is charged to the store's quota either way.
        """
        size = len(copy.payload)
        cost = size + STORE_REQUEST_COST
        if conn is not None:  # (Intake.store_request, inline: the stored-send path)
            conn.store_out += cost
            if conn.store_out >= MAX_CONN_STORE_COST:
                self.loop.block(conn, B_CONN_STORE)
        intake = self.intake

        def done(result: InsertResult | None) -> None:
            if conn is not None:
                intake.store_answered(conn, cost)
            outcome = insert_outcome(result)
            for sub in subs:
                resolve(sub, outcome)
            if then is not None:
                then(result)

        origin = copy.sub.conn.origin
        self.store.submit(
            Insert(
                self.loop,
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
        """Queue a fetch of the next stored rows for ``conn`` (at registration this runs
        under the router lock, so it is FIFO-ordered with every offline insert)."""
        assert conn.mailbox is not None
        conn.fetching = True
        conn.unfetched = False

        def done(rows: list[Row] | None) -> None:
            self.fetched(conn, rows)

        self.store.submit(
            Fetch(self.loop, done, conn.mailbox, conn.cursor, FETCH_BATCH, FETCH_BYTES)
        )

    def fetched(self, conn: Conn, rows: list[Row] | None) -> None:
        """Stored rows arrived: send those not sent yet, in order; Synced at the end of
        the backlog; go on fetching, or go live, as the output allows."""
        conn.fetching = False
        if conn.state != OPEN:
            return
        if rows is None:
            self.loop.close(conn, "relay store failed", (wire.STORE_FAILED, wire.NO_ID))
            return
        size = 0
        for seq, sender, msg_id, ts, payload in rows:
            conn.cursor = seq
            size += len(payload)
            key = (bytes(sender), bytes(msg_id))
            if key in conn.sent_stored or key in conn.inflight:
                continue
            conn.sent_stored.add(key)
            self.loop.queue_frame(conn, wire.encode_deliver(key[1], key[0], ts, bytes(payload)))
        if len(rows) == FETCH_BATCH or size >= FETCH_BYTES:
            conn.unfetched = True
        elif conn.mode == SYNCING:
            self._synced(conn)
        self.drained(conn)

    def drained(self, conn: Conn) -> None:
        """Room in the output again: fetch stored rows, or go LIVE when caught up."""
        if conn.state != OPEN or conn.backlog() > self.config.out_low_water:
            return
        if conn.unfetched and not conn.fetching:
            self.request_fetch(conn)
        elif conn.mode == STORE and not (conn.fetching or conn.unfetched or conn.spilled):
            conn.switch(LIVE)

    def new_rows(self, conn: Conn) -> None:
        """Rows were committed for ``conn``'s mailbox (posted by the store thread)."""
        if conn.state == OPEN:
            conn.unfetched = True
            self.drained(conn)
