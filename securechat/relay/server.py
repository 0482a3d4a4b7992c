"""The relay process: start-up, workers, store, clean shutdown, command-line flags.

Start-up order: bind the port (a taken port is one line, and nothing is created),
create and lock the data folder (two relays never share a store), load or create
the key, open the store, start the threads.

Threads: ``--workers`` I/O workers (selector loops, see ``worker.py``; each
also watches the non-blocking listening socket and accepts into its own
loop, subject to the admission rules of ``guard.Admission``), one store thread
(SQLite group commit, see ``store_thread.py``). No thread per connection. The main
thread waits for SIGINT/SIGTERM and logs a summary of refused connections.

Shutdown order: stop accepting; each worker sends ``Error(SERVER_SHUTDOWN)``
and closes its connections, persisting every live delivery not yet
acknowledged; then the store thread drains its queue, commits and closes.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Final

from securechat.core import dh
from securechat.core.encoding import fingerprint
from securechat.errors import InUseError, StorageError, TransportError, UsageError
from securechat.relay import keyfile, limits
from securechat.relay import store as st
from securechat.relay.context import RelayContext
from securechat.relay.limits import LISTEN_BACKLOG, RelayConfig
from securechat.relay.oserrors import describe, map_exceptions
from securechat.relay.router import Router
from securechat.relay.store_thread import StoreThread
from securechat.relay.worker import Worker

log = logging.getLogger("securechat.relay")

GC_YOUNG_THRESHOLD: Final = 50_000  # allocations between young collections (CPython: 700)
LOCK_FILE: Final = "relay.lock"  # held (flock) while a relay uses the data folder
REPORT_INTERVAL_S: Final = 10.0  # refused connections are logged as one line per interval


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket, or one clear error (port taken, not allowed, bad address)."""
    try:
        return socket.create_server((host, port), backlog=LISTEN_BACKLOG, reuse_port=False)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise InUseError(
                f"port {port} on {host} is in use (another relay?); pick another with --port"
            ) from None
        hint = ""
        if exc.errno == errno.EACCES:
            hint = " (ports below 1024 need privileges; pick another with --port)"
        elif exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
            hint = " (no such local address; use --host 0.0.0.0 for every interface)"
        raise TransportError(f"cannot listen on {host}:{port}: {describe(exc)}{hint}") from None


def lock_data_dir(directory: Path) -> IO[str]:
    """Hold ``relay.lock`` in the data folder: two relays must never share one store."""
    keyfile.ensure_dir(directory)
    path = directory / LOCK_FILE
    with map_exceptions({OSError: StorageError}, f"cannot create {path}"):
        handle = open(path, "a+")  # noqa: SIM115 (held for the relay's lifetime)
        os.chmod(path, 0o600)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise InUseError(
            f"another relay is using the data folder {directory} (it holds {LOCK_FILE}); "
            "stop it or pick another folder with --data"
        ) from None
    return handle


class Relay:
    """A relay; ``__init__`` binds its port first (so a taken port creates nothing), then
    locks the data folder and opens the key and the store; ``start()`` starts threads,
    ``stop()`` undoes everything (also after a failed or missing ``start``)."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._started = False
        self._listener = bind_listener(config.host, config.port)
        self._lock_file: IO[str] | None = None
        self._store_db: st.MailboxStore | None = None
        try:
            self._lock_file = lock_data_dir(config.data_dir)
            self.private = keyfile.load_or_create(config.data_dir)
            self._store_db = st.open_store(config.data_dir, config)
        except BaseException:
            self._release()
            raise
        self.public = dh.public_key(self.private)
        self.fingerprint = fingerprint(self.public)
        self.router = Router()
        self.store = StoreThread(self._store_db, config, self._new_rows)
        self._ctx = RelayContext(config, self.router, self.store, self.private)
        self.workers = [Worker(i, self._ctx) for i in range(max(config.workers, 1))]
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._next_report = 0.0

    def start(self) -> None:
        self._listener.setblocking(False)
        self._ctx.listener = self._listener
        self.store.start()
        self._started = True
        for worker in self.workers:
            worker.start()

    def stop(self) -> None:
        """Stop accepting, close every connection (persisting live copies), drain the store."""
        if self._started:
            for worker in self.workers:
                worker.call_soon(worker.shutdown)
            for worker in self.workers:
                worker.join(10.0)
            self._listener.close()
            self.store.stop()  # closes the database
            self._store_db = None
            self._started = False
        self._release()

    def _release(self) -> None:
        self._listener.close()
        if not self._started and self._store_db is not None:
            self._store_db.close()
            self._store_db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def report(self, now: float) -> None:
        """Every REPORT_INTERVAL_S: one line for connections refused meanwhile (not one each)."""
        if now < self._next_report:
            return
        self._next_report = now + REPORT_INTERVAL_S
        refused, evicted = self._ctx.admission.take_report()
        if refused or evicted:
            reasons = ", ".join(f"{n} over the {why}" for why, n in sorted(refused.items()))
            log.warning(
                "in the last %.0f s: refused %d new connections (%s); closed %d unfinished"
                " handshakes to make room",
                REPORT_INTERVAL_S,
                sum(refused.values()),
                reasons or "none",
                evicted,
            )

    def _new_rows(self, mailboxes: set[bytes]) -> None:
        """Store thread: rows were committed; tell each mailbox's connection, if any."""
        online = self.router.online
        for mailbox in mailboxes:
            conn = online.get(mailbox)
            if conn is not None:
                conn.loop.call_soon(conn.loop.delivery.new_rows, conn)


# --- command line ----------------------------------------------------------------------------

# Every tunable limit: (flag, RelayConfig field, type, help). ``--help`` shows each default;
# docs/protocol.md 3.6 and docs/operations.md list the same (tests/test_relay_limits_doc.py).
_LIMIT_FLAGS: Final[tuple[tuple[str, str, type, str], ...]] = (
    ("--workers", "workers", int, "I/O worker threads (selector loops)"),
    ("--max-connections", "max_connections", int, "global connection cap"),
    ("--max-per-ip", "max_per_ip", int, "connections per client address"),
    ("--max-per-prefix", "max_per_prefix", int, "connections per /24 (IPv4) or /64 (IPv6)"),
    (
        "--max-handshakes",
        "max_handshakes",
        int,
        "unfinished handshakes in all (beyond: the oldest of the prefix holding the most"
        " is closed)",
    ),
    (
        "--max-handshakes-per-prefix",
        "max_handshakes_per_prefix",
        int,
        "unfinished handshakes per prefix",
    ),
    ("--accept-rate", "accept_rate", float, "new connections per second per prefix"),
    ("--accept-burst", "accept_burst", float, "new connection burst per prefix"),
    ("--handshake-timeout", "handshake_timeout", float, "seconds to finish the handshake"),
    ("--idle-timeout", "idle_timeout", float, "seconds without a frame before closing"),
    ("--rate-frames", "rate_frames", float, "frame cost per second per connection"),
    ("--burst-frames", "burst_frames", float, "frame cost burst per connection"),
    ("--rate-bytes", "rate_bytes", float, "bytes per second per connection"),
    ("--burst-bytes", "burst_bytes", float, "byte burst per connection"),
    (
        "--partial-bytes",
        "partial_bytes",
        int,
        "bytes of unfinished records and frames, all connections (the oldest are closed)",
    ),
    (
        "--partial-bytes-per-prefix",
        "partial_bytes_per_prefix",
        int,
        "bytes of unfinished records and frames per prefix",
    ),
    ("--frame-timeout", "frame_timeout", float, "seconds to finish a frame once started"),
    ("--fetch-rate", "fetch_rate", float, "FetchPrekeys per second per identity"),
    ("--fetch-burst", "fetch_burst", float, "FetchPrekeys burst per identity"),
    (
        "--subscribe-rate",
        "subscribe_rate",
        float,
        "PresenceSubscribe cost per second per identity (1 + keys/16 each)",
    ),
    ("--subscribe-burst", "subscribe_burst", float, "PresenceSubscribe cost burst per identity"),
    ("--publish-rate", "publish_rate", float, "PublishPrekeys per second per identity"),
    ("--publish-burst", "publish_burst", float, "PublishPrekeys burst per identity"),
    (
        "--prefix-factor",
        "prefix_factor",
        float,
        "a prefix's fetch/subscribe/publish/invite-join budget, as a multiple of an identity's",
    ),
    (
        "--otk-per-hour",
        "otk_per_hour",
        float,
        "one-time prekeys handed out per hour per target identity",
    ),
    ("--otk-burst", "otk_burst", float, "one-time prekey hand-out burst per target identity"),
    ("--ack-timeout", "ack_timeout", float, "seconds before an unacknowledged live copy is stored"),
    ("--quota-frames", "quota_frames", int, "stored frames per mailbox"),
    ("--quota-bytes", "quota_bytes", int, "stored bytes per mailbox"),
    ("--sender-quota-bytes", "sender_quota_bytes", int, "stored bytes per sender identity"),
    ("--prefix-quota-bytes", "prefix_quota_bytes", int, "stored bytes per sender prefix"),
    (
        "--unknown-quota-frames",
        "unknown_quota_frames",
        int,
        "stored frames per mailbox whose identity never connected",
    ),
    (
        "--unknown-quota-bytes",
        "unknown_quota_bytes",
        int,
        "stored bytes per mailbox whose identity never connected",
    ),
    (
        "--unknown-ttl",
        "unknown_ttl",
        float,
        "seconds a frame for a never-connected identity is kept",
    ),
    ("--ttl", "ttl", float, "seconds a stored frame is kept"),
    ("--purge-interval", "purge_interval", float, "seconds between purges of expired frames"),
    (
        "--store-max-bytes",
        "store_max_bytes",
        int,
        "cap on the store (new frames refused at 75%%; 0 = no cap)",
    ),
    ("--invite-ttl", "invite_ttl", float, "seconds an invite (securechat invite) stays open"),
    ("--invite-max-open", "invite_max_open", int, "open invites in all"),
    ("--invite-max-open-per-prefix", "invite_max_open_per_prefix", int, "open invites per prefix"),
    (
        "--invite-max-open-per-identity",
        "invite_max_open_per_identity",
        int,
        "open invites per identity",
    ),
    (
        "--invite-join-rate",
        "invite_join_rate",
        float,
        "invite joins (guesses at a nameplate) per second per identity (prefix: x prefix-factor)",
    ),
    ("--invite-join-burst", "invite_join_burst", float, "invite join burst per identity"),
)
_NON_NEGATIVE: Final = frozenset({"store_max_bytes"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``securechat relay``; pair with :func:`run_relay`. Every default shows."""
    d = RelayConfig()
    a = parser.add_argument
    a(
        "--host",
        default=d.host,
        help="address to listen on; 0.0.0.0 for remote users (default %(default)s)",
    )
    a("--port", type=int, default=d.port, help="TCP port, 0 = any free port (default %(default)s)")
    a(
        "--data",
        default=str(d.data_dir),
        help="folder for the key and the store (default %(default)s)",
    )
    for flag, field, kind, text in _LIMIT_FLAGS:
        a(flag, type=kind, default=getattr(d, field), help=f"{text} (default %(default)s)")
    a(
        "--sync",
        choices=("full", "normal"),
        default="full",
        help="SQLite synchronous mode (default %(default)s)",
    )
    a("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> RelayConfig:
    values: dict[str, Any] = {}
    for flag, field, _kind, _text in _LIMIT_FLAGS:
        value = getattr(args, field)
        if value < 0 or (value == 0 and field not in _NON_NEGATIVE):
            raise UsageError(f"{flag} must be positive")
        values[field] = value
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be between 0 and 65535")
    return RelayConfig(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data),
        sync_full=args.sync == "full",
        **values,
    )


def _setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise UsageError(f"unknown --log-level {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s relay %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(numeric)
    log.propagate = False


def _raise_fd_limit() -> None:
    """10,000 connections need 10,000 descriptors: take the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def _tune_gc() -> None:
    """Fewer garbage collections: each one stops every thread, so it is tail latency.

    Under load the relay holds tens of thousands of short-lived objects (live
    copies waiting for their Ack, frames, closures for the store); with
    CPython's default young threshold (700) they survived collection after
    collection into the old generation, whose full scans then paused the
    relay. Measured on a 5 s unpaced direct run (100 pairs, 2 cores): default
    settings, 1,523 collections, 623 ms in all, longest pause 78 ms; with the
    start-up objects frozen (``gc.freeze``) and a young threshold of 50,000:
    54 collections, 167 ms, longest 28 ms. Reference counting still frees
    every frame at once; only cycles wait for a collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run_relay(args: argparse.Namespace) -> int:
    """``securechat relay``: run until SIGINT/SIGTERM, then shut down cleanly (exit 0)."""
    config = config_from_args(args)
    _setup_logging(args.log_level)
    _raise_fd_limit()
    relay = Relay(config)  # binds first: a taken port is one line and creates nothing
    _tune_gc()
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        relay.start()
        host, port = relay.address
        print(f"securechat relay listening on {host}:{port} key {relay.fingerprint}", flush=True)
        log.info("relay key %s, data in %s", relay.fingerprint, config.data_dir)
        while not stop.wait(0.5):
            relay.report(time.monotonic())
        log.info("shutting down")
    finally:
        relay.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


# Every limit's default, for docs and tests.
DEFAULTS = limits
