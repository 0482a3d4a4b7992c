"""Paired A/B of two relay source trees (or two option sets) under one workload.

``python -m bench.ab KIND [--baseline DIR] [--reps N] [--a-args ...] [--b-args ...]``

A is a copy of the relay's source (``DIR/securechat``, e.g. a ``git archive``
of the last commit), B is the working tree. Each repetition runs A then B
(then swaps the order on the next repetition) on fresh servers, so a noisy
machine affects both sides alike; the summary prints per-side medians and
the median of the per-repetition ratios B/A. Used to decide whether a change
to the relay helps before keeping it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import driver, servers
from bench import workloads as w
from bench.suite import GROUPS, MEMBERS, PAIRS, summarize

KINDS = ("direct", "direct4k", "paced", "fanout", "handshake", "durable", "durable_paced", "burst")


def _workload(kind: str, seconds: float, rate: float) -> tuple[driver.Workload, int]:
    if kind == "direct":
        return w.throughput(PAIRS, 256, seconds), 1
    if kind == "direct4k":
        return w.throughput(PAIRS, 4096, seconds), 1
    if kind == "paced":
        return w.paced(PAIRS, 256, rate, seconds), 1
    if kind == "fanout":
        return w.fanout(GROUPS, MEMBERS, 256, seconds), MEMBERS
    if kind == "handshake":
        return w.handshakes(64, seconds), 1
    if kind == "burst":
        return w.burst(100, 2000, 4096, 2.0), 100
    if kind == "durable_paced":
        return w.durable(20, 50, 2000.0, seconds), 1
    return w.durable(20, 50, 0.0, seconds), 1


def _network_args(tree: Path) -> list[str]:
    """The per-network limits the working tree's relay is benched with, for a baseline
    that knows them (a relay from before issue 11 does not: it runs without)."""
    probe = subprocess.run(
        [sys.executable, "-m", "securechat", "relay", "--help"],
        capture_output=True, text=True, cwd=tree, timeout=60, check=False,
    )  # fmt: skip
    flags = servers.BENCH_NETWORK_ARGS
    if probe.returncode == 0 and all(f in probe.stdout for f in flags[::2]):
        return list(flags)
    return []


def _start(tree: Path | None, workdir: Path, extra: list[str]) -> servers.Server:
    if tree is None:
        return servers.start_securechat(workdir, extra)
    data = workdir / "relay-data"
    data.mkdir(exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "securechat",
        "relay",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--data",
        str(data),
        "--max-per-ip",
        str(servers.BENCH_MAX_PER_IP),
        *_network_args(tree),
        *extra,
    ]
    logfile = workdir / "securechat.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tree)
    line = servers.wait_for_line(proc, logfile, "listening on", 30.0)
    match = servers.LISTEN_RE.search(line)
    assert match is not None
    return servers.Server("securechat", proc, match.group(1), int(match.group(2)), logfile)


def _one(
    kind: str, tree: Path | None, extra: list[str], seconds: float, rate: float
) -> dict[str, Any]:
    wl, fanout = _workload(kind, seconds, rate)
    workdir = Path(tempfile.mkdtemp(prefix="securechat-ab-"))
    srv = _start(tree, workdir, extra)
    try:
        raw = driver.run(srv, wl, {"system": "securechat", "run_seed": "00" * 16})
    finally:
        srv.stop()
    if kind == "handshake":
        done = raw["handshakes_win"]
        return {
            "per_s": done / raw["window_s"],
            "cpu_us": raw["server_cpu_s"] / done * 1e6 if done else None,
        }
    s = summarize(raw, fanout)
    keys = (
        "deliveries_per_s",
        "cpu_us_per_delivery",
        "p50_ms",
        "p99_ms",
        "delivered_fraction",
        "accept_per_s",
        "accept_p99_ms",
        "peak_rss_mib",
        "server_cpu_util",
        "other_cores",
    )
    return {k: s[k] for k in keys if s.get(k) is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__)
    p.add_argument("kind", choices=KINDS)
    p.add_argument(
        "--baseline",
        type=Path,
        help="tree holding the A side's securechat/ (default: the working tree, with --a-args)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rate", type=float, default=2000.0)
    p.add_argument("--a-args", default="", help="relay options for A, one string")
    p.add_argument("--b-args", default="", help="relay options for B, one string")
    args = p.parse_args(argv)
    sides = {"A": (args.baseline, args.a_args.split()), "B": (None, args.b_args.split())}
    results: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for rep in range(args.reps):
        order = ("A", "B") if rep % 2 == 0 else ("B", "A")
        for side in order:
            tree, extra = sides[side]
            r = _one(args.kind, tree, extra, args.seconds, args.rate)
            results[side].append(r)
            brief = " ".join(f"{k}={v:.4g}" for k, v in r.items())
            print(f"rep {rep} {side}: {brief}", file=sys.stderr, flush=True)
    keys = sorted({k for rs in results.values() for r in rs for k in r})
    print(f"{'figure':<22} {'A':>12} {'B':>12} {'B/A (paired)':>13}")
    for k in keys:
        a = [r.get(k) for r in results["A"]]
        b = [r.get(k) for r in results["B"]]
        ma = statistics.median([v for v in a if v is not None] or [0.0])
        mb = statistics.median([v for v in b if v is not None] or [0.0])
        ratios = [y / x for x, y in zip(a, b, strict=True) if x and y is not None]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        print(f"{k:<22} {ma:>12.4g} {mb:>12.4g} {ratio:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
