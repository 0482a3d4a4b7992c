"""The measurements of issue 7, run side by side on the three systems.

Every run gets a freshly started server (no backlog, store or memory carried
from one workload to the next). Within a repetition the three systems run
the same workload back to back, so ratios are paired: the report quotes the
median of the per-repetition ratios. Anything that fails is recorded with
its reason and the suite goes on.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import driver, micro, redis_runner, servers
from bench import workloads as w
from bench.servers import Server

SYSTEMS = ("securechat", "redis", "naive")
PAIRS = 100  # N: sender->receiver pairs (200 connections)
GROUPS, MEMBERS = 10, 10  # fan-out: 10 senders, each to its own 10 receivers (100 receivers)


@dataclass(frozen=True)
class Plan:
    quick: bool
    reps: int
    seconds: float
    sweep: tuple[int, ...]
    idle_counts: tuple[int, ...]
    burst_frames: int
    handshake_s: float

    @staticmethod
    def make(quick: bool, reps: int | None) -> Plan:
        if quick:
            return Plan(True, reps or 1, 1.5, (), (1000,), 300, 1.2)
        return Plan(
            False,
            reps or 5,
            3.5,
            (5000, 10_000, 20_000, 45_000, 60_000),
            (1000, 5000, 10_000),
            2000,
            3.0,
        )


def percentile(values: list[int], q: float) -> float | None:
    """Nearest-rank percentile in ms of latencies given in ns; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank] / 1e6


def summarize(raw: dict[str, Any], fanout: int = 1) -> dict[str, Any]:
    """The per-run numbers the report uses (raw latency lists dropped)."""
    window = raw["window_s"]
    lat = raw.get("lat", [])
    acc = raw.get("accept_lat", [])
    delivered_win = raw["delivered_win"]
    expected = raw["sent"] * fanout
    return {
        "deliveries_per_s": delivered_win / window,
        "offered_per_s": raw["sent_win"] / window,
        "cpu_us_per_delivery": raw["server_cpu_s"] / delivered_win * 1e6 if delivered_win else None,
        "delivered_fraction": raw["delivered"] / expected if expected else None,
        "sent": raw["sent"],
        "delivered": raw["delivered"],
        "p50_ms": percentile(lat, 0.50),
        "p99_ms": percentile(lat, 0.99),
        "p999_ms": percentile(lat, 0.999),
        "samples": len(lat),
        "accept_per_s": raw.get("acked_win", 0) / window,
        "accepted_stored": raw.get("accepted_stored", 0),
        "accept_p50_ms": percentile(acc, 0.50),
        "accept_p99_ms": percentile(acc, 0.99),
        "server_cpu_util": raw["server_cpu_util"],
        "load_cpu_util_max": raw["load_cpu_util_max"],
        "machine_busy": raw["machine_busy"],
        "other_cores": raw.get("other_cores"),
        "peak_rss_mib": raw["peak_rss_kib"] / 1024,
        "errors": raw.get("errors", 0),
        "client_errors": raw.get("client_errors", [])[:3],
        "dead_connections": raw.get("dead", 0),
        "kill_reasons": raw.get("kill_reasons", {}),
        "last_error": raw.get("last_error", ""),
        "server_alive": raw.get("server_alive", True),
    }


class Suite:
    def __init__(self, plan: Plan, log: Callable[[str], None]) -> None:
        self.plan = plan
        self.log = log
        self.tmp = Path(tempfile.mkdtemp(prefix="securechat-bench-"))
        self.notes: list[str] = []
        self.runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        self.extra: dict[str, Any] = {}
        self.redis_ok = True
        self.versions: dict[str, str] = {}
        self.run_seed = os.urandom(16).hex()

    # --- servers ------------------------------------------------------------------------------
    def start(self, system: str, extra: list[str] | None = None) -> Server | None:
        workdir = Path(tempfile.mkdtemp(dir=self.tmp, prefix=system + "-"))
        if system == "redis":
            if not self.redis_ok:
                return None
            reasons: list[str] = []
            srv = redis_runner.start(workdir, reasons)
            if srv is None:
                self.redis_ok = False
                self.notes.extend(reasons)
                self.log("Redis unavailable: " + "; ".join(reasons))
            else:
                self.versions["redis"] = srv.version
            return srv
        if system == "naive":
            return servers.start_naive(workdir)
        return servers.start_securechat(workdir, extra)

    def measure(
        self,
        key: str,
        system: str,
        wl: driver.Workload,
        fanout: int = 1,
        extra: list[str] | None = None,
    ) -> dict[str, Any] | None:
        """One fresh server, one workload; the summary is appended to ``runs[key][system]``."""
        srv = None
        try:
            srv = self.start(system, extra)
            if srv is None:
                return None
            raw = driver.run(srv, wl, {"system": system, "run_seed": self.run_seed})
            result = summarize(raw, fanout)
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
            self.log(traceback.format_exc(limit=3))
        finally:
            if srv is not None:
                srv.stop()
        self.runs.setdefault(key, {}).setdefault(system, []).append(result)
        self.log(f"  {key:<14} {system:<10} {_brief(result)}")
        return result

    # --- workloads --------------------------------------------------------------------------
    def repetition(self) -> None:
        s = self.plan.seconds
        for system in SYSTEMS:
            self.measure("direct_256", system, w.throughput(PAIRS, 256, s))
        for system in SYSTEMS:
            self.measure("direct_4096", system, w.throughput(PAIRS, 4096, s))
        for system in SYSTEMS:
            self.measure("group_256", system, w.fanout(GROUPS, MEMBERS, 256, s), fanout=MEMBERS)
        for rate in (2000, 30_000):
            for system in SYSTEMS:
                self.measure(f"paced_{rate}", system, w.paced(PAIRS, 256, rate, s))

    def sweep(self) -> None:
        for rate in self.plan.sweep:
            for system in SYSTEMS:
                self.measure(f"paced_{rate}", system, w.paced(PAIRS, 256, rate, self.plan.seconds))

    def idle(self) -> None:
        for count in self.plan.idle_counts:
            for system in SYSTEMS:
                self.extra.setdefault(f"idle_{count}", {})[system] = self._idle(system, count)

    def _idle(self, system: str, count: int) -> dict[str, Any]:
        srv = None
        handle = None
        try:
            srv = self.start(system)
            if srv is None:
                return {"failed": "unavailable"}
            time.sleep(0.3)
            from bench import procfs

            before = procfs.rss_kib(srv.pid)
            wl = driver.Workload("idle", w.idle(count), {"size": 256, "connect_concurrency": 256})
            handle = driver.run(srv, wl, {"system": system, "run_seed": self.run_seed})
            after = _settled_rss(srv.pid)
            ready = sum(r["ready"] for r in handle["ready"])
            result = {
                "connections": count,
                "ready": ready,
                "rss_before_kib": before,
                "rss_after_kib": after,
                "kib_per_connection": (after - before) / max(1, ready),
                "held": ready == count and srv.alive(),
                "threads": procfs.threads(srv.pid),
                "errors": sorted({r["last_error"] for r in handle["ready"]} - {""}),
            }
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}", "held": False}
        finally:
            if handle is not None:
                driver.finish_idle(handle)
            if srv is not None:
                srv.stop()
        self.log(f"  idle_{count:<9} {system:<10} {_brief(result)}")
        return result

    def burst(self) -> None:
        n = self.plan.burst_frames
        for system in SYSTEMS:
            self.measure("burst_4096", system, w.burst(100, n, 4096, 2.0), fanout=100)

    def securechat_only(self) -> None:
        self.extra["handshakes"] = self._handshakes()
        self.measure("durable", "securechat", w.durable(20, 50, 0.0, self.plan.seconds))
        self.measure("durable_2000", "securechat", w.durable(20, 50, 2000.0, self.plan.seconds))

    def _handshakes(self) -> dict[str, Any]:
        srv = None
        try:
            srv = self.start("securechat")
            assert srv is not None
            wl = w.handshakes(64, self.plan.handshake_s)
            raw = driver.run(srv, wl, {"system": "securechat", "run_seed": self.run_seed})
            done = raw["handshakes_win"]
            result = {
                "per_s": done / raw["window_s"],
                "relay_cpu_us_each": raw["server_cpu_s"] / done * 1e6 if done else None,
                "relay_cpu_util": raw["server_cpu_util"],
                "load_cpu_util_max": raw["load_cpu_util_max"],
                "machine_busy": raw["machine_busy"],
                "failed_handshakes": raw["failed"],
                "kill_reasons": raw.get("kill_reasons", {}),
                "other_cores": raw.get("other_cores"),
                "last_error": raw.get("last_error", ""),
            }
            if result["relay_cpu_us_each"]:
                result["capacity_per_core"] = 1e6 / result["relay_cpu_us_each"]
                # The initiators (load processes) pay their half on the same cores: what
                # both halves cost together bounds the rate this machine can show at all.
                initiator = raw.get("cpu_win", 0.0) / done * 1e6
                result["initiator_cpu_us_each"] = initiator
                result["machine_ceiling_per_s"] = (
                    (os.cpu_count() or 1) * 1e6 / (result["relay_cpu_us_each"] + initiator)
                )
        except Exception as exc:
            result = {"failed": f"{type(exc).__name__}: {exc}"}
        finally:
            if srv is not None:
                srv.stop()
        self.log(f"  handshakes     securechat {result}")
        return result

    def e2e(self) -> None:
        self.extra["e2e"] = micro.run(self.plan.quick)
        self.log(f"  e2e            {self.extra['e2e']}")


def _settled_rss(pid: int, timeout: float = 15.0) -> int:
    """RSS once it stopped moving (servers may still be accepting or spawning threads)."""
    from bench import procfs

    deadline = time.monotonic() + timeout
    last = procfs.rss_kib(pid)
    stable = 0
    while time.monotonic() < deadline and stable < 4:
        time.sleep(0.25)
        now = procfs.rss_kib(pid)
        stable = stable + 1 if abs(now - last) <= max(64, last // 500) else 0
        last = now
    return last


def _brief(result: dict[str, Any]) -> str:
    if "failed" in result:
        return "FAILED " + str(result["failed"])[:200]
    keys = (
        "deliveries_per_s",
        "cpu_us_per_delivery",
        "p99_ms",
        "delivered_fraction",
        "load_cpu_util_max",
        "server_cpu_util",
        "other_cores",
        "peak_rss_mib",
        "kib_per_connection",
        "ready",
    )
    parts = []
    for k in keys:
        v = result.get(k)
        if v is not None:
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    if result.get("last_error"):
        parts.append(f"err={result['last_error'][:80]}")
    return " ".join(parts)


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None
