"""Run every atheris target under ``fuzz/`` for a while and report executions and crashes.

    python scripts/fuzz_run.py --minutes 2 [--jobs 2] [--json OUT] [--only wire,state]

Each target ``fuzz/fuzz_NAME.py`` runs with a fresh working corpus (new inputs go
there, never into the repository) seeded from ``fuzz/corpus/NAME/``, under
libFuzzer's RSS and malloc limits plus an address-space rlimit as a backstop
(the "never unbounded memory" invariant: exceeding it is reported as a crash).
Crash inputs are kept in the results directory. Exit status 1 if any target
crashed, timed out or failed to start.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent
FUZZ_DIR: Final = REPO / "fuzz"
RSS_LIMIT_MB: Final = 1024  # libFuzzer: a single input using more is a crash
MALLOC_LIMIT_MB: Final = 512  # libFuzzer: one allocation larger than this is a crash
ADDRESS_SPACE_LIMIT: Final = 4 * 1024**3  # rlimit backstop for the whole process
UNIT_TIMEOUT_S: Final = 10  # one input taking longer is a hang (reported as a crash)
STARTUP_ALLOWANCE_S: Final = 180  # atheris instruments every loaded module first

_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


@dataclass
class Result:
    target: str
    seconds: float
    executions: int
    exec_per_sec: int
    new_units: int
    peak_rss_mb: int
    crashes: int
    exit_code: int
    artifacts: list[str]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_target(script: Path, seconds: int, results: Path) -> Result:
    name = script.stem.removeprefix("fuzz_")
    seeds = FUZZ_DIR / "corpus" / name
    artifacts = results / name
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        cmd = [
            sys.executable,
            str(script),
            work,
            *([str(seeds)] if seeds.is_dir() else []),
            f"-max_total_time={seconds}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-malloc_limit_mb={MALLOC_LIMIT_MB}",
            f"-timeout={UNIT_TIMEOUT_S}",
            f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1",
        ]
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                cwd=REPO,
                preexec_fn=_limit_memory,
                timeout=seconds + STARTUP_ALLOWANCE_S,
            )
            out, code = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out, code = str(exc.stderr or ""), -1
        elapsed = time.monotonic() - start
    (artifacts / "log.txt").write_text(out[-200_000:])
    stats = {k: int(v) for k, v in _STAT.findall(out)}
    found = sorted(str(p) for p in artifacts.iterdir() if p.name != "log.txt")
    return Result(
        target=name,
        seconds=round(elapsed, 1),
        executions=stats.get("number_of_executed_units", 0),
        exec_per_sec=stats.get("average_exec_per_sec", 0),
        new_units=stats.get("new_units_added", 0),
        peak_rss_mb=stats.get("peak_rss_mb", 0),
        crashes=len(found) + (1 if code != 0 and not found else 0),
        exit_code=code,
        artifacts=found,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.0, help="fuzzing time per target")
    p.add_argument("--jobs", type=int, default=2, help="targets run in parallel")
    p.add_argument("--only", default="", help="comma-separated target names")
    p.add_argument("--results", default=str(Path(tempfile.gettempdir()) / "securechat-fuzz"))
    p.add_argument("--json", help="write the summary as JSON here")
    args = p.parse_args(argv)
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e .[fuzz]", file=sys.stderr)
        return 2
    wanted = {n for n in args.only.split(",") if n}
    scripts = [
        s
        for s in sorted(FUZZ_DIR.glob("fuzz_*.py"))
        if not wanted or s.stem.removeprefix("fuzz_") in wanted
    ]
    seconds = max(int(args.minutes * 60), 1)
    results = Path(args.results)
    print(f"fuzzing {len(scripts)} targets for {seconds}s each, {args.jobs} at a time")
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        summary = list(pool.map(lambda s: run_target(s, seconds, results), scripts))
    print(f"{'target':<12} {'execs':>10} {'exec/s':>8} {'new':>6} {'rss MB':>7} {'crashes':>8}")
    for r in summary:
        print(
            f"{r.target:<12} {r.executions:>10} {r.exec_per_sec:>8} {r.new_units:>6} "
            f"{r.peak_rss_mb:>7} {r.crashes:>8}"
        )
        for a in r.artifacts:
            print(f"    crash input: {a}")
    total = sum(r.executions for r in summary)
    crashes = sum(r.crashes for r in summary)
    print(f"total executions {total}, crashes {crashes} (logs in {results})")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "seconds_per_target": seconds,
                    "total_executions": total,
                    "crashes": crashes,
                    "targets": [asdict(r) for r in summary],
                },
                indent=2,
            )
        )
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
