"""One client connection, its states, and the copies it carries (no I/O).

Connection states (:class:`ConnState`, table ``CONN_TRANSITIONS``)::

    HANDSHAKE --(Noise XX complete, valid payload)--> OPEN --(error, EOF, timeout,
                                                             shutdown, replaced)--> CLOSED
    HANDSHAKE --(bad record, deadline, EOF, evicted for a newcomer)------------> CLOSED

A recipient's delivery mode (:class:`DeliveryMode`, table ``MODE_TRANSITIONS``;
``docs/protocol.md`` section 3.3)::

    SYNCING --(a fetch returned the last stored row: Synced sent)--> STORE
    STORE   --(caught up: no fetch outstanding, nothing unfetched, none of its
               own inserts pending, its output below the low-water mark)--> LIVE
    LIVE    --(output above high water, too many unacked, reader stalled,
               or its worker's output or unacked bytes above their caps)--> STORE

In SYNCING and STORE new copies are appended to the store and fetched in
``seq`` order, so a sender's frames never overtake each other (SYNCING: the
backlog found at connect time is still being sent, and ``Synced`` is owed). In
LIVE a copy is delivered at once and waits in ``inflight`` for its Ack.

What is independent of the mode (each can hold in any of them):

* ``fetching``: a fetch of stored rows is outstanding (one at a time);
* ``unfetched``: the store may hold rows past ``cursor`` (the last fetch came
  back full, or rows were committed since): fetch again when there is room;
* ``spilled``: copies this connection's rules sent to the store that are not
  committed yet; it may not go LIVE before they are (they would be overtaken).

Reading a connection stops while any ``B_*`` bit of ``blocks`` is set (its
bytes wait in the kernel): see the table below. A connection and everything
hanging off it is touched only by the thread of its :class:`Loop`; other
threads post work to that loop (``Loop.call_soon``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from enum import IntEnum
from typing import Any, Final, Protocol

from securechat.core import wire
from securechat.core.encoding import fingerprint
from securechat.core.noise import NoiseConnection
from securechat.relay.limits import INITIAL_FRAME_ALLOWANCE, RelayConfig, TokenBucket


class ConnState(IntEnum):
    """Where a connection is in its life (transitions: ``CONN_TRANSITIONS``, module docstring)."""

    HANDSHAKE = 0
    OPEN = 1
    CLOSED = 2


class DeliveryMode(IntEnum):
    """How new copies reach an OPEN recipient: through the store in order, or live."""

    SYNCING = 0
    STORE = 1
    LIVE = 2


CONN_TRANSITIONS: Final[dict[ConnState, frozenset[ConnState]]] = {
    ConnState.HANDSHAKE: frozenset({ConnState.OPEN, ConnState.CLOSED}),
    ConnState.OPEN: frozenset({ConnState.CLOSED}),
    ConnState.CLOSED: frozenset(),
}
MODE_TRANSITIONS: Final[dict[DeliveryMode, frozenset[DeliveryMode]]] = {
    DeliveryMode.SYNCING: frozenset({DeliveryMode.STORE}),
    DeliveryMode.STORE: frozenset({DeliveryMode.LIVE}),
    DeliveryMode.LIVE: frozenset({DeliveryMode.STORE}),
}

# Module-level names for the hot path (a global is four times cheaper than ``Enum.X``).
HANDSHAKE: Final = ConnState.HANDSHAKE
OPEN: Final = ConnState.OPEN
CLOSED: Final = ConnState.CLOSED
SYNCING: Final = DeliveryMode.SYNCING
STORE: Final = DeliveryMode.STORE
LIVE: Final = DeliveryMode.LIVE

# The message-3 payload a client may send: nothing (older clients) or its Ed25519 key.
ED25519_KEY_SIZE: Final = 32
# Log label of a client that did not send its signing key: its X25519 key's fingerprint,
# which is NOT the identity fingerprint users compare (that one covers both keys).
X25519_ONLY_LABEL: Final = "x25519-only:"

# Why reading a connection is stopped (bits of Conn.blocks); read again when all clear.
# Plain ints, not an IntFlag: they are tested on every read, and ``int & IntFlag`` runs
# Python code and builds a flag object each time.
B_OUT: Final = 1  # its output is above the high-water mark (it does not read)
B_STORE: Final = 2  # the store's queue is above its high-water mark (every connection)
B_CONN_STORE: Final = 4  # its outstanding store requests cost MAX_CONN_STORE_COST
B_HOLD: Final = 8  # a frame waits for its shared budget (guard.Budgets)
B_DEBT: Final = 16  # it spent more than its frame budget: not read until it is paid back
B_BACKLOG: Final = 32  # decoded frames wait in its decoder: decode those before reading more
# Blocks during which we are the ones not reading: no idle or frame timeout then.
UNREAD: Final = B_STORE | B_CONN_STORE | B_HOLD | B_DEBT | B_BACKLOG


class Submission:
    """One Send/SendMulti: Accepted once every copy is safe, Error if one is refused."""

    __slots__ = ("conn", "copies", "done", "msg_id", "remaining", "status")

    def __init__(self, conn: Conn, msg_id: bytes, copies: int) -> None:
        self.conn = conn
        self.msg_id = msg_id
        self.copies = copies
        self.remaining = copies
        self.status = wire.STATUS_DELIVERED  # the lowest status of the copies so far
        self.done = False


class Copy:
    """One recipient's copy of a submitted payload, on its way.

    The sender's address prefix (for the store's per-prefix quota) is read from
    the submission's connection when the copy is stored.
    """

    __slots__ = ("mailbox", "msg_id", "payload", "sender", "sub", "ts")

    def __init__(
        self, sub: Submission, mailbox: bytes, sender: bytes, msg_id: bytes, ts: int, payload: bytes
    ) -> None:
        self.sub = sub
        self.mailbox = mailbox
        self.sender = sender
        self.msg_id = msg_id
        self.ts = ts
        self.payload = payload


class Inflight:
    """A copy delivered live, waiting for the recipient's Ack (or its timeout)."""

    __slots__ = ("copy", "deadline", "sent", "subs", "turn")

    def __init__(self, copy: Copy, sent: float, turn: int, ack_timeout: float) -> None:
        self.copy = copy
        self.sent = sent  # loop clock and loop turn when queued (stall detection)
        self.turn = turn
        self.deadline = sent + ack_timeout
        self.subs: list[Submission] = [copy.sub]


class Inbox(Protocol):
    """What other threads post to the rules of the loop owning a connection."""

    def incoming(self, conn: Conn, copy: Copy) -> None: ...

    def new_rows(self, conn: Conn) -> None: ...


class Loop(Protocol):
    """What the rules need of the loop that owns a connection (``worker.Worker``; in
    tests an in-memory loop): its clock, output, and the way to reach its thread."""

    now: float  # monotonic seconds at the start of this loop turn
    now_ms: int  # wall clock (ms) at the start of this loop turn: frame timestamps
    turns: int  # loop turns so far
    held_bytes: int  # output the kernel has not taken yet, over all its connections

    @property
    def delivery(self) -> Inbox: ...

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None: ...

    def on_own_thread(self) -> bool: ...

    def queue_frame(self, conn: Conn, data: bytes) -> None: ...

    def close(self, conn: Conn, reason: str, error: tuple[int, bytes] | None = None) -> None: ...

    def block(self, conn: Conn, reason: int) -> None: ...

    def unblock(self, conn: Conn, reason: int) -> None: ...


class Conn:
    """One client connection; touched only by its loop's thread."""

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
        "loop",
        "mailbox",
        "mode",
        "noise",
        "origin",
        "out",
        "partial",
        "pending",
        "pending_size",
        "prefix",
        "sent_stored",
        "sock",
        "spilled",
        "state",
        "store_out",
        "unfetched",
        "watching",
    )  # fmt: skip

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        addr: tuple[str, int],
        prefix: str,
        now: float,
        config: RelayConfig,
        noise: NoiseConnection,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.ip = addr[0]
        self.addr = f"{addr[0]}:{addr[1]}"
        self.prefix = prefix
        self.origin = prefix.encode()  # the store's per-prefix quota key
        self.noise = noise
        self.decoder = wire.FrameDecoder()
        self.state = HANDSHAKE
        self.deadline = now + config.handshake_timeout
        self.last_rx = now
        self.identity: bytes | None = None
        self.mailbox: bytes | None = None
        self.fp = ""
        # output: frames queued this turn (plaintext), and ciphertext the kernel refused
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.dirty = False
        self.out = bytearray()
        # intake: why it is not read, what it holds, what it owes (intake.py)
        self.blocks = 0
        self.store_out = 0  # cost of its store requests not answered yet
        self.held_frames: list[wire.Frame] | None = None  # frames waiting for a budget
        self.hold_until = 0.0
        self.debt_until = 0.0
        self.partial = 0  # bytes held for an incomplete record or frame
        self.frame_at = now  # when a frame last completed (the frame deadline)
        self.bucket_frames = TokenBucket(
            config.rate_frames, config.burst_frames, now, INITIAL_FRAME_ALLOWANCE
        )
        self.bucket_bytes = TokenBucket(config.rate_bytes, config.burst_bytes, now)
        # delivery (delivery.py): the mode, live copies awaiting their Ack, the store cursor
        self.mode = SYNCING
        self.inflight: dict[tuple[bytes, bytes], Inflight] = {}
        self.inflight_bytes = 0
        self.sent_stored: set[tuple[bytes, bytes]] = set()
        self.fetching = False
        self.unfetched = False
        self.spilled = 0
        self.cursor = 0
        self.watching: frozenset[bytes] = frozenset()

    def name(self) -> str:
        return self.fp or self.addr

    def backlog(self) -> int:
        """Output not yet on the wire: ciphertext the kernel refused plus this turn's frames."""
        return len(self.out) + self.pending_size

    def drop_output(self) -> int:
        """Closed: forget its output (nothing more is written); the ciphertext bytes
        the kernel had refused, which the loop counted as held."""
        held = len(self.out)
        self.pending.clear()
        self.pending_size = 0
        self.out = bytearray()
        return held

    def authenticate(self, identity: bytes, claim: bytes) -> bool:
        """The handshake completed with ``identity`` and the message-3 payload ``claim``:
        OPEN; False (and still HANDSHAKE) when the claim is neither empty nor a key."""
        if len(claim) not in (0, ED25519_KEY_SIZE):
            return False
        self.enter(OPEN)
        self.identity = identity
        self.mailbox = wire.mailbox_address(identity)
        # The identity fingerprint users see covers both keys; only the owner of the
        # X25519 key can send this claim, and a false one only changes its own log line.
        self.fp = (
            fingerprint(identity + claim) if claim else X25519_ONLY_LABEL + fingerprint(identity)
        )
        return True

    def enter(self, state: ConnState) -> None:
        """Move to ``state``; a move outside ``CONN_TRANSITIONS`` is a bug."""
        assert state in CONN_TRANSITIONS[self.state], f"{self.state.name} -> {state.name}"
        self.state = state

    def switch(self, mode: DeliveryMode) -> None:
        """Change the delivery mode; a move outside ``MODE_TRANSITIONS`` is a bug."""
        assert mode in MODE_TRANSITIONS[self.mode], f"{self.mode.name} -> {mode.name}"
        self.mode = mode
