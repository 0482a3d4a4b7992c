"""``python -m bench [--quick] [--reps N] [--only PART ...] [--update-docs]``.

Runs the suite, prints the figures table of issue 7 (stdout; progress goes
to stderr), writes ``bench/results/latest.json`` plus a timestamped copy and
the plots under ``docs/img/``. ``--update-docs`` also rewrites the generated
table in ``docs/performance.md`` between its two marker comments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procfs, report
from bench.servers import REPO
from bench.suite import Plan, Suite

PARTS = ("throughput", "sweep", "idle", "burst", "securechat", "e2e")
RESULTS = REPO / "bench" / "results"
IMG = REPO / "docs" / "img"
DOC = REPO / "docs" / "performance.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _background_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes while we do nothing (a noisy machine skews figures)."""
    busy0, total0 = procfs.machine_cpu()
    time.sleep(seconds)
    busy1, total1 = procfs.machine_cpu()
    return (busy1 - busy0) / max(1e-9, total1 - total0) * (os.cpu_count() or 1)


def _machine() -> dict[str, Any]:
    model = "?"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kib = int(f.readline().split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit or "uncommitted",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 repetition, small counts (<2 min)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 1)")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the generated table in docs/performance.md",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: re-render table, plots (and docs) from FILE",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        return render(json.loads(args.from_json.read_text()), args.update_docs)
    nofile = _raise_nofile()
    plan = Plan.make(args.quick, args.reps)
    parts = set(args.only or PARTS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    suite = Suite(plan, log)
    background = _background_cores()
    if background > 0.25:
        suite.notes.append(
            f"other processes used {background:.2f} of {os.cpu_count()} cores just before the "
            "run: figures are disturbed (see other_cores per run in the JSON)"
        )
        log("warning: " + suite.notes[-1])
    started = time.time()
    log(
        f"bench: {'quick' if plan.quick else 'full'} run, {plan.reps} repetition(s), "
        f"RLIMIT_NOFILE {nofile}, work dir {suite.tmp}"
    )
    if "throughput" in parts:
        for rep in range(plan.reps):
            log(f"repetition {rep + 1}/{plan.reps}")
            suite.repetition()
    if "sweep" in parts and plan.sweep:
        log("offered-load sweep")
        suite.sweep()
    if "idle" in parts:
        log("idle connections")
        suite.idle()
    if "burst" in parts:
        log("4 KiB broadcast burst")
        suite.burst()
    if "securechat" in parts:
        log("handshakes and durable store (securechat only)")
        suite.securechat_only()
    if "e2e" in parts:
        log("client E2E cost")
        suite.e2e()
    shutil.rmtree(suite.tmp, ignore_errors=True)  # server logs and relay stores of every run
    rows = report.figures(suite.runs, suite.extra)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result: dict[str, Any] = {
        "meta": {
            **_machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "quick": plan.quick,
            "reps": plan.reps,
            "seconds_per_run": plan.seconds,
            "parts": sorted(parts),
            "duration_s": round(time.time() - started, 1),
            "versions": suite.versions,
            "nofile": nofile,
            "other_cores_before": round(background, 2),
        },
        "notes": suite.notes,
        "figures": rows,
        "runs": suite.runs,
        "extra": suite.extra,
    }
    latest = report.write_json(result, RESULTS, stamp)
    plots = report.plot(suite.runs, IMG) if "throughput" in parts or "sweep" in parts else []
    print(report.table(rows))
    for note in suite.notes:
        print(f"note: {note}")
    print(
        f"\nwrote {latest} and {RESULTS / (stamp + '.json')}"
        + (f"; plots {', '.join(str(p) for p in plots)}" if plots else "")
    )
    if args.update_docs:
        update_docs(rows, result["meta"], report.other_cores(suite.runs))
        print(f"updated {DOC}")
    return 0


def render(result: dict[str, Any], docs: bool) -> int:
    """Table, plots and docs from a saved result (figures recomputed from its runs)."""
    rows = report.figures(result["runs"], result["extra"])
    print(report.table(rows))
    for note in result.get("notes", []):
        print(f"note: {note}")
    for path in report.plot(result["runs"], IMG):
        print(f"wrote {path}")
    if docs:
        update_docs(rows, result["meta"], report.other_cores(result["runs"]))
        print(f"updated {DOC}")
    return 0


def update_docs(rows: list[dict[str, Any]], meta: dict[str, Any], other: float | None) -> None:
    """Replace the generated table in docs/performance.md (between the markers)."""
    text = DOC.read_text() if DOC.exists() else f"{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    generated = (
        f"\n_Generated by `python -m bench{' --quick' if meta['quick'] else ''}` on "
        f"{meta['date']} ({meta['cpu']}, {meta['cores']} cores; {meta['reps']} repetition(s), "
        f"medians; commit {meta['commit']}; other jobs and unattributed kernel time used a "
        f"median of {other or 0:.2f} of the {meta['cores']} cores during the runs)._\n\n"
        f"{report.table(rows, markdown=True)}\n"
    )
    DOC.write_text(head + BEGIN + generated + END + tail)


if __name__ == "__main__":
    raise SystemExit(main())
