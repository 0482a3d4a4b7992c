"""The store as the relay's rules see it: requests and results are data.

Why an interface: the rules (``delivery.py``, ``services.py``) never run SQL and
never wait for a disk. They *submit* a request and get its result later, on
their own loop, once it is durable; the few questions they must answer at once
(may this mailbox hold frames? how many one-time prekeys does it have?) are
read from memory. One implementation sits behind it today: SQLite written by
one group-commit thread (``store.py``: the schema and the queries;
``store_thread.py``: the thread). Relays sharing mailboxes (issue 16) put a
second one, Redis, behind the same requests; the rules do not change.

Two sides:

* :class:`Backend`: the operations a store implements. The thread that owns it
  runs requests one after another inside a transaction and commits them
  together (group commit); a request that fails is answered ``None``.
* :class:`Mailboxes`: what the rules call. ``submit(request)``: the request is
  answered exactly once, ``request.reply(result)`` run on ``request.poster``
  (the loop that asked) after COMMIT returned, ``None`` when it failed. The
  hints ``may_hold``, ``prekey_count``, ``is_known`` and ``note_known`` answer
  from memory, and ``queued_bytes`` is the back-pressure figure: the cost of the
  requests not yet durable (each request's payload plus ``STORE_REQUEST_COST``).

Requests: :class:`Insert`, :class:`Fetch`, :class:`Delete`, :class:`Publish`,
:class:`TakePrekeys`, :class:`MarkKnown`. Results: :class:`InsertResult`, a
list of :data:`Row`, :class:`Published`, :class:`Bundle`, ``bool``.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, Final, Generic, NamedTuple, Protocol, TypeVar

R = TypeVar("R")

Row = tuple[int, bytes, bytes, int, bytes]  # seq, sender, msg_id, ts, payload


class InsertResult(IntEnum):
    """What became of one stored copy (``Backend.insert``)."""

    INSERTED = 1
    DUPLICATE = 2  # the same (mailbox, sender, msg_id) is stored: an idempotent retry
    OVER_QUOTA = 3  # the recipient's mailbox is full
    LOW_SPACE = 4  # refused: the disk is full and the reserve is spent
    SENDER_OVER_QUOTA = 5  # the sender identity stored its share
    PREFIX_OVER_QUOTA = 6  # the sender's address prefix stored its share
    UNKNOWN_OVER_QUOTA = 7  # a mailbox nobody ever connected for is full
    STORE_FULL = 8  # the relay's global cap (--store-max-bytes) is reached


class Published(NamedTuple):
    """The answer to a PublishPrekeys: one-time prekeys held, and whether anything changed."""

    held: int
    changed: bool
    refused: bool = False  # one-time prekeys without any signed prekey (protocol 3.4)


class Bundle(NamedTuple):
    """A prekey bundle handed out: the signed prekey (empty: none), maybe a one-time
    prekey (taken: handed out once), and the one-time prekeys left."""

    signed_prekey: bytes
    one_time_prekey: bytes | None
    left: int


class Backend(Protocol):
    """The operations a store implements (SQLite today: ``store.MailboxStore``)."""

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
    ) -> InsertResult: ...

    def fetch(
        self, mailbox: bytes, after_seq: int, limit: int, now_ms: int, max_bytes: int = 0
    ) -> list[Row]: ...

    def delete(self, mailbox: bytes, sender: bytes, msg_id: bytes) -> bool: ...

    def publish_prekeys(
        self, identity: bytes, spk: bytes, otks: tuple[bytes, ...]
    ) -> Published: ...

    def take_prekeys(self, identity: bytes, *, one_time: bool = True) -> Bundle: ...

    def mark_known(self, mailbox: bytes) -> bool: ...


class Poster(Protocol):
    """Where a request's reply runs: ``fn(*args)`` on the asking loop's thread."""

    def call_soon(self, fn: Callable[..., None], *args: Any) -> None: ...


# Requests are data (fields, no closures over the store), compared by identity
# (``eq=False``): each is answered once, through its own reply.
@dataclass(slots=True, eq=False)
class Request(Generic[R]):
    """One unit of store work: ``run`` on the store's thread, ``reply`` on ``poster``.

    ``size``: the payload bytes the request holds while queued (an :class:`Insert`'s).
    """

    poster: Poster | None = field(repr=False)
    reply: Callable[[R | None], None] | None = field(repr=False)
    size: ClassVar[int] = 0

    def run(self, store: Backend, now_ms: int) -> R:
        raise NotImplementedError


@dataclass(slots=True, eq=False)
class Insert(Request[InsertResult]):
    """Store one copy; ``force`` skips the per-mailbox, sender and prefix quotas (a copy
    already delivered live, not acknowledged in time). ``origin``: the sender's prefix."""

    mailbox: bytes
    sender: bytes
    msg_id: bytes
    ts: int
    payload: bytes
    force: bool = field(kw_only=True)
    origin: bytes = field(kw_only=True)
    size: int = field(init=False, repr=False)  # type: ignore[misc]

    def __post_init__(self) -> None:
        self.size = len(self.payload)

    def run(self, store: Backend, now_ms: int) -> InsertResult:
        return store.insert(
            self.mailbox,
            self.sender,
            self.msg_id,
            self.ts,
            self.payload,
            force=self.force,
            origin=self.origin,
        )


@dataclass(slots=True, eq=False)
class Fetch(Request[list[Row]]):
    """The next rows of ``mailbox`` after ``seq``: at most ``limit``, stopping at the row that
    reaches ``max_bytes`` of payload (not expired at the store's clock)."""

    mailbox: bytes
    seq: int
    limit: int
    max_bytes: int

    def run(self, store: Backend, now_ms: int) -> list[Row]:
        return store.fetch(self.mailbox, self.seq, self.limit, now_ms, self.max_bytes)


@dataclass(slots=True, eq=False)
class Delete(Request[None]):
    """Delete acknowledged copies ``(sender, msg_id)`` from ``mailbox``."""

    mailbox: bytes
    keys: list[tuple[bytes, bytes]]

    def run(self, store: Backend, now_ms: int) -> None:
        for sender, msg_id in self.keys:
            store.delete(self.mailbox, sender, msg_id)


@dataclass(slots=True, eq=False)
class Publish(Request[Published]):
    """Store an identity's prekey bundle (protocol 3.4)."""

    identity: bytes
    spk: bytes
    otks: tuple[bytes, ...]

    def run(self, store: Backend, now_ms: int) -> Published:
        return store.publish_prekeys(self.identity, self.spk, self.otks)


@dataclass(slots=True, eq=False)
class TakePrekeys(Request[Bundle]):
    """Hand out ``identity``'s bundle, with a one-time prekey if ``one_time``."""

    identity: bytes
    one_time: bool = field(kw_only=True)

    def run(self, store: Backend, now_ms: int) -> Bundle:
        return store.take_prekeys(self.identity, one_time=self.one_time)


@dataclass(slots=True, eq=False)
class MarkKnown(Request[bool]):
    """Record that ``mailbox``'s identity connected (its waiting frames get the full ttl)."""

    mailbox: bytes

    def run(self, store: Backend, now_ms: int) -> bool:
        return store.mark_known(self.mailbox)


class Mailboxes(Protocol):
    """What the rules ask of the store (``store_thread.StoreThread`` today)."""

    @property
    def queued_bytes(self) -> int: ...

    def submit(self, request: Request[Any]) -> None: ...

    def may_hold(self, mailbox: bytes) -> bool: ...

    def prekey_count(self, identity: bytes) -> int: ...

    def is_known(self, mailbox: bytes) -> bool: ...

    def note_known(self, mailbox: bytes) -> None: ...


STOP: Final = object()  # queued by a store thread's stop(): finish what is queued, then close


def take_batch(
    first: object, pending: queue.SimpleQueue[Request[Any] | object], limit: int
) -> tuple[list[Request[Any]], bool]:
    """``first`` and whatever else is already queued, up to ``limit`` requests, for one
    transaction or pipeline (the group commit of both stores); and whether STOP came."""
    batch: list[Request[Any]] = []
    item: object | None = first
    while item is not None:
        if item is STOP:
            return batch, True
        assert isinstance(item, Request)
        batch.append(item)
        if len(batch) >= limit:
            break
        try:
            item = pending.get_nowait()
        except queue.Empty:
            break
    return batch, False
