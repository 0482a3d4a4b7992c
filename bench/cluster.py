"""Relay cluster benchmark (issue 16): 1, 2 and 3 relay nodes on one Redis, against the
single relay with its embedded SQLite store, on this machine.

    python -m bench.cluster [--seconds 4] [--pairs 40] [--rates 1000,3000] [--out FILE]

For each setup: unpaced throughput (deliveries/s, ``--pairs`` sender->receiver
pairs with a window of unacknowledged frames, as ``bench.suite``'s throughput),
the CPU of every relay process *plus* Redis per delivery (from /proc, over the
measured window), and the delivery latency p50/p99 at fixed offered loads
(``--rates``, frames/s). Load processes: one per node (two for one node); pair
``i`` sends from process ``i`` and receives in process ``i + 1``, so with two or
three nodes every delivery crosses nodes (stored in Redis, announced on pub/sub,
fetched by the recipient's node): the cluster's worst case, and the honest one
(a load balancer does not put pairs of friends on one node).

Redis runs as the relay requires it (AOF, ``appendfsync always``,
``noeviction``) in the working folder: every insert waits for an fsync, which
Redis groups per event-loop turn. The figures, with a note of the machine's
other load, go to stdout as JSON and a table; docs/performance.md has them and
the projection to a 16-core machine and to ten machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import procfs
from bench.driver import START_DELAY_NS, LoadProcess, Workload, _exchange_counts, _merge
from bench.servers import BENCH_MAX_PER_IP, BENCH_NETWORK_ARGS, REPO, Server, _start
from bench.suite import percentile
from bench.workloads import direct

REDIS_START_S = 20.0


def start_redis(folder: Path, fsync: str = "always") -> Server:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("bench.cluster: redis-server not installed (apt-get install redis-server)")
    from bench.servers import free_port

    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "redis.log"
    argv = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
        "--appendonly", "yes", "--appendfsync", fsync, "--save", "",
        "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(log),
        "--maxclients", "19000",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("redis", proc, "127.0.0.1", port, log)
    deadline = time.monotonic() + REDIS_START_S
    while (
        "Ready to accept connections" not in log.read_text(errors="replace")
        if log.exists()
        else True
    ):
        if time.monotonic() > deadline or proc.poll() is not None:
            server.stop()
            raise SystemExit("bench.cluster: redis-server did not start")
        time.sleep(0.05)
    return server


def start_relay(folder: Path, extra: list[str]) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "securechat", "relay", "--host", "127.0.0.1", "--port", "0",
        "--data", str(folder), "--max-per-ip", str(BENCH_MAX_PER_IP), *BENCH_NETWORK_ARGS,
        "--log-level", "WARNING", "--metrics-interval", "0", *extra,
    ]  # fmt: skip
    return _start(folder.name, argv, folder)


class Setup:
    """The relays (and Redis) of one configuration; ``stop`` ends every process."""

    def __init__(self, work: Path, nodes: int, fsync: str = "always") -> None:
        self.nodes: list[Server] = []
        self.redis: Server | None = None
        if nodes == 0:  # the single relay, embedded SQLite store
            self.nodes.append(start_relay(work / "single", []))
            return
        self.redis = start_redis(work / "redis", fsync)
        from securechat.relay import keyfile

        keyfile.load_or_create(work / "key")
        url = f"redis://127.0.0.1:{self.redis.port}/0"
        for i in range(nodes):
            extra = ["--cluster", url, "--key", str(work / "key" / keyfile.KEY_FILE)]
            if fsync != "always":  # a measurement of what fsync costs, never a deployment
                extra.append("--cluster-allow-unsafe")
            self.nodes.append(start_relay(work / f"node{i + 1}", extra))

    def pids(self) -> list[int]:
        return [s.pid for s in self.nodes] + ([self.redis.pid] if self.redis else [])

    def stop(self) -> None:
        for s in self.nodes:
            s.stop()
        if self.redis is not None:
            self.redis.stop()


def run(setup: Setup, wl: Workload, seed: str) -> dict[str, Any]:
    """``bench.driver.run`` for several servers: load process ``j`` talks to node
    ``j % nodes``; CPU is summed over every relay process and Redis."""
    procs: list[LoadProcess] = []
    n_procs = len(wl.per_proc)
    try:
        for j, clients in enumerate(wl.per_proc):
            node = setup.nodes[j % len(setup.nodes)]
            cfg = {
                "index_base": 1_000_000 * (j + 1),
                "host": node.host,
                "port": node.port,
                "mode": wl.mode,
                "clients": clients,
                "rate": wl.rate / n_procs,
                "system": "securechat",
                "run_seed": seed,
                **wl.settings,
            }
            procs.append(LoadProcess(cfg))
        for lp in procs:
            lp.expect("READY")
        t0 = time.monotonic_ns() + START_DELAY_NS
        t_warm = t0 + int(wl.warmup_s * 1e9)
        t_end = t0 + int(wl.duration_s * 1e9)
        t_stop = t_end + int(wl.drain_s * 1e9)
        for lp in procs:
            lp.send(f"GO {t0} {t_warm} {t_end} {t_stop}")
        _sleep_until(t_warm)
        cpu0 = {pid: procfs.cpu_seconds(pid) for pid in setup.pids()}
        busy0, total0 = procfs.machine_cpu()
        _sleep_until(t_end)
        cpu1 = {pid: procfs.cpu_seconds(pid) for pid in setup.pids()}
        busy1, total1 = procfs.machine_cpu()
        _exchange_counts(procs, wl.duration_s)
        results = [lp.expect("RESULT") for lp in procs]
    finally:
        for lp in procs:
            lp.close()
    merged = _merge(results)
    window = (t_end - t_warm) / 1e9
    relay_cpu = sum(cpu1[s.pid] - cpu0[s.pid] for s in setup.nodes)
    redis_cpu = cpu1[setup.redis.pid] - cpu0[setup.redis.pid] if setup.redis else 0.0
    merged["window_s"] = window
    merged["relay_cpu_s"] = relay_cpu
    merged["redis_cpu_s"] = redis_cpu
    busy_cores = (busy1 - busy0) / max(1e-9, total1 - total0) * (os.cpu_count() or 1)
    merged["other_cores"] = max(0.0, busy_cores - (relay_cpu + redis_cpu) / window
                                - merged["load_cpu_util_sum"])  # fmt: skip
    return merged


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    window = raw["window_s"]
    delivered = raw["delivered_win"]
    per = 1e6 / delivered if delivered else None
    return {
        "deliveries_per_s": round(delivered / window),
        "relay_us_per_delivery": round(raw["relay_cpu_s"] * per, 1) if per else None,
        "redis_us_per_delivery": round(raw["redis_cpu_s"] * per, 1) if per else None,
        "relay_cores": round(raw["relay_cpu_s"] / window, 2),
        "redis_cores": round(raw["redis_cpu_s"] / window, 2),
        "load_cores": round(raw["load_cpu_util_sum"], 2),
        "other_cores": round(raw["other_cores"], 2),
        "p50_ms": percentile(raw.get("lat", []), 0.50),
        "p99_ms": percentile(raw.get("lat", []), 0.99),
        "errors": raw.get("errors", 0),
        "delivered_all": raw["delivered"] >= raw["sent"],
    }


def measure(work: Path, nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    seed = os.urandom(16).hex()
    procs = max(2, nodes)
    setup = Setup(work / f"setup{nodes}", nodes, args.fsync)
    out: dict[str, Any] = {"nodes": nodes or "single (SQLite)"}
    try:
        wl = Workload(
            "run", direct(args.pairs, procs), {"size": args.size},
            duration_s=args.seconds, drain_s=3.0,
        )  # fmt: skip
        out["unpaced"] = summarise(run(setup, wl, seed))
        for rate in args.rates:
            wl = Workload(
                "run", direct(args.pairs, procs), {"size": args.size},
                duration_s=args.seconds, drain_s=3.0, rate=float(rate),
            )  # fmt: skip
            out[f"paced_{rate}"] = summarise(run(setup, wl, seed))
    finally:
        setup.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="measured run length")
    p.add_argument("--pairs", type=int, default=40, help="sender->receiver pairs")
    p.add_argument("--size", type=int, default=256, help="payload bytes")
    p.add_argument("--rates", default="1000,3000", help="paced loads (frames/s), comma-separated")
    p.add_argument("--nodes", default="0,1,2,3", help="setups: 0 = the single SQLite relay")
    p.add_argument(
        "--fsync",
        default="always",
        choices=("always", "everysec"),
        help="Redis appendfsync (everysec: to see what fsync costs; the relay refuses it"
        " without --cluster-allow-unsafe)",
    )
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    args.rates = [int(r) for r in args.rates.split(",") if r]
    results = []
    with tempfile.TemporaryDirectory(prefix="sc-bench-cluster-", dir=REPO / "bench") as tmp:
        for n in (int(x) for x in args.nodes.split(",")):
            res = measure(Path(tmp), n, args)
            results.append(res)
            print(json.dumps(res), flush=True)
    print(table(results, args.rates))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def table(results: list[dict[str, Any]], rates: list[int]) -> str:
    lines = [
        "| setup | deliveries/s | relay us/delivery | Redis us/delivery | "
        + " | ".join(f"p99 at {r}/s (ms)" for r in rates)
        + " |",
        "|---" * (4 + len(rates)) + "|",
    ]
    for r in results:
        u = r["unpaced"]
        p99 = " | ".join(str(r[f"paced_{rate}"]["p99_ms"]) for rate in rates)
        lines.append(
            f"| {r['nodes']} | {u['deliveries_per_s']} | {u['relay_us_per_delivery']} | "
            f"{u['redis_us_per_delivery']} | {p99} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
