"""Relay configuration with named defaults, and the per-connection token bucket.

Every limit is a ``Final`` default here and a field of :class:`RelayConfig`,
so the command line, the tests and the benchmark can tighten or loosen them
in one place. Sizes fixed by the protocol live in :mod:`securechat.wire`.
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
LISTEN_BACKLOG: Final = 4096

# --- connection admission and hostile peers ------------------------------------------------
DEFAULT_MAX_CONNECTIONS: Final = 12_000
DEFAULT_MAX_PER_IP: Final = 256  # a household behind one NAT; benchmarks raise it
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
DEFAULT_IDLE_TIMEOUT_S: Final = 300.0  # a Ping from the client resets it
DEFAULT_RATE_FRAMES: Final = 20_000.0  # frames per second, sustained
DEFAULT_BURST_FRAMES: Final = 40_000.0
DEFAULT_RATE_BYTES: Final = 64.0 * 1024 * 1024  # bytes per second, sustained
DEFAULT_BURST_BYTES: Final = 64.0 * 1024 * 1024

# --- buffers ---------------------------------------------------------------------------------
OUT_HIGH_WATER: Final = 1024 * 1024  # above this a receiver is "stalled": spill to the store
OUT_LOW_WATER: Final = 256 * 1024  # below this, stored frames are fetched again
OUT_HARD_LIMIT: Final = 8 * 1024 * 1024  # a peer that lets this much pile up is dropped
MAX_INFLIGHT: Final = 4096  # live deliveries awaiting an Ack, per connection
# Bytes queued for output over all of one worker's connections: above this, new
# copies go to the store rather than to memory (a burst to many stalled readers).
WORKER_HIGH_WATER: Final = 16 * 1024 * 1024
# Payload bytes waiting in the store thread's queue: above the high mark workers stop
# reading their clients (the bytes wait in the kernel) until it is below the low mark.
STORE_HIGH_WATER: Final = 4 * 1024 * 1024
STORE_LOW_WATER: Final = 1 * 1024 * 1024
# Payload delivered live and not yet acknowledged, over all of one worker's connections:
# above this, a reader that stopped reading counts as stalled without the usual quarter
# second's grace (handlers._stalled), so its new copies go to the store. Readers that are
# acking are never affected (a direct 4 KiB load keeps far more than this in flight).
WORKER_INFLIGHT_HIGH_WATER: Final = 16 * 1024 * 1024

# --- delivery and store --------------------------------------------------------------------
DEFAULT_ACK_TIMEOUT_S: Final = 3.0  # live delivery not acked by then: persist it
DEFAULT_QUOTA_FRAMES: Final = 10_000  # per mailbox
DEFAULT_QUOTA_BYTES: Final = 64 * 1024 * 1024  # per mailbox
DEFAULT_TTL_S: Final = 14 * 24 * 3600.0
DEFAULT_PURGE_INTERVAL_S: Final = 60.0
FETCH_BATCH: Final = 256  # stored frames per fetch from the store
FETCH_BYTES: Final = 128 * 1024  # payload bytes per fetch (100 readers catching up at once)
STORE_BATCH: Final = 4096  # requests per transaction (group commit)
RECENTLY_ACKED: Final = 20_000  # remembered acked (mailbox, sender, id) for idempotent retries
MAX_STORED_OTKS: Final = 200  # one-time prekeys kept per identity
TICK_S: Final = 0.1  # timer resolution of the worker loops


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything a relay run needs; built by ``server.config_from_args``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    workers: int = DEFAULT_WORKERS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_per_ip: int = DEFAULT_MAX_PER_IP
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    rate_frames: float = DEFAULT_RATE_FRAMES
    burst_frames: float = DEFAULT_BURST_FRAMES
    rate_bytes: float = DEFAULT_RATE_BYTES
    burst_bytes: float = DEFAULT_BURST_BYTES
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S
    quota_frames: int = DEFAULT_QUOTA_FRAMES
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    ttl: float = DEFAULT_TTL_S
    purge_interval: float = DEFAULT_PURGE_INTERVAL_S
    out_high_water: int = OUT_HIGH_WATER
    out_low_water: int = OUT_LOW_WATER
    worker_high_water: int = WORKER_HIGH_WATER
    store_high_water: int = STORE_HIGH_WATER
    store_low_water: int = STORE_LOW_WATER
    worker_inflight_high_water: int = WORKER_INFLIGHT_HIGH_WATER
    sync_full: bool = True  # SQLite synchronous=FULL (else NORMAL)
    store_max_bytes: int = 0  # 0: no cap; else PRAGMA max_page_count (disk-full behaviour)


class TokenBucket:
    """Classic token bucket; the caller passes the clock (seconds).

    ``take`` answers whether ``cost`` tokens were available; a refused take
    leaves the bucket as it was so that the decision is repeatable.
    """

    __slots__ = ("_last", "_rate", "_size", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._size = burst
        self._tokens = burst
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
