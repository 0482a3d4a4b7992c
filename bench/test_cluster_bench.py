"""The cluster benchmark (``bench/cluster.py``) still runs: a tiny run of each setup.

Speed is not asserted here (figures live in docs/performance.md, measured on a
quiet machine); what is asserted is that every frame was delivered and that the
CPU of the relays and of Redis was counted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cluster.nodes import redis_available

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_cluster_benchmark_runs(tmp_path: Path) -> None:
    redis_available()
    from bench import cluster as bench_cluster

    out = tmp_path / "cluster.json"
    argv = ["--seconds", "1.5", "--pairs", "4", "--rates", "200", "--nodes", "0,2",
            "--out", str(out)]  # fmt: skip
    assert bench_cluster.main(argv) == 0
    single, two = json.loads(out.read_text())
    for setup in (single, two):
        for run in (setup["unpaced"], setup["paced_200"]):
            assert run["delivered_all"] and run["errors"] == 0
            assert run["deliveries_per_s"] > 0 and run["p99_ms"] is not None
    assert two["unpaced"]["redis_us_per_delivery"] > 0  # cross-node: every frame in Redis
    assert single["unpaced"]["redis_us_per_delivery"] == 0
