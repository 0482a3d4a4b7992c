"""The relay's rules in memory: no process, no socket, no thread, no clock.

``MemoryRelay`` wires the real rules (``Intake``, ``Delivery``, ``Services``,
``Router``, ``guard.Budgets``, ``Rendezvous``) to in-memory stand-ins for what
the worker and the store thread do:

* ``MemoryLoop`` is a ``conn.Loop``: frames a rule queues for a connection are
  decoded and kept in ``loop.out[conn]``; ``close`` does what the worker's does
  without a socket; calls posted to it wait in ``posted`` until ``relay.turn()``.
  With several loops, ``on_own_thread`` is true only for the loop whose work is
  running, so copies and outcomes cross loops through posted calls, as they
  cross worker threads in the relay.
* ``MemoryStore`` is a ``mailboxes.Mailboxes``: requests wait in ``pending``
  (inspect them: they are data) until ``relay.commit()`` runs them against an
  in-memory backend, or until the test answers one itself (``answer``), e.g.
  with a refusal or ``None`` (the store failed).

Time only moves when a test says so (``relay.turn(seconds)``).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from securechat.core import dh, wire
from securechat.core.noise import NoiseConnection
from securechat.relay.conn import CLOSED, OPEN, Conn
from securechat.relay.delivery import Delivery
from securechat.relay.guard import Budgets, PartialBytes, prefix_of
from securechat.relay.limits import MAX_STORED_OTKS, STORE_REQUEST_COST, RelayConfig
from securechat.relay.mailboxes import (
    Bundle,
    Insert,
    InsertResult,
    Published,
    Request,
    Row,
)
from securechat.relay.rendezvous import Rendezvous
from securechat.relay.router import Router
from securechat.relay.rules import Rules

START = 1000.0  # the loops' clock at the start (seconds; any value)
START_MS = 1_700_000_000_000


class MemoryBackend:
    """A store backend in dicts: rows per mailbox in seq order, prekeys per identity."""

    def __init__(self) -> None:
        self.seq = 0
        self.rows: dict[bytes, list[Row]] = {}
        self.spk: dict[bytes, bytes] = {}
        self.otks: dict[bytes, list[bytes]] = {}
        self.known: set[bytes] = set()

    def insert(
        self,
        mailbox: bytes,
        sender: bytes,
        msg_id: bytes,
        ts: int,
        payload: bytes,
        *,
        force: bool,
        origin: bytes = b"",
    ) -> InsertResult:
        rows = self.rows.setdefault(mailbox, [])
        if any(r[1] == sender and r[2] == msg_id for r in rows):
            return InsertResult.DUPLICATE
        self.seq += 1
        rows.append((self.seq, sender, msg_id, ts, payload))
        return InsertResult.INSERTED

    def fetch(
        self, mailbox: bytes, after_seq: int, limit: int, now_ms: int, max_bytes: int = 0
    ) -> list[Row]:
        out: list[Row] = []
        size = 0
        for row in self.rows.get(mailbox, []):
            if row[0] > after_seq and len(out) < limit and not (max_bytes and size >= max_bytes):
                out.append(row)
                size += len(row[4])
        return out

    def delete(self, mailbox: bytes, sender: bytes, msg_id: bytes) -> bool:
        rows = self.rows.get(mailbox, [])
        kept = [r for r in rows if not (r[1] == sender and r[2] == msg_id)]
        self.rows[mailbox] = kept
        return len(kept) < len(rows)

    def publish_prekeys(self, identity: bytes, spk: bytes, otks: tuple[bytes, ...]) -> Published:
        held = self.otks.setdefault(identity, [])
        if otks and not spk and identity not in self.spk:
            return Published(len(held), changed=False, refused=True)
        changed = bool(spk) and self.spk.get(identity) != spk
        if spk:
            self.spk[identity] = spk
        room = MAX_STORED_OTKS - len(held)
        held += otks[:room]
        return Published(len(held), changed or bool(otks[:room]))

    def take_prekeys(self, identity: bytes, *, one_time: bool = True) -> Bundle:
        held = self.otks.get(identity, [])
        if identity not in self.spk:
            return Bundle(b"", None, len(held))
        otk = held.pop(0) if one_time and held else None
        return Bundle(self.spk[identity], otk, len(held))

    def mark_known(self, mailbox: bytes) -> bool:
        new = mailbox not in self.known
        self.known.add(mailbox)
        return new


class MemoryStore:
    """The ``Mailboxes`` the rules talk to: requests wait in ``pending`` until answered."""

    def __init__(self, on_new_rows: Callable[[bytes], None]) -> None:
        self.backend = MemoryBackend()
        self.on_new_rows = on_new_rows  # as the store thread tells the relay (server.py)
        self.pending: list[Request[Any]] = []
        self.submitted: list[Request[Any]] = []  # every request ever, in order
        self.noted_known: set[bytes] = set()

    @property
    def queued_bytes(self) -> int:
        return sum(r.size + STORE_REQUEST_COST for r in self.pending)

    def submit(self, request: Request[Any]) -> None:
        self.pending.append(request)
        self.submitted.append(request)

    def may_hold(self, mailbox: bytes) -> bool:
        queued = any(isinstance(r, Insert) and r.mailbox == mailbox for r in self.pending)
        return queued or bool(self.backend.rows.get(mailbox))

    def prekey_count(self, identity: bytes) -> int:
        return len(self.backend.otks.get(identity, []))

    def is_known(self, mailbox: bytes) -> bool:
        return mailbox in self.backend.known or mailbox in self.noted_known

    def note_known(self, mailbox: bytes) -> None:
        self.noted_known.add(mailbox)

    def of(self, kind: type) -> list[Any]:
        """The pending requests of one kind (Insert, Fetch, Delete, ...)."""
        return [r for r in self.pending if isinstance(r, kind)]

    def answer(self, request: Request[Any], result: Any) -> None:
        """Answer one request as the store thread would after COMMIT (``None``: failed)."""
        self.pending.remove(request)
        self._reply(request, result)

    def commit(self) -> None:
        """Run every pending request against the backend, answer them in order."""
        batch, self.pending = self.pending, []
        new_rows = []
        for request in batch:
            result = request.run(self.backend, START_MS)
            self._reply(request, result)
            if isinstance(request, Insert) and result == InsertResult.INSERTED:
                new_rows.append(request.mailbox)
        for mailbox in dict.fromkeys(new_rows):
            self.on_new_rows(mailbox)

    @staticmethod
    def _reply(request: Request[Any], result: Any) -> None:
        if request.poster is not None and request.reply is not None:
            request.poster.call_soon(request.reply, result)


class MemoryLoop:
    """A ``conn.Loop`` with no socket and no thread: see the module docstring."""

    def __init__(self, relay: MemoryRelay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.now = START
        self.now_ms = START_MS
        self.turns = 0
        self.held_bytes = 0
        self.posted: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self.out: dict[Conn, list[wire.Frame]] = {}
        self.closed: dict[Conn, tuple[str, tuple[int, bytes] | None]] = {}
        self.conns: set[Conn] = set()
        self.rules = Rules(self, relay)
        self.intake = self.rules.intake
        self._delivery = self.rules.delivery

    @property
    def delivery(self) -> Delivery:
        return self._delivery

    def __repr__(self) -> str:
        return f"MemoryLoop({self.name})"

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        self.posted.append((fn, args))

    def on_own_thread(self) -> bool:
        return self.relay.current is self

    def queue_frame(self, conn: Conn, data: bytes) -> None:
        if conn.state == OPEN:
            self.out.setdefault(conn, []).extend(wire.FrameDecoder().feed(data))

    def close(self, conn: Conn, reason: str, error: tuple[int, bytes] | None = None) -> None:
        if conn.state == CLOSED:
            return
        was_open = conn.state == OPEN
        if error is not None and was_open:
            code, msg_id = error
            self.queue_frame(conn, wire.encode(wire.Error(code, msg_id, reason[:200])))
        conn.enter(CLOSED)
        self.conns.discard(conn)
        self.closed[conn] = (reason, error)
        self.intake.forget(conn)
        if was_open:
            self._delivery.closed(conn)

    def block(self, conn: Conn, reason: int) -> None:
        conn.blocks |= reason

    def unblock(self, conn: Conn, reason: int) -> None:
        conn.blocks &= ~reason


class MemoryRelay:
    """One relay's shared state and ``loops`` memory loops (see the module docstring)."""

    def __init__(self, loops: int = 1, **config: Any) -> None:
        self.config = RelayConfig(**config)
        self.router = Router()
        self.store = MemoryStore(self._new_rows)
        self.budgets = Budgets(self.config)
        self.rendezvous: Rendezvous[Conn] = Rendezvous(self.config)
        self.partial: PartialBytes[Conn] = PartialBytes(
            self.config.partial_bytes, self.config.partial_bytes_per_prefix
        )
        self.current: MemoryLoop | None = None
        self.loops = [MemoryLoop(self, str(i)) for i in range(loops)]

    # --- clients ---------------------------------------------------------------------------------
    def connect(
        self, private: bytes | None = None, *, loop: int = 0, ip: str = "127.0.0.1"
    ) -> Conn:
        """An authenticated connection (its opening rules run; the store is not committed)."""
        private = private or os.urandom(32)
        home = self.loops[loop]
        noise = NoiseConnection(initiator=False, static_private=os.urandom(32), rng=os.urandom)
        prefix = prefix_of(ip)
        conn = Conn(home, None, (ip, 40000), prefix, home.now, self.config, noise)  # type: ignore[arg-type]
        assert conn.authenticate(dh.public_key(private), b"")
        home.conns.add(conn)
        with self.running(home):
            home.delivery.opened(conn)
        self.run()
        return conn

    def send(self, conn: Conn, *frames: wire.Frame, settle: bool = True) -> None:
        """Frames from ``conn``'s client, as its loop reads them (decoded, charged,
        handled); with ``settle=False`` the calls they post to loops wait for ``run``."""
        self.feed(conn, b"".join(wire.encode(f) for f in frames), settle=settle)

    def feed(self, conn: Conn, data: bytes, *, settle: bool = True) -> None:
        """Decrypted bytes from ``conn``'s client (any bytes: a test of the decoder)."""
        home: MemoryLoop = conn.loop  # type: ignore[assignment]
        conn.last_rx = home.now
        with self.running(home):
            home.intake.feed(conn, data)
            home.intake.account(conn)
        if settle:
            self.run()

    def received(self, conn: Conn) -> list[wire.Frame]:
        """What the relay sent ``conn`` since the last call."""
        home: MemoryLoop = conn.loop  # type: ignore[assignment]
        return home.out.pop(conn, [])

    def close(self, conn: Conn, reason: str = "peer closed the connection") -> None:
        home: MemoryLoop = conn.loop  # type: ignore[assignment]
        with self.running(home):
            home.close(conn, reason)
        self.run()

    def _new_rows(self, mailbox: bytes) -> None:
        conn = self.router.online.get(mailbox)
        if conn is not None:
            conn.loop.call_soon(conn.loop.delivery.new_rows, conn)

    # --- time, threads and the store -----------------------------------------------------------
    def running(self, loop: MemoryLoop) -> _Running:
        return _Running(self, loop)

    def run(self) -> None:
        """Run posted calls, loop after loop, until none is left."""
        for _ in range(1000):
            busy = [loop for loop in self.loops if loop.posted]
            if not busy:
                return
            for loop in busy:
                with self.running(loop):
                    while loop.posted:
                        fn, args = loop.posted.popleft()
                        fn(*args)
        raise AssertionError("posted calls never settle")

    def commit(self) -> None:
        """The store commits what is pending; replies run on the loops that asked."""
        self.store.commit()
        self.run()

    def turn(self, seconds: float = 0.0) -> None:
        """One loop turn of every loop, ``seconds`` later: the timers of the worker."""
        for loop in self.loops:
            loop.now += seconds
            loop.now_ms += int(seconds * 1000)
            loop.turns += 1
            with self.running(loop):
                loop.rules.backlog(_run)
                loop.rules.timers(loop.now, loop.conns, _run)
        self.run()


def _run(conn: Conn, fn: Callable[..., None], *args: Any) -> None:
    """The loop's guard, without the guarding: a test wants to see the exception."""
    fn(*args)


class _Running:
    """``with relay.running(loop)``: code runs as if on ``loop``'s thread."""

    def __init__(self, relay: MemoryRelay, loop: MemoryLoop) -> None:
        self.relay = relay
        self.loop = loop
        self.before: MemoryLoop | None = None

    def __enter__(self) -> None:
        self.before, self.relay.current = self.relay.current, self.loop

    def __exit__(self, *exc: object) -> None:
        self.relay.current = self.before


def frames_of(frames: list[wire.Frame], kind: type) -> list[Any]:
    return [f for f in frames if isinstance(f, kind)]


def mid(n: int) -> bytes:
    return n.to_bytes(wire.ID_SIZE, "big")
