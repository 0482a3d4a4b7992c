"""Relay configuration with named defaults, and the per-connection token bucket.

Every limit is a ``Final`` default here and a field of :class:`RelayConfig`,
so the command line, the tests and the benchmark can tighten or loosen them
in one place. Sizes fixed by the protocol live in :mod:`securechat.core.wire`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

# --- network --------------------------------------------------------------------------------
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 5050
DEFAULT_DATA_DIR: Final = "relay-data"
DEFAULT_WORKERS: Final = 1  # I/O worker threads, each a selectors loop (see docs/performance.md)
RECV_SIZE: Final = 256 * 1024  # one recv() per readable event
# Bytes of frames decoded per connection per loop turn (the rest waits, undecoded), so
# that frames held for a shared budget stay bounded and what arrives behind them waits as
# compact bytes. One read's worth: at 64 KiB a busy sender's reads were split over turns
# and the relay spent 11% more CPU per delivery (bench.ab direct, paired).
DECODE_LIMIT: Final = RECV_SIZE
LISTEN_BACKLOG: Final = 4096

# --- connection admission and hostile peers ------------------------------------------------
# A "prefix" is the sender's /24 (IPv4) or /64 (IPv6): what one household, one cloud host or
# one attacker usually controls. Shared budgets are keyed by it (see ``guard.py``).
IPV4_PREFIX_BITS: Final = 24
IPV6_PREFIX_BITS: Final = 64
DEFAULT_MAX_CONNECTIONS: Final = 12_000
DEFAULT_MAX_PER_IP: Final = 256  # a household behind one NAT; benchmarks raise it
DEFAULT_MAX_PER_PREFIX: Final = 1024  # a provider's /24 (or /64)
# Unfinished handshakes cost a slot and a little memory and prove nothing: a small separate
# cap (the oldest of the prefix holding the most is closed to make room for a newcomer)
# and a short deadline.
DEFAULT_MAX_HANDSHAKES: Final = 256
DEFAULT_MAX_HANDSHAKES_PER_PREFIX: Final = 32  # beyond it the newcomer is refused
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 5.0
DEFAULT_ACCEPT_RATE: Final = 50.0  # new connections per second per prefix, sustained
DEFAULT_ACCEPT_BURST: Final = 200.0
DEFAULT_IDLE_TIMEOUT_S: Final = 300.0  # a Ping from the client resets it
DEFAULT_RATE_FRAMES: Final = 20_000.0  # frame cost per second per connection, sustained
DEFAULT_BURST_FRAMES: Final = 40_000.0
DEFAULT_RATE_BYTES: Final = 64.0 * 1024 * 1024  # bytes per second, sustained
DEFAULT_BURST_BYTES: Final = 64.0 * 1024 * 1024
# Per-connection frame cost of an Ack grows with its entries (each is decoded and looked
# up: about a frame's work per 4): an Ack of n entries costs 1 + n // ACK_ENTRIES_PER_COST.
ACK_ENTRIES_PER_COST: Final = 4
# A new connection starts with this much of its frame budget and earns the rest at
# --rate-frames: reconnecting must not buy a fresh burst (an honest client's first
# second, its outbox resent, needs far less).
INITIAL_FRAME_ALLOWANCE: Final = 2_000.0

# --- partially received frames (memory an unauthenticated or slow peer makes us hold) ------
DEFAULT_PARTIAL_BYTES: Final = 64 * 1024 * 1024  # all connections together
DEFAULT_PARTIAL_BYTES_PER_PREFIX: Final = 8 * 1024 * 1024
DEFAULT_FRAME_TIMEOUT_S: Final = 20.0  # a started frame must be complete within this

# --- expensive frame types: shared budgets per identity and per prefix ----------------------
# These frames cost the relay a store transaction or a fan-out of replies, so besides the
# per-connection frame budget each has a token bucket per identity and one per prefix,
# kept in bounded tables that outlive connections (a reconnect does not refill them).
# A frame over budget is not refused: the connection is not read until the budget
# allows it (the bytes wait in the kernel), so an honest burst is only slowed.
DEFAULT_FETCH_RATE: Final = 10.0  # FetchPrekeys per second per identity, sustained
DEFAULT_FETCH_BURST: Final = 100.0  # a 64-member group fetches 63 bundles at once
DEFAULT_SUBSCRIBE_RATE: Final = 10.0  # PresenceSubscribe cost per second per identity
DEFAULT_SUBSCRIBE_BURST: Final = 40.0
SUBSCRIBE_KEYS_PER_COST: Final = 16  # a subscribe of n keys costs 1 + n // 16
DEFAULT_PUBLISH_RATE: Final = 0.2  # PublishPrekeys that change something, per s per identity
DEFAULT_PUBLISH_BURST: Final = 10.0
DEFAULT_PREFIX_FACTOR: Final = 4.0  # a prefix's budget = this x an identity's budget
# One-time prekeys handed out per target identity (beyond: the bundle without one, never
# "no bundle"), so one requester cannot drain someone's one-time prekeys.
DEFAULT_OTK_PER_HOUR: Final = 64.0
DEFAULT_OTK_BURST: Final = 64.0
# The owner is sent PrekeyCount when a hand-out takes its count below one of these marks
# (below 20: the count at which clients replenish; below 1: none left).
PREKEY_LOW_MARKS: Final = (20, 5, 1)
BUCKET_TABLE_SIZE: Final = 16_384  # identities or prefixes per budget table (~250 bytes each)
HOLD_MAX_S: Final = 5.0  # longest a held frame waits before its budget is checked again

# --- invites (the rendezvous of `securechat invite` / `accept`, protocol section 7) ---------
# In memory only: an open invite is a nameplate bound to its opener's connection (<750
# bytes), gone when either party leaves, after the exchange, or after its time to live.
DEFAULT_INVITE_TTL_S: Final = 600.0  # an invite not completed in 10 minutes is closed
DEFAULT_INVITE_MAX_OPEN: Final = 16_384  # open invites, all clients (~12 MB at most)
DEFAULT_INVITE_MAX_OPEN_PER_PREFIX: Final = 32  # per /24 or /64: a household opens one or two
DEFAULT_INVITE_MAX_OPEN_PER_IDENTITY: Final = 2  # per connection identity
# Joins are guesses at someone's nameplate: each consumes an invite, so they are a budget
# kept per identity and per prefix (x --prefix-factor) that survives reconnects.
DEFAULT_INVITE_JOIN_RATE: Final = 0.05  # InviteJoin per second per identity (3 a minute)
DEFAULT_INVITE_JOIN_BURST: Final = 5.0
# InviteData a party may send in one invite (the exchange needs exactly 2: PAKE, identity);
# a third closes the invite for both. Its size is bounded by wire.MAX_INVITE_DATA.
INVITE_MESSAGES_PER_PARTY: Final = 2

# --- buffers ---------------------------------------------------------------------------------
OUT_HIGH_WATER: Final = 1024 * 1024  # above this a receiver is "stalled": spill to the store
OUT_LOW_WATER: Final = 256 * 1024  # below this, stored frames are fetched again
OUT_HARD_LIMIT: Final = 8 * 1024 * 1024  # a peer that lets this much pile up is dropped
MAX_INFLIGHT: Final = 4096  # live deliveries awaiting an Ack, per connection
# Bytes queued for output over all of one worker's connections: above this, new
# copies go to the store rather than to memory (a burst to many stalled readers).
WORKER_HIGH_WATER: Final = 16 * 1024 * 1024
# Cost (payload bytes + STORE_REQUEST_COST each) of the requests waiting in the store
# thread's queue: above the high mark workers stop reading their clients (the bytes wait
# in the kernel) until it is below the low mark. (8 MiB since requests without payload
# count too: at 4 MiB twenty senders' windows of stored messages paused everyone.)
STORE_HIGH_WATER: Final = 8 * 1024 * 1024
STORE_LOW_WATER: Final = 2 * 1024 * 1024
STORE_REQUEST_COST: Final = 512  # what a request without payload counts (a DELETE, a fetch)
# Cost of the store requests one connection may have outstanding (1,024 without payload,
# or 8 of 64 KiB); beyond it that connection is not read until half of it is done. Well
# under STORE_HIGH_WATER, so that one flooding sender is stopped before the store's queue
# is long enough to stop everyone.
MAX_CONN_STORE_COST: Final = 512 * 1024
# Payload delivered live and not yet acknowledged, over all of one worker's connections:
# above this, a reader that stopped reading counts as stalled without the usual quarter
# second's grace (handlers._stalled), so its new copies go to the store. Readers that are
# acking are never affected (a direct 4 KiB load keeps far more than this in flight).
WORKER_INFLIGHT_HIGH_WATER: Final = 16 * 1024 * 1024

# --- delivery and store --------------------------------------------------------------------
DEFAULT_ACK_TIMEOUT_S: Final = 3.0  # live delivery not acked by then: persist it
DEFAULT_QUOTA_FRAMES: Final = 10_000  # per mailbox
DEFAULT_QUOTA_BYTES: Final = 64 * 1024 * 1024  # per mailbox
DEFAULT_SENDER_QUOTA_BYTES: Final = 64 * 1024 * 1024  # stored from one identity, all mailboxes
DEFAULT_PREFIX_QUOTA_BYTES: Final = 256 * 1024 * 1024  # stored from one address prefix
# A mailbox whose identity never connected (any 32 bytes is a valid address): small
# quota, short lifetime. Its frames get the full ttl once the identity connects.
DEFAULT_UNKNOWN_QUOTA_FRAMES: Final = 200
DEFAULT_UNKNOWN_QUOTA_BYTES: Final = 1024 * 1024
DEFAULT_UNKNOWN_TTL_S: Final = 24 * 3600.0
DEFAULT_STORE_MAX_BYTES: Final = 1024 * 1024 * 1024  # 0 = no cap
# New frames are refused once the stored payload (+ STORE_ROW_OVERHEAD per frame) reaches
# this share of --store-max-bytes, well before SQLite's own page limit (disk-full path).
STORE_FILL_RATIO: Final = 0.75
STORE_ROW_OVERHEAD: Final = 128  # index entries and row header per stored frame, about
DEFAULT_TTL_S: Final = 14 * 24 * 3600.0
DEFAULT_PURGE_INTERVAL_S: Final = 60.0
FETCH_BATCH: Final = 256  # stored frames per fetch from the store
FETCH_BYTES: Final = 128 * 1024  # payload bytes per fetch (100 readers catching up at once)
STORE_BATCH: Final = 4096  # requests per transaction (group commit)
RECENTLY_ACKED: Final = 20_000  # remembered acked (mailbox, sender, id) for idempotent retries
MAX_STORED_OTKS: Final = 200  # one-time prekeys kept per identity
KNOWN_MAILBOX_CACHE: Final = 1 << 17  # known mailboxes kept in memory (the rest: one look-up)
TICK_S: Final = 0.1  # timer resolution of the worker loops
REDIS_PASSWORD_ENV: Final = "SECURECHAT_REDIS_PASSWORD"  # noqa: S105 - a variable's name
DEFAULT_METRICS_INTERVAL_S: Final = 60.0  # one metrics line per node this often (0: never)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything a relay run needs; built by ``server.config_from_args``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    workers: int = DEFAULT_WORKERS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_ip: int = DEFAULT_MAX_PER_IP
    max_per_prefix: int = DEFAULT_MAX_PER_PREFIX
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_handshakes_per_prefix: int = DEFAULT_MAX_HANDSHAKES_PER_PREFIX
    accept_rate: float = DEFAULT_ACCEPT_RATE
    accept_burst: float = DEFAULT_ACCEPT_BURST
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    rate_frames: float = DEFAULT_RATE_FRAMES
    burst_frames: float = DEFAULT_BURST_FRAMES
    rate_bytes: float = DEFAULT_RATE_BYTES
    burst_bytes: float = DEFAULT_BURST_BYTES
    partial_bytes: int = DEFAULT_PARTIAL_BYTES
    partial_bytes_per_prefix: int = DEFAULT_PARTIAL_BYTES_PER_PREFIX
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT_S
    fetch_rate: float = DEFAULT_FETCH_RATE
    fetch_burst: float = DEFAULT_FETCH_BURST
    subscribe_rate: float = DEFAULT_SUBSCRIBE_RATE
    subscribe_burst: float = DEFAULT_SUBSCRIBE_BURST
    publish_rate: float = DEFAULT_PUBLISH_RATE
    publish_burst: float = DEFAULT_PUBLISH_BURST
    prefix_factor: float = DEFAULT_PREFIX_FACTOR
    otk_per_hour: float = DEFAULT_OTK_PER_HOUR
    otk_burst: float = DEFAULT_OTK_BURST
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S
    quota_frames: int = DEFAULT_QUOTA_FRAMES
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    sender_quota_bytes: int = DEFAULT_SENDER_QUOTA_BYTES
    prefix_quota_bytes: int = DEFAULT_PREFIX_QUOTA_BYTES
    unknown_quota_frames: int = DEFAULT_UNKNOWN_QUOTA_FRAMES
    unknown_quota_bytes: int = DEFAULT_UNKNOWN_QUOTA_BYTES
    unknown_ttl: float = DEFAULT_UNKNOWN_TTL_S
    ttl: float = DEFAULT_TTL_S
    purge_interval: float = DEFAULT_PURGE_INTERVAL_S
    out_high_water: int = OUT_HIGH_WATER
    out_low_water: int = OUT_LOW_WATER
    worker_high_water: int = WORKER_HIGH_WATER
    store_high_water: int = STORE_HIGH_WATER
    store_low_water: int = STORE_LOW_WATER
    worker_inflight_high_water: int = WORKER_INFLIGHT_HIGH_WATER
    sync_full: bool = True  # SQLite synchronous=FULL (else NORMAL)
    # 0: no cap; else new frames are refused at STORE_FILL_RATIO of it, and SQLite's
    # max_page_count stops the file at it (disk-full behaviour).
    store_max_bytes: int = DEFAULT_STORE_MAX_BYTES
    invite_ttl: float = DEFAULT_INVITE_TTL_S
    invite_max_open: int = DEFAULT_INVITE_MAX_OPEN
    invite_max_open_per_prefix: int = DEFAULT_INVITE_MAX_OPEN_PER_PREFIX
    invite_max_open_per_identity: int = DEFAULT_INVITE_MAX_OPEN_PER_IDENTITY
    invite_join_rate: float = DEFAULT_INVITE_JOIN_RATE
    invite_join_burst: float = DEFAULT_INVITE_JOIN_BURST
    # Cluster (issue 16): a Redis URL ("" = the embedded SQLite store), the relay key
    # file every node shares, and the per-node metrics line.
    cluster: str = ""
    cluster_allow_unsafe: bool = False
    key_file: Path | None = None
    metrics_interval: float = DEFAULT_METRICS_INTERVAL_S


class TokenBucket:
    """Classic token bucket; the caller passes the clock (seconds).

    ``take`` answers whether ``cost`` tokens were available; a refused take
    leaves the bucket as it was so that the decision is repeatable.
    """

    __slots__ = ("_last", "_rate", "_size", "_tokens")

    def __init__(self, rate: float, burst: float, now: float, initial: float | None = None) -> None:
        self._rate = rate
        self._size = burst
        self._tokens = burst if initial is None else min(initial, burst)
        self._last = now

    def take(self, cost: float, now: float) -> bool:
        tokens = self._tokens + (now - self._last) * self._rate
        if tokens > self._size:
            tokens = self._size
        self._last = now
        if tokens < cost:
            self._tokens = tokens
            return False
        self._tokens = tokens - cost
        return True

    def charge(self, cost: float, now: float) -> float:
        """Take ``cost`` even if it is not there (a debt); return the seconds until the
        balance is back to zero (0.0 if there was enough)."""
        tokens = min(self._tokens + (now - self._last) * self._rate, self._size) - cost
        self._tokens = tokens
        self._last = now
        if tokens >= 0:
            return 0.0
        return -tokens / self._rate if self._rate > 0 else float("inf")

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` tokens are there (0.0: available now); takes nothing."""
        tokens = min(self._tokens + (now - self._last) * self._rate, self._size)
        if tokens >= cost:
            return 0.0
        if self._rate <= 0:
            return float("inf")
        return (cost - tokens) / self._rate

    def full(self, now: float) -> bool:
        """True when the bucket has refilled completely (forgetting it changes nothing)."""
        return self._tokens + (now - self._last) * self._rate >= self._size
