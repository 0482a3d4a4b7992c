"""Profile the securechat relay under one benchmark workload with py-spy.

``python -m bench.profile {direct,direct4k,paced,fanout,handshake,durable} [--seconds S]``
starts a relay, attaches ``py-spy record`` (``pip install py-spy``) to it
while the workload runs, and prints the functions holding the most samples
(inclusive and self), so a regression or a hot spot is one command away.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import driver, servers
from bench import workloads as w
from bench.suite import GROUPS, MEMBERS, PAIRS


def _workload(kind: str, seconds: float, rate: float) -> driver.Workload:
    if kind == "direct":
        return w.throughput(PAIRS, 256, seconds)
    if kind == "direct4k":
        return w.throughput(PAIRS, 4096, seconds)
    if kind == "paced":
        return w.paced(PAIRS, 256, rate, seconds)
    if kind == "fanout":
        return w.fanout(GROUPS, MEMBERS, 256, seconds)
    if kind == "handshake":
        return w.handshakes(64, seconds)
    return w.durable(20, 50, 0.0, seconds)


def summarize(raw_file: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    out = [f"{total} samples; inclusive:"]
    out += [f"{n / total * 100:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out.append("self:")
    out += [f"{n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    kinds = ("direct", "direct4k", "paced", "fanout", "handshake", "durable")
    parser.add_argument("kind", choices=kinds)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--rate", type=float, default=30_000.0, help="offered frames/s (paced)")
    args = parser.parse_args(argv)
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy_bin).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="securechat-profile-"))
    out = tmp / "profile.txt"
    srv = servers.start_securechat(tmp)
    try:
        spy = subprocess.Popen(
            [
                spy_bin,
                "record",
                "-p",
                str(srv.pid),
                "-d",
                str(int(args.seconds - 1)),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        raw = driver.run(
            srv,
            _workload(args.kind, args.seconds, args.rate),
            {"system": "securechat", "run_seed": "00" * 16},
        )
        spy.wait(60)
    finally:
        srv.stop()
    keys = (
        "sent",
        "delivered_win",
        "handshakes_win",
        "acked_win",
        "server_cpu_util",
        "load_cpu_util_max",
        "other_cores",
        "window_s",
    )
    print({k: raw[k] for k in keys if k in raw})
    if out.exists():
        print(summarize(out, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
