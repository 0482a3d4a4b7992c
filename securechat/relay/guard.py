"""Budgets that outlive a connection: admission, per-prefix and per-identity rate limits.

Why shared tables: a per-connection limit resets on every reconnect, and a throwaway
identity or a fresh TCP connection costs an attacker nothing. What an attacker cannot
multiply cheaply is the network it sends from, so every budget here is kept per
*prefix* (the sender's /24 for IPv4, /64 for IPv6) and, for authenticated work, per
identity as well. Each table is bounded (least recently used entries are forgotten;
a forgotten bucket comes back full, which only ever favours the client).

Three parts, all thread-safe (one lock each; none of them is on the Send/Ack path):

* :func:`prefix_of`: the network key of an address.
* :class:`Budgets`: token buckets for the frame types that cost the relay a store
  transaction or a fan-out of replies (FetchPrekeys, PresenceSubscribe,
  PublishPrekeys), for InviteJoin (each a guess that consumes someone's invite),
  and for handing out one-time prekeys per target identity.
* :class:`Admission`: connection slots: a global cap, per address and per prefix
  caps, a per-prefix accept rate, and a small separate cap for unfinished
  handshakes in which the oldest is evicted to make room for a newcomer.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from enum import Enum
from typing import Final, Generic, TypeVar

from securechat.relay.limits import (
    BUCKET_TABLE_SIZE,
    IPV4_PREFIX_BITS,
    IPV6_PREFIX_BITS,
    RelayConfig,
    TokenBucket,
)

_SECONDS_PER_HOUR: Final = 3600.0


class Budget(str, Enum):
    """The frame types with a shared cost: each has a budget per identity and per prefix."""

    FETCH = "fetch"  # FetchPrekeys
    SUBSCRIBE = "subscribe"  # PresenceSubscribe (1 + keys/16)
    PUBLISH = "publish"  # PublishPrekeys
    JOIN = "join"  # InviteJoin: a guess at someone's nameplate (relay/rendezvous.py)


def prefix_of(ip: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) network of ``ip`` as text; IPv4-mapped IPv6 as IPv4.

    Anything unparsable (a Unix socket path, say) is its own prefix. The common case,
    a dotted IPv4 address from the kernel, takes a string split (8 us -> 0.3 us a
    connection: handshakes per second count).
    """
    if ip.count(".") == 3 and ":" not in ip:
        return ip.rpartition(".")[0] + ".0/24"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bits = IPV4_PREFIX_BITS if addr.version == 4 else IPV6_PREFIX_BITS
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


K = TypeVar("K", bound=Hashable)


class BucketTable(Generic[K]):
    """Token buckets by key, at most ``size`` of them (least recently used forgotten).

    Not locked: the owner (:class:`Budgets`, :class:`Admission`) holds its lock.
    """

    __slots__ = ("_buckets", "_burst", "_rate", "_size")

    def __init__(self, rate: float, burst: float, size: int = BUCKET_TABLE_SIZE) -> None:
        self._rate = rate
        self._burst = burst
        self._size = size
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()

    @property
    def burst(self) -> float:
        return self._burst

    def get(self, key: K, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._size:
                self._buckets.popitem(last=False)
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, now)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


class Budgets:
    """Shared budgets of the expensive frame types, per identity and per prefix."""

    def __init__(self, config: RelayConfig, size: int = BUCKET_TABLE_SIZE) -> None:
        f = config.prefix_factor
        self._lock = threading.Lock()
        rates = {
            Budget.FETCH: (config.fetch_rate, config.fetch_burst),
            Budget.SUBSCRIBE: (config.subscribe_rate, config.subscribe_burst),
            Budget.PUBLISH: (config.publish_rate, config.publish_burst),
            Budget.JOIN: (config.invite_join_rate, config.invite_join_burst),
        }
        self._identity: dict[Budget, BucketTable[bytes]] = {
            kind: BucketTable(rate, burst, size) for kind, (rate, burst) in rates.items()
        }
        self._prefix: dict[Budget, BucketTable[str]] = {
            kind: BucketTable(rate * f, burst * f, size) for kind, (rate, burst) in rates.items()
        }
        self._otk: BucketTable[bytes] = BucketTable(
            config.otk_per_hour / _SECONDS_PER_HOUR, config.otk_burst, size
        )

    def charge(self, kind: Budget, identity: bytes, prefix: str, cost: float, now: float) -> float:
        """Take ``cost`` from the identity's and the prefix's bucket of ``kind``.

        Returns 0.0 when taken; otherwise the seconds until both could pay, and
        nothing is taken (the caller holds the frame and asks again then). A cost
        above a bucket's size is charged as the full bucket, so it can always pass.
        """
        ident_table = self._identity[kind]
        prefix_table = self._prefix[kind]
        with self._lock:
            a = ident_table.get(identity, now)
            b = prefix_table.get(prefix, now)
            cost_a = min(cost, ident_table.burst)
            cost_b = min(cost, prefix_table.burst)
            wait = max(a.wait(cost_a, now), b.wait(cost_b, now))
            if wait > 0.0:
                return wait
            a.take(cost_a, now)
            b.take(cost_b, now)
            return 0.0

    def take_one_time_prekey(self, target: bytes, now: float) -> bool:
        """May one more of ``target``'s one-time prekeys be handed out now? (takes it)"""
        with self._lock:
            return self._otk.get(target, now).take(1.0, now)


class Admission(Generic[K]):
    """Connection slots. ``K`` is the connection object (only hashed and handed back).

    Rules, in order, for a new TCP connection from ``ip`` in ``prefix``:

    1. the prefix's accept rate (a token bucket) must allow it;
    2. per address and per prefix caps on open connections;
    3. unfinished handshakes: at most ``max_handshakes_per_prefix`` per prefix (the
       newcomer is refused) and ``max_handshakes`` in all: then the *oldest* unfinished
       one of the prefix that holds the most of them is evicted to make room. A flood
       of half-open connections cannot keep an honest client out, it only churns
       through its own slots; and an honest client's handshake (one round trip, from
       a network holding one or two) is not the one evicted, however fast attackers
       on many networks churn (the globally oldest would be, within ~0.1 s);
    4. the global cap: when full, an unfinished handshake is evicted the same way,
       and if there is none the newcomer is refused.

    ``admit`` returns a refusal reason (or None) and the connections to evict; the
    caller closes those on their own threads. ``handshake_done`` and ``release``
    keep the counts (safe to call for an evicted connection).
    """

    def __init__(self, config: RelayConfig, size: int = BUCKET_TABLE_SIZE) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._accepts: BucketTable[str] = BucketTable(config.accept_rate, config.accept_burst, size)
        self.total = 0
        self._per_ip: dict[str, int] = {}
        self._per_prefix: dict[str, int] = {}
        # unfinished handshakes: per prefix, oldest first
        self._half_open: dict[str, OrderedDict[K, None]] = {}
        self._half_of: dict[K, str] = {}
        self.refused: dict[str, int] = {}  # reason -> count since last report
        self.evicted = 0

    @property
    def handshakes(self) -> int:
        return len(self._half_of)

    def admit(
        self, ip: str, prefix: str, now: float, make: Callable[[], K]
    ) -> tuple[K | None, str | None, list[K]]:
        """(the new connection, made by ``make`` only when admitted, or None; the refusal
        reason; connections to evict). A refusal costs no connection object: under a
        flood of connection attempts the relay does as little as it can per attempt."""
        cfg = self._config
        with self._lock:
            reason = None
            if not self._accepts.get(prefix, now).take(1.0, now):
                reason = "accept rate of its network"
            elif self._per_ip.get(ip, 0) >= cfg.max_per_ip:
                reason = "connections from its address"
            elif self._per_prefix.get(prefix, 0) >= cfg.max_per_prefix:
                reason = "connections from its network"
            elif len(self._half_open.get(prefix, ())) >= cfg.max_handshakes_per_prefix:
                reason = "unfinished handshakes from its network"
            victims: list[K] = []
            if reason is None:
                over = len(self._half_of) + 1 - cfg.max_handshakes
                over = max(over, self.total + 1 - cfg.max_connections)
                while over > 0 and self._half_of:
                    victims.append(self._evict())
                    over -= 1
                if over > 0:
                    reason = "connection cap"
            if reason is not None:
                self.refused[reason] = self.refused.get(reason, 0) + 1
                return None, reason, victims
            conn = make()
            self.total += 1
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
            self._half_open.setdefault(prefix, OrderedDict())[conn] = None
            self._half_of[conn] = prefix
            return conn, None, victims

    def _evict(self) -> K:
        """The oldest unfinished handshake of the prefix holding the most of them."""
        prefix = max(self._half_open, key=lambda p: len(self._half_open[p]))
        conn = next(iter(self._half_open[prefix]))
        self._forget_half_open(conn)
        self.evicted += 1
        return conn

    def _forget_half_open(self, conn: K) -> None:
        prefix = self._half_of.pop(conn, None)
        if prefix is None:
            return
        queue = self._half_open[prefix]
        del queue[conn]
        if not queue:
            del self._half_open[prefix]

    def handshake_done(self, conn: K) -> None:
        with self._lock:
            self._forget_half_open(conn)

    def release(self, conn: K, ip: str, prefix: str) -> None:
        with self._lock:
            self._forget_half_open(conn)
            self.total -= 1
            _decrement(self._per_ip, ip)
            _decrement(self._per_prefix, prefix)

    def take_report(self) -> tuple[dict[str, int], int]:
        """Refusals by reason and evictions since the last call (for one log line)."""
        with self._lock:
            refused, self.refused = self.refused, {}
            evicted, self.evicted = self.evicted, 0
        return refused, evicted


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class PartialBytes(Generic[K]):
    """Bytes held for partially received records and frames, over every connection.

    A peer that starts a 1 MiB frame and stops makes us hold it. Bounds: per prefix
    (the connection that pushes its prefix over is closed: that network is the one
    holding memory) and in all (the connections holding a partial frame the longest
    are closed first; an honest client's frame is in flight for milliseconds, an
    attacker's for as long as it can make it last). Time is bounded separately by the
    frame deadline (``--frame-timeout``).
    """

    def __init__(self, total: int, per_prefix: int) -> None:
        self._limit = total
        self._prefix_limit = per_prefix
        self._lock = threading.Lock()
        self._held: OrderedDict[K, tuple[str, int]] = OrderedDict()  # oldest first
        self._per_prefix: dict[str, int] = {}
        self.total = 0

    def update(self, conn: K, prefix: str, size: int) -> tuple[bool, list[K]]:
        """Record that ``conn`` now holds ``size`` partial bytes (0: none).

        Returns (within its prefix's limit, connections to close to stay in budget).
        """
        with self._lock:
            old = self._held.get(conn)
            if old is not None:
                self.total -= old[1]
                _subtract(self._per_prefix, old[0], old[1])
            if size <= 0:
                self._held.pop(conn, None)
                return True, []
            used = self._per_prefix.get(prefix, 0) + size
            if used > self._prefix_limit:
                self._held.pop(conn, None)
                return False, []
            self._per_prefix[prefix] = used
            self.total += size
            self._held[conn] = (prefix, size)  # a known key keeps its place (when it started)
            victims: list[K] = []
            while self.total > self._limit and self._held:
                victim, (vprefix, vsize) = self._held.popitem(last=False)
                self.total -= vsize
                _subtract(self._per_prefix, vprefix, vsize)
                victims.append(victim)
            return True, victims

    def forget(self, conn: K) -> None:
        self.update(conn, "", 0)


def _subtract(counts: dict[str, int], key: str, amount: int) -> None:
    left = counts.get(key, 0) - amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
