"""The worker's own duties, with stub sockets: closing a connection exactly once.

(Here, not in ``tests/unit``: a Worker owns a selector and a wake-up socketpair.)
"""

from __future__ import annotations

import os
from typing import Any

from securechat.core import dh, wire
from securechat.relay.conn import CLOSED, Conn
from securechat.relay.context import RelayContext
from securechat.relay.limits import RelayConfig
from securechat.relay.router import Router
from securechat.relay.worker import Worker

from relay_memory import MemoryStore


class ResetSocket:
    """A peer that reset the connection: every write fails."""

    def send(self, data: bytes) -> int:
        raise ConnectionResetError(104, "Connection reset by peer")

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


class PlainNoise:
    """The link after its handshake, without the encryption (what is written is what fails)."""

    buffered = 0

    def send(self, plain: bytes) -> bytes:
        return plain


def _worker() -> Worker:
    config = RelayConfig()
    store = MemoryStore(lambda mailbox: None)
    ctx = RelayContext(config, Router(), store, os.urandom(32))  # type: ignore[arg-type]
    return Worker(0, ctx)


def _open_conn(worker: Worker, ip: str) -> Conn:
    def make() -> Conn:
        sock: Any = ResetSocket()
        noise: Any = PlainNoise()
        return Conn(worker, sock, (ip, 5000), "10.0.0.0/24", 0.0, worker.ctx.config, noise)

    conn, reason, _ = worker.ctx.admission.admit(ip, "10.0.0.0/24", 0.0, make)
    assert conn is not None, reason
    assert conn.authenticate(dh.public_key(os.urandom(32)), b"")
    worker.conns.add(conn)
    worker.delivery.opened(conn)
    return conn


def test_a_close_whose_error_frame_cannot_be_written_releases_the_connection_once() -> None:
    """It used to close the connection inside close() and then go on: its admission slot
    was released twice, so the relay's connection counts drifted below the truth."""
    worker = _worker()
    admission = worker.ctx.admission
    conns = [_open_conn(worker, "10.0.0.1"), _open_conn(worker, "10.0.0.2")]
    assert admission.total == 2
    worker.close(conns[0], "rate limit exceeded (bytes)", (wire.RATE_LIMITED, wire.NO_ID))
    assert conns[0].state == CLOSED and admission.total == 1


def test_shutdown_closes_every_connection_even_when_their_writes_fail() -> None:
    worker = _worker()
    conns = [_open_conn(worker, f"10.0.0.{n}") for n in range(1, 4)]
    worker.shutdown()
    assert all(conn.state == CLOSED for conn in conns)
    assert worker.ctx.admission.total == 0 and not worker.conns
