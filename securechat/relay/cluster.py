"""Relays that share their mailboxes through Redis (``securechat relay --cluster URL``).

What each node shares through Redis, and how:

* **Mailboxes, prekeys, quotas, known mailboxes**: the Redis store
  (``redis_store.py``; every operation one atomic Redis function).
* **Who is connected where** (presence, "a newer connection replaces the older",
  where to announce new frames): a broadcast channel ``sc:all`` on which each
  node says who came online (identity and connection time) and who left, plus a
  heartbeat every ``HEARTBEAT_S``; each node keeps a mirror of the others' online
  identities and forgets a node silent for ``NODE_DEAD_S`` (killed: its clients
  reconnect elsewhere). Per mailbox, the key ``on`` names the node holding its
  connection; the store's insert function publishes the mailbox on that node's
  channel ``sc:node:<id>`` in the same atomic step, and that node fetches the new
  frames from the store, in order (the sender already has its Accepted: stored
  first, told second). Same-node live delivery keeps its fast path.
* **Budgets** (guard.Budgets: per identity and per network): token buckets in
  Redis (:class:`RedisBudgets`), one round trip on the frames that have one
  (prekey fetch and publish, presence subscribe, invite join: rare, rate-limited
  frames); if Redis does not answer, this node's own buckets decide.

What is *not* shared: connection admission (per node: a load balancer spreads
addresses), the recently-acknowledged set (a retry through another node may be
delivered twice; the client's end-to-end layer drops the duplicate), and invites
(the rendezvous is in memory: both parties of an invite must reach the same node,
which a load balancer hashing on the invite is not; docs/operations.md says so).

Durability: the relay answers ``Accepted`` only after Redis replied, and with
``appendonly yes`` + ``appendfsync always`` Redis replies only after fsync. At
start :func:`check_durability` refuses a Redis configured otherwise, or one that
may evict keys (``maxmemory-policy`` other than ``noeviction`` would drop stored
frames to make room), unless ``--cluster-allow-unsafe`` (then it warns, loudly).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

import redis

from securechat.core import wire
from securechat.errors import StorageError, UsageError
from securechat.relay.conn import Conn
from securechat.relay.guard import Budget, Budgets
from securechat.relay.limits import REDIS_PASSWORD_ENV, RelayConfig
from securechat.relay.redis_store import RedisMailboxes, check_reachable, load_library
from securechat.relay.router import Router

log = logging.getLogger("securechat.relay")

PASSWORD_ENV: Final = REDIS_PASSWORD_ENV
BROADCAST: Final = "sc:all"
NODE_CHANNEL: Final = "sc:node:"
HEARTBEAT_S: Final = 1.0  # each node says it is alive this often
NODE_DEAD_S: Final = 4.0  # a node silent this long is gone: its clients are offline
SOCKET_TIMEOUT_S: Final = 5.0  # a Redis reply slower than this is a failure
RECONNECT_S: Final = 0.2  # pause before the bus subscribes again after losing Redis
PUBLISH_BATCH: Final = 1024  # bus messages sent per round trip
BUDGET_TIMEOUT_S: Final = 0.5  # a shared-budget call slower than this: the node decides alone
BUDGET_FALLBACK_S: Final = 5.0  # ... and keeps deciding alone this long before asking again
# Bus message types (first byte); the rest: node id (NODE_ID_LEN), then the fields.
ONLINE: Final = b"O"  # node, since (8 bytes, ns), identity
OFFLINE: Final = b"F"  # node, since, identity
HEARTBEAT: Final = b"H"  # node
SYNC: Final = b"S"  # node: a node (re)joined; everyone says again who is online on it
FRAME: Final = b"P"  # (node channel) mailbox, then an encoded frame for that connection
NODE_ID_LEN: Final = 16
_SINCE_LEN: Final = 8


def connect(url: str) -> redis.Redis:
    """A Redis client for ``redis://HOST:PORT/DB`` or ``rediss://`` (TLS).

    The password comes from ``SECURECHAT_REDIS_PASSWORD``, never from the URL:
    a command line is visible to every user of the machine (``ps``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise UsageError(f"--cluster {url!r}: expected redis://HOST:PORT/DB or rediss://...")
    if parts.password or "@" in parts.netloc:
        raise UsageError(
            f"--cluster: put the Redis password in {PASSWORD_ENV}, not in the URL "
            "(a command line is visible to every user of this machine)"
        )
    password = os.environ.get(PASSWORD_ENV) or None
    try:
        client = redis.Redis.from_url(
            url,
            password=password,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
    except ValueError as exc:
        raise UsageError(f"--cluster {url!r}: {exc}") from None
    check_reachable(client, url)
    return client


def check_durability(client: redis.Redis, *, allow_unsafe: bool) -> str:
    """Refuse (StorageError) a Redis that cannot keep "acknowledged means not lost".

    Needs ``appendonly yes`` with ``appendfsync always`` (the reply comes after
    fsync) and ``maxmemory-policy noeviction`` (a full Redis refuses new frames,
    it never drops stored ones). Returns a one-line description for the log.
    """
    problems: list[str] = []
    try:
        conf = client.config_get("appendonly")
        conf.update(client.config_get("appendfsync"))
        conf.update(client.config_get("maxmemory-policy"))
        conf.update(client.config_get("maxmemory"))
    except redis.RedisError as exc:
        problems.append(f"cannot read its configuration ({exc})")
        conf = {}
    if conf:
        if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
            problems.append(
                f"appendonly {conf.get('appendonly')}, appendfsync {conf.get('appendfsync')}"
                " (need appendonly yes, appendfsync always: an acknowledged frame must be on"
                " disk)"
            )
        if conf.get("maxmemory-policy") != "noeviction":
            problems.append(
                f"maxmemory-policy {conf.get('maxmemory-policy')} (need noeviction: eviction"
                " would drop stored frames)"
            )
    summary = (
        f"appendonly {conf.get('appendonly')}, appendfsync {conf.get('appendfsync')}, "
        f"maxmemory {conf.get('maxmemory')}, policy {conf.get('maxmemory-policy')}"
    )
    if problems:
        text = "; ".join(problems)
        if not allow_unsafe:
            raise StorageError(
                f"Redis cannot keep acknowledged frames safe: {text}; fix its configuration"
                " (docs/operations.md, Cluster) or pass --cluster-allow-unsafe"
            )
        log.warning("UNSAFE: --cluster-allow-unsafe: acknowledged frames may be lost: %s", text)
    elif conf.get("maxmemory") in ("0", 0, None):
        log.warning("Redis has no maxmemory: the store's size is bounded only by the machine")
    return summary


def new_node_id() -> str:
    """A random id per relay process (a restarted node is a new node)."""
    return secrets.token_hex(NODE_ID_LEN // 2)


class ClusterRouter(Router):
    """The routing table of one node, plus what the other nodes told it over the bus.

    ``online`` stays this node's connections (the delivery rules' fast path);
    ``remote`` mirrors the identities online on other nodes. Thread rules as in
    ``router.py``; the mirror is written by the bus thread only.
    """

    def __init__(self, node: str, store: RedisMailboxes) -> None:
        super().__init__()
        self.node = node
        self.store = store
        self.bus: Bus | None = None  # set by the relay before workers start
        self._since: dict[Conn, int] = {}  # registration time (ns) of each local connection
        self._replaced: set[Conn] = set()  # closed because a newer one is on another node
        self._took_over: set[bytes] = set()  # identities just moved here from another node
        # Other nodes: identity -> (node, since); mailbox -> identity; node -> last heard.
        self.remote: dict[bytes, tuple[str, int]] = {}
        self.remote_mailboxes: dict[bytes, bytes] = {}
        self.nodes: dict[str, float] = {}

    # --- registration --------------------------------------------------------------------------
    def register(self, conn: Conn, first_fetch: Callable[[], None]) -> Conn | None:
        assert conn.mailbox is not None and conn.identity is not None
        since = time.time_ns()
        with self.lock:
            old = self.online.get(conn.mailbox)
            self.online[conn.mailbox] = conn
            self._since[conn] = since
            self.store.claim(conn.mailbox, since)  # before the first fetch: see claim()
            first_fetch()
        # The newest connection of this identity is here now: a copy elsewhere is being
        # replaced (that node closes it without a word), so it no longer counts as online.
        if self.remote.pop(conn.identity, None) is not None:
            self.remote_mailboxes.pop(conn.mailbox, None)
            self._took_over.add(conn.identity)  # online all along: watchers hear nothing
        self._publish(ONLINE, since, conn.identity)
        return old

    def unregister(self, conn: Conn) -> bool:
        assert conn.mailbox is not None and conn.identity is not None
        since = self._since.pop(conn, 0)
        replaced = conn in self._replaced
        self._replaced.discard(conn)
        if not super().unregister(conn):
            return False
        self.store.release(conn.mailbox, since)
        if replaced:  # the newer connection is on another node: neither offline nor online
            return False
        self._publish(OFFLINE, since, conn.identity)
        return True

    def _publish(self, kind: bytes, since: int, identity: bytes) -> None:
        if self.bus is not None:
            body = kind + self.node.encode() + since.to_bytes(_SINCE_LEN, "big") + identity
            self.bus.publish(BROADCAST, body)

    # --- presence and pushes across nodes ------------------------------------------------------
    def is_online(self, mailbox: bytes) -> bool:
        return mailbox in self.online or mailbox in self.remote_mailboxes

    def presence_changed(self, identity: bytes, *, online: bool) -> bool:
        """Tell this node's watchers only if the identity is not online on another node
        (and, coming online, was not just taken over from another node)."""
        if online and identity in self._took_over:
            self._took_over.discard(identity)
            return False
        return identity not in self.remote

    def tell(self, mailbox: bytes, frame: bytes) -> None:
        conn = self.online.get(mailbox)
        if conn is not None:
            conn.loop.call_soon(conn.loop.queue_frame, conn, frame)
            return
        identity = self.remote_mailboxes.get(mailbox)
        where = self.remote.get(identity) if identity is not None else None
        if where is not None and self.bus is not None:
            self.bus.publish(NODE_CHANNEL + where[0], FRAME + mailbox + frame)

    # --- what the bus thread hears -------------------------------------------------------------
    def heard(self, data: bytes) -> None:
        """One broadcast message from some node (possibly this one)."""
        kind, node = data[:1], data[1 : 1 + NODE_ID_LEN].decode("ascii", "replace")
        if node == self.node:
            return
        self.nodes[node] = time.monotonic()
        rest = data[1 + NODE_ID_LEN :]
        if kind == SYNC:
            self.announce_all()
        elif kind in (ONLINE, OFFLINE) and len(rest) == _SINCE_LEN + wire.KEY_SIZE:
            since = int.from_bytes(rest[:_SINCE_LEN], "big")
            identity = rest[_SINCE_LEN:]
            if kind == ONLINE:
                self._remote_online(node, since, identity)
            else:
                self._remote_offline(node, since, identity)

    def _remote_online(self, node: str, since: int, identity: bytes) -> None:
        mailbox = wire.mailbox_address(identity)
        was_online = self.is_online(mailbox)
        local = self.online.get(mailbox)
        if local is not None:
            mine = self._since.get(local, 0)
            if (mine, self.node) < (since, node):  # theirs is newer: ours is replaced
                self._replaced.add(local)
                local.loop.call_soon(self._close_replaced, local)
            else:
                return  # ours is newer: the other node closes its own
        old = self.remote.get(identity)
        if old is not None and old[1] > since:
            return
        self.remote[identity] = (node, since)
        self.remote_mailboxes[mailbox] = identity
        if not was_online:
            self._tell_watchers(identity, online=True)

    def _close_replaced(self, conn: Conn) -> None:
        """On ``conn``'s loop: close it with REPLACED (its unregister sees the mark and
        announces nothing); the mark goes either way (it may have closed meanwhile)."""
        reason = "replaced by a newer connection (on another relay node)"
        conn.loop.close(conn, reason, (wire.REPLACED, wire.NO_ID))
        self._replaced.discard(conn)

    def _remote_offline(self, node: str, since: int, identity: bytes) -> None:
        old = self.remote.get(identity)
        if old is None or old != (node, since):
            return  # a newer connection (anywhere) holds it
        self._forget_remote(identity)

    def _forget_remote(self, identity: bytes) -> None:
        mailbox = wire.mailbox_address(identity)
        self.remote.pop(identity, None)
        self.remote_mailboxes.pop(mailbox, None)
        if mailbox not in self.online:
            self._tell_watchers(identity, online=False)

    def _tell_watchers(self, identity: bytes, *, online: bool) -> None:
        frame = wire.encode(wire.Presence(identity, online))
        for watcher in self.watchers_of(identity):
            watcher.loop.call_soon(watcher.loop.queue_frame, watcher, frame)

    def check_nodes(self, now: float) -> list[str]:
        """Forget nodes silent for NODE_DEAD_S (their identities go offline)."""
        dead = [node for node, heard in self.nodes.items() if now - heard > NODE_DEAD_S]
        for node in dead:
            del self.nodes[node]
            for identity in [i for i, (n, _) in self.remote.items() if n == node]:
                self._forget_remote(identity)
        return dead

    def announce_all(self) -> None:
        """Say again who is online here (a node joined, or the bus reconnected)."""
        with self.lock:
            local = [(c, self._since.get(c, 0)) for c in self.online.values()]
        for conn, since in local:
            if conn.identity is not None:
                self._publish(ONLINE, since, conn.identity)

    def local_connections(self) -> list[Conn]:
        with self.lock:
            return list(self.online.values())


class Bus:
    """Pub/sub between the nodes: one thread listens, one publishes (workers never wait).

    Listens on ``sc:all`` (presence, heartbeats) and on this node's channel (new
    frames for a mailbox connected here; frames to push to a connection here).
    After losing Redis it subscribes again, says again who is online here, and
    has every local connection fetch (what was published meanwhile is lost).
    """

    def __init__(self, client: redis.Redis, router: ClusterRouter) -> None:
        self._client = client
        self._router = router
        self.node = router.node
        self._channel = NODE_CHANNEL + self.node
        self._out: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="relay-bus-in", daemon=True)
        self._sender = threading.Thread(target=self._send, name="relay-bus-out", daemon=True)
        self.received = 0
        self.sent = 0
        self.reconnects = 0

    def start(self) -> None:
        self._listener.start()
        self._sender.start()
        self.publish(BROADCAST, SYNC + self.node.encode())

    def stop(self) -> None:
        self._stop.set()
        self._out.put(None)
        self._sender.join(5.0)
        self._listener.join(5.0)

    def publish(self, channel: str, message: bytes) -> None:
        self._out.put((channel, message))

    # --- threads ---------------------------------------------------------------------------
    def _send(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + HEARTBEAT_S
                self._out.put((BROADCAST, HEARTBEAT + self.node.encode()))
            try:
                item = self._out.get(timeout=max(next_beat - time.monotonic(), 0.01))
            except queue.Empty:
                continue
            batch: list[tuple[str, bytes]] = []
            while item is not None and len(batch) < PUBLISH_BATCH:
                batch.append(item)
                try:
                    item = self._out.get_nowait()
                except queue.Empty:
                    break
            self._flush(batch)

    def _flush(self, batch: list[tuple[str, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for channel, message in batch:
            pipe.publish(channel, message)
        try:
            pipe.execute()
            self.sent += len(batch)
        except redis.RedisError as exc:  # lost: presence heals with the next SYNC/heartbeat
            log.warning("cluster bus: %d messages not published: %s", len(batch), exc)

    def _listen(self) -> None:
        first = True
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(BROADCAST, self._channel)
                if not first:  # anything published while we were away is lost: catch up
                    self.reconnects += 1
                    log.warning("cluster bus: subscribed again after losing Redis")
                    self.publish(BROADCAST, SYNC + self.node.encode())
                    self._router.announce_all()
                    self._fetch_all()
                first = False
                self._pump(pubsub)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if not self._stop.is_set():
                    log.warning("cluster bus: lost Redis (%s); subscribing again", exc)
                    time.sleep(RECONNECT_S)
            except Exception:  # never let the bus die: log and go on
                log.exception("cluster bus error")
                time.sleep(RECONNECT_S)
            finally:
                with contextlib.suppress(Exception):  # closing a broken connection
                    pubsub.close()

    def _pump(self, pubsub: redis.client.PubSub) -> None:
        router = self._router
        while not self._stop.is_set():
            message = pubsub.get_message(timeout=HEARTBEAT_S / 2)
            router.check_nodes(time.monotonic())
            if message is None or message.get("type") != "message":
                continue
            self.received += 1
            data = message["data"]
            channel = message["channel"]
            if channel == BROADCAST.encode():
                router.heard(data)
            elif len(data) == wire.MAILBOX_SIZE:
                self._new_rows(data)
            elif data[:1] == FRAME and len(data) > 1 + wire.MAILBOX_SIZE:
                mailbox = data[1 : 1 + wire.MAILBOX_SIZE]
                conn = router.online.get(mailbox)
                if conn is not None:
                    conn.loop.call_soon(conn.loop.queue_frame, conn, data[1 + wire.MAILBOX_SIZE :])

    def _new_rows(self, mailbox: bytes) -> None:
        conn = self._router.online.get(mailbox)
        if conn is not None:
            conn.loop.call_soon(conn.loop.delivery.new_rows, conn)

    def _fetch_all(self) -> None:
        for conn in self._router.local_connections():
            conn.loop.call_soon(conn.loop.delivery.new_rows, conn)


class RedisBudgets(Budgets):
    """guard.Budgets whose buckets live in Redis: one budget for the whole cluster.

    One blocking round trip per charge, on rare frames only (prekey fetch and
    publish, presence subscribe, invite join, one-time prekey hand-out). If
    Redis does not answer, this node's own buckets (the parent class) decide:
    a Redis outage must not let these frames through unbudgeted.
    """

    def __init__(self, config: RelayConfig, client: redis.Redis) -> None:
        super().__init__(config)
        # Its own connections, with a short timeout: a worker waits on these calls, and a
        # hung Redis must cost it BUDGET_TIMEOUT_S once per BUDGET_FALLBACK_S, not 5 s a frame.
        kwargs = dict(client.connection_pool.connection_kwargs)
        kwargs.update(socket_timeout=BUDGET_TIMEOUT_S, socket_connect_timeout=BUDGET_TIMEOUT_S)
        pool_class = type(client.connection_pool)
        self._client = redis.Redis(connection_pool=pool_class(**kwargs))
        self._local_until = 0.0  # after a failure, this node's buckets decide until then
        f = config.prefix_factor
        self._rates = {
            Budget.FETCH: (config.fetch_rate, config.fetch_burst),
            Budget.SUBSCRIBE: (config.subscribe_rate, config.subscribe_burst),
            Budget.PUBLISH: (config.publish_rate, config.publish_burst),
            Budget.JOIN: (config.invite_join_rate, config.invite_join_burst),
        }
        self._factor = f
        self._otk_rate = (config.otk_per_hour / 3600.0, config.otk_burst)

    def _shared(self, now: float) -> bool:
        return now >= self._local_until

    def _failed(self, exc: Exception, now: float) -> None:
        self._local_until = now + BUDGET_FALLBACK_S
        log.warning(
            "shared budgets unavailable (%s): this node's own budgets decide for %.0f s",
            exc,
            BUDGET_FALLBACK_S,
        )

    def charge(self, kind: Budget, identity: bytes, prefix: str, cost: float, now: float) -> float:
        if not self._shared(now):
            return super().charge(kind, identity, prefix, cost, now)
        rate, burst = self._rates[kind]
        f = self._factor
        try:
            wait = self._client.fcall(
                "sc_charge",
                2,
                b"sc:b:" + kind.value.encode() + b":i:" + identity,
                b"sc:b:" + kind.value.encode() + b":p:" + prefix.encode(),
                rate,
                burst,
                min(cost, burst),
                rate * f,
                burst * f,
                min(cost, burst * f),
            )
        except redis.RedisError as exc:
            self._failed(exc, now)
            return super().charge(kind, identity, prefix, cost, now)
        return float(wait)

    def take_one_time_prekey(self, target: bytes, now: float) -> bool:
        if not self._shared(now):
            return super().take_one_time_prekey(target, now)
        rate, burst = self._otk_rate
        try:
            wait = self._client.fcall("sc_charge", 1, b"sc:b:otk:" + target, rate, burst, 1.0)
        except redis.RedisError as exc:
            self._failed(exc, now)
            return super().take_one_time_prekey(target, now)
        return float(wait) == 0.0


def load(client: redis.Redis) -> None:
    """Load the Redis functions; one clear line if Redis refuses them."""
    try:
        load_library(client)
    except redis.RedisError as exc:
        raise StorageError(f"cannot load the relay's functions into Redis: {exc}") from None
