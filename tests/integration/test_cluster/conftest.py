"""Fixtures: a Redis server, and three relay nodes sharing it (helpers in ``nodes.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_cluster.nodes import Cluster, RedisServer, redis_available


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_available()
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Cluster]:
    """Three relay nodes on one Redis (heartbeats are per second: give peers a moment)."""
    c = Cluster(tmp_path, redis_server, "--ack-timeout", "2")
    try:
        for _ in range(3):
            c.start_node()
        time.sleep(1.2)  # every node has heard every other's heartbeat
        yield c
    finally:
        logs = c.stop()
        for text in logs:
            assert "Traceback" not in text, text[-3000:]
