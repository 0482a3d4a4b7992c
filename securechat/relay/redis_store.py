"""Mailboxes in Redis, shared by every relay of a cluster (issue 16): the second store.

The rules (``delivery.py``, ``services.py``) talk to :class:`~securechat.relay.mailboxes.
Mailboxes` and do not change: :class:`RedisMailboxes` answers the same requests
as the SQLite store thread, from Redis instead of a file. The data layout and
every operation are Redis functions (``redis_lib.lua``), so each request is one
atomic call on the mailbox's keys (one hash tag, one Redis Cluster slot), as
Signal's message cache does with its insert and remove scripts.

Group commit, the Redis way: one thread takes every request waiting (up to
``STORE_BATCH``), sends them as one pipeline (one round trip) and replies when
Redis has answered. With ``appendonly yes`` and ``appendfsync always`` Redis
fsyncs its append-only file before it sends any reply of that event-loop turn,
so a reply means the write is on disk: the relay's ``Accepted`` keeps its meaning
("acknowledged means it will not be lost"). ``check_durability`` refuses a Redis
that cannot keep that promise (``cluster.py`` asks it at start).

Failure: a batch that fails on the connection (Redis restarting, a network
blip) is retried for up to ``RETRY_S`` (every request is idempotent: an insert
retried is a DUPLICATE, a delete deletes nothing, a publish adds no prekey
twice; a one-time prekey taken by a lost reply is one prekey lost, never one
handed out twice), then answered ``None`` (``STORE_FAILED``; senders keep
their messages and retry). An error of one request (out of memory, say) fails
that request only.

Hints answered from memory (``Mailboxes``): ``may_hold`` is always True (another
node may have stored frames for any mailbox: every connection's first fetch
asks Redis); ``prekey_count`` is the count last seen by this node (from a fetch,
a publish or a hand-out), trusted for ``PREKEY_HINT_S``; ``is_known`` caches
what Redis said.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import redis

from securechat.core import wire
from securechat.errors import StorageError
from securechat.relay.limits import MAX_STORED_OTKS, STORE_BATCH, STORE_REQUEST_COST, RelayConfig
from securechat.relay.mailboxes import (
    STOP,
    Bundle,
    Delete,
    Fetch,
    Insert,
    InsertResult,
    MarkKnown,
    Publish,
    Published,
    Request,
    Row,
    TakePrekeys,
    take_batch,
)

log = logging.getLogger("securechat.relay")

LIBRARY: Final = "securechat"  # the Redis function library (redis_lib.lua)
RETRY_S: Final = 3.0  # a batch that fails on the connection is retried this long
RETRY_PAUSE_S: Final = 0.1  # between retries (Redis restarting takes a moment)
PREKEY_HINT_S: Final = 5.0  # a one-time prekey count seen this recently is trusted
UNKNOWN_PREKEYS: Final = 1  # count assumed for an identity not seen lately ("maybe some")
MAX_HINTS: Final = 1 << 16  # prekey counts and known mailboxes kept in memory
FULL_LOG_S: Final = 10.0  # a full Redis is logged once per this many seconds


def mailbox_keys(mailbox: bytes) -> dict[str, str]:
    """The keys of one mailbox: one hash tag, so they live in one Redis Cluster slot."""
    tag = "sc:{" + mailbox.hex() + "}:"
    return {name: tag + name for name in ("q", "m", "d", "t", "k", "on", "spk", "otk")}


def load_library(client: redis.Redis) -> None:
    """Load (or replace) the relay's Redis functions: persisted with the data."""
    code = resources.files("securechat.relay").joinpath("redis_lib.lua").read_text()
    client.function_load(code, replace=True)


class RedisMailboxes:
    """The relay's :class:`~securechat.relay.mailboxes.Mailboxes` backed by Redis."""

    def __init__(
        self,
        client: redis.Redis,
        config: RelayConfig,
        node: str,
        on_new_rows: Callable[[set[bytes]], None],
    ) -> None:
        self._client = client
        self._config = config
        self._node = node
        self._on_new_rows = on_new_rows
        self._ttl_ms = int(config.ttl * 1000)
        self._unknown_ttl_ms = int(min(config.unknown_ttl, config.ttl) * 1000)
        self._queue: queue.SimpleQueue[Request[Any] | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="relay-redis", daemon=True)
        self._count_lock = threading.Lock()
        self.queued_bytes = 0
        self.queued_requests = 0
        self._otk_hint: dict[bytes, tuple[int, float]] = {}  # mailbox -> (count, seen at)
        self._known: dict[bytes, None] = {}
        # Counters for the metrics line and the benchmark.
        self.batches = 0
        self.requests = 0
        self.failures = 0
        self.retries = 0
        self._next_full_log = 0.0

    # --- Mailboxes -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop."""
        self._queue.put(STOP)
        self._thread.join()

    def submit(self, request: Request[Any]) -> None:
        with self._count_lock:
            self.queued_bytes += request.size + STORE_REQUEST_COST
            self.queued_requests += 1
        self._queue.put(request)

    def may_hold(self, mailbox: bytes) -> bool:
        """Always True: any node may have stored frames for it (one fetch per connection)."""
        return True

    def prekey_count(self, identity: bytes) -> int:
        hint = self._otk_hint.get(wire.mailbox_address(identity))
        if hint is None or time.monotonic() - hint[1] > PREKEY_HINT_S:
            return UNKNOWN_PREKEYS  # the hand-out itself is exact: LPOP in Redis
        return hint[0]

    def is_known(self, mailbox: bytes) -> bool:
        return mailbox in self._known

    def note_known(self, mailbox: bytes) -> None:
        """Not used by the cluster (``may_hold`` is always True: a MarkKnown instead)."""
        self.submit(MarkKnown(None, None, mailbox))

    # --- requests that only the cluster makes (cluster.ClusterRouter) ----------------------
    def claim(self, mailbox: bytes, since: int) -> None:
        """This node holds ``mailbox``'s connection: inserts elsewhere publish to it.

        Queued before that connection's first fetch, on the same connection to
        Redis, so an insert on another node either precedes the claim (and the
        fetch finds it) or follows it (and sees the claim, and tells this node).
        """
        self.submit(_Claim(None, None, mailbox, self._node, since, is_release=False))

    def release(self, mailbox: bytes, since: int) -> None:
        self.submit(_Claim(None, None, mailbox, self._node, since, is_release=True))

    # --- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = take_batch(self._queue.get(), self._queue, STORE_BATCH)
            if batch:
                try:
                    self._run_batch(batch)
                except Exception:  # never let the store thread die: log, answer None
                    log.exception("redis store thread error")
                    self._answer(batch, [None] * len(batch))

    def _run_batch(self, batch: list[Request[Any]]) -> None:
        raw = self._execute(batch)
        results: list[Any] = []
        new_rows: set[bytes] = set()
        for req, value in zip(batch, raw, strict=True):
            if isinstance(value, Exception):
                self._log_failure(req, value)
                self.failures += 1
                results.append(_failed(req, value))
                continue
            result = self._parse(req, value)
            if result == InsertResult.INSERTED and isinstance(req, Insert):
                new_rows.add(req.mailbox)
            results.append(result)
        self.batches += 1
        self.requests += len(batch)
        self._answer(batch, results)
        if new_rows:
            self._on_new_rows(new_rows)

    def _log_failure(self, req: Request[Any], exc: Exception) -> None:
        """One line per failure, except a full Redis: one line per FULL_LOG_S (a flood of
        refused frames must not fill the log)."""
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return  # said once per batch by _execute
        if _out_of_memory(exc):
            now = time.monotonic()
            if now < self._next_full_log:
                return
            self._next_full_log = now + FULL_LOG_S
            log.warning(
                "Redis is at its maxmemory: new frames are refused (senders keep them and"
                " retry) until acknowledgements or expiry free space; raise maxmemory if the"
                " machine allows"
            )
            return
        log.warning("redis request %s failed: %s", type(req).__name__, exc)

    def _answer(self, batch: list[Request[Any]], results: list[Any]) -> None:
        cost = sum(req.size for req in batch) + STORE_REQUEST_COST * len(batch)
        with self._count_lock:
            self.queued_bytes -= cost
            self.queued_requests -= len(batch)
        for req, result in zip(batch, results, strict=True):
            if req.poster is not None and req.reply is not None:
                req.poster.call_soon(req.reply, result)

    def _execute(self, batch: list[Request[Any]]) -> list[Any]:
        """One pipeline for the batch; on a connection failure retried for RETRY_S."""
        deadline = time.monotonic() + RETRY_S
        while True:
            pipe = self._client.pipeline(transaction=False)
            for req in batch:
                self._queue_call(pipe, req)
            try:
                out: list[Any] = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                out = [exc] * len(batch)
            failed = [v for v in out if isinstance(v, redis.ConnectionError | redis.TimeoutError)]
            missing = [v for v in out if _no_function(v)]
            if missing:  # a Redis that lost its functions (flushed): load them, retry
                load_library(self._client)
            if not (failed or missing) or time.monotonic() >= deadline:
                return out
            self.retries += 1
            log.warning("redis unavailable (%s); retrying the batch", (failed or missing)[0])
            time.sleep(RETRY_PAUSE_S)

    def _queue_call(self, pipe: Any, req: Request[Any]) -> None:
        cfg = self._config
        if isinstance(req, Insert):
            k = mailbox_keys(req.mailbox)
            pipe.fcall(
                "sc_insert",
                6,
                k["q"],
                k["m"],
                k["d"],
                k["t"],
                k["k"],
                k["on"],
                req.sender + req.msg_id,
                req.ts,
                req.payload,
                1 if req.force else 0,
                req.origin,
                self._ttl_ms,
                self._unknown_ttl_ms,
                cfg.quota_frames,
                cfg.quota_bytes,
                cfg.unknown_quota_frames,
                cfg.unknown_quota_bytes,
                cfg.sender_quota_bytes,
                cfg.prefix_quota_bytes,
                self._node,
                req.mailbox,
            )
        elif isinstance(req, Fetch):
            k = mailbox_keys(req.mailbox)
            pipe.fcall(
                "sc_fetch", 5, k["q"], k["m"], k["d"], k["t"], k["otk"], req.seq, req.limit,
                req.max_bytes,
            )  # fmt: skip
        elif isinstance(req, Delete):
            k = mailbox_keys(req.mailbox)
            members = [sender + msg_id for sender, msg_id in req.keys]
            pipe.fcall("sc_delete", 4, k["q"], k["m"], k["d"], k["t"], *members)
        elif isinstance(req, Publish):
            k = mailbox_keys(wire.mailbox_address(req.identity))
            pipe.fcall("sc_publish", 2, k["spk"], k["otk"], req.spk, MAX_STORED_OTKS, *req.otks)
        elif isinstance(req, TakePrekeys):
            k = mailbox_keys(wire.mailbox_address(req.identity))
            pipe.fcall("sc_take", 2, k["spk"], k["otk"], 1 if req.one_time else 0)
        elif isinstance(req, MarkKnown):
            k = mailbox_keys(req.mailbox)
            pipe.fcall("sc_mark_known", 2, k["k"], k["t"], self._ttl_ms)
        elif isinstance(req, _Claim):
            k = mailbox_keys(req.mailbox)
            name = "sc_release" if req.is_release else "sc_claim"
            pipe.fcall(name, 1, k["on"], req.node, req.since)
        else:  # pragma: no cover - a new request type must be taught here
            raise TypeError(f"the Redis store cannot run {type(req).__name__}")

    def _parse(self, req: Request[Any], value: Any) -> Any:
        now = time.monotonic()
        if isinstance(req, Insert):
            return InsertResult(int(value[0]))
        if isinstance(req, Fetch):
            self._hint(req.mailbox, int(value[0]), now)
            rows: list[Row] = []
            for i in range(1, len(value), 4):
                member = bytes(value[i + 1])
                rows.append(
                    (int(value[i]), member[:32], member[32:], int(value[i + 2]), value[i + 3])
                )
            return rows
        if isinstance(req, Publish):
            held, changed, refused = (int(v) for v in value)
            self._hint(wire.mailbox_address(req.identity), held, now)
            return Published(held, changed=bool(changed), refused=bool(refused))
        if isinstance(req, TakePrekeys):
            spk, otk, left = value
            self._hint(wire.mailbox_address(req.identity), int(left), now)
            return Bundle(bytes(spk), bytes(otk) or None, int(left))
        if isinstance(req, MarkKnown):
            self._remember_known(req.mailbox)
            return bool(value)
        return None  # Delete, claims: nothing to say

    def _hint(self, mailbox: bytes, count: int, now: float) -> None:
        if len(self._otk_hint) >= MAX_HINTS:
            self._otk_hint = {}  # a fresh dict: workers reading the old one are unaffected
        self._otk_hint[mailbox] = (count, now)

    def _remember_known(self, mailbox: bytes) -> None:
        if len(self._known) >= MAX_HINTS:
            self._known = {}
        self._known[mailbox] = None


@dataclass(slots=True, eq=False)
class _Claim(Request[None]):
    """Set (or release, if still ours) the node that holds a mailbox's connection."""

    mailbox: bytes
    node: str
    since: int
    is_release: bool = field(kw_only=True)


def _no_function(value: Any) -> bool:
    return isinstance(value, redis.ResponseError) and "function not found" in str(value).lower()


def _out_of_memory(exc: Exception) -> bool:
    """Redis at its ``maxmemory``: ``OOM ...`` for a command, "... used memory >
    'maxmemory'" for a function call without the allow-oom flag (Redis 7)."""
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and ("OOM" in text or "'maxmemory'" in text)


def _failed(req: Request[Any], exc: Exception) -> Any:
    """A request that failed: an insert refused by Redis's memory cap is STORE_FULL (the
    sender is told storage is full, not broken); anything else is None (STORE_FAILED)."""
    if isinstance(req, Insert) and _out_of_memory(exc):
        return InsertResult.STORE_FULL
    return None


def check_reachable(client: redis.Redis, url: str) -> None:
    """One clear line when Redis does not answer (not a traceback)."""
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise StorageError(
            f"Redis at {url} refused the password ({exc}); set SECURECHAT_REDIS_PASSWORD"
        ) from None
    except redis.RedisError as exc:
        raise StorageError(f"cannot reach Redis at {url}: {exc}") from None
