"""Run one workload: spread clients over load processes, start them together, collect.

The driver samples the server's CPU (``/proc/<pid>/stat``) and the machine's
CPU at the start and end of the measured window, and the server's RSS every
few milliseconds when asked (memory under a burst). The load processes'
own CPU comes back in their results, so the report can say when the load
generators, not the server, were the limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench import procfs
from bench.servers import REPO, Server

LINE_TIMEOUT_S = 180.0
START_DELAY_NS = 300_000_000


@dataclass
class Workload:
    """Clients (role specs) per load process plus the shared mode settings."""

    mode: str  # run | idle | handshake
    per_proc: list[list[dict[str, Any]]]
    settings: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 3.0
    warmup_s: float = 0.5
    drain_s: float = 3.0
    rate: float = 0.0  # total offered frames/s; 0 = unpaced
    sample_rss: bool = False


class LoadProcess:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.load"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            text=True,
            bufsize=1,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.send(json.dumps(cfg))

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if len(self.stderr) < 50:
                self.stderr.append(line.rstrip())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def expect(self, word: str, timeout: float = LINE_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if sel.select(min(1.0, deadline - time.monotonic())):
                    line = self.proc.stdout.readline()
                    if not line:
                        break
                    if line.startswith(word + " "):
                        result: dict[str, Any] = json.loads(line[len(word) + 1 :])
                        return result
        finally:
            sel.close()
        tail = "\n".join(self.stderr[-15:])
        raise RuntimeError(f"load process gave no {word} line: {tail}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def run(server: Server, wl: Workload, system_settings: dict[str, Any]) -> dict[str, Any]:
    """Run ``wl`` against ``server``; return merged counters and server-side measures.

    Drain protocol: when sending stops each load process reports how many
    frames it sent to each receiver (``SENT``); the driver adds them up and
    tells every process what its receivers must get (``EXPECT``), so the
    drain ends as soon as everything arrived (or at ``t_stop``), and the
    delivered fraction is exact.
    """
    n_procs = len(wl.per_proc)
    procs: list[LoadProcess] = []
    sampler = None
    try:
        for proc_index, clients in enumerate(wl.per_proc):
            cfg = {
                "index_base": 1_000_000 * (proc_index + 1),
                "host": server.host,
                "port": server.port,
                "mode": wl.mode,
                "clients": clients,
                "rate": wl.rate / n_procs,
                **wl.settings,
                **system_settings,
            }
            procs.append(LoadProcess(cfg))
        ready = [lp.expect("READY") for lp in procs]
        rss_ready = procfs.rss_kib(server.pid)
        t0 = time.monotonic_ns() + START_DELAY_NS
        t_warm = t0 + int(wl.warmup_s * 1e9)
        t_end = t0 + int(wl.duration_s * 1e9)
        t_stop = t_end + int(wl.drain_s * 1e9)
        for lp in procs:
            lp.send(f"GO {t0} {t_warm} {t_end} {t_stop}")
        if wl.mode == "idle":
            return {"ready": ready, "rss_ready_kib": rss_ready, "_procs": procs}
        sampler = RssSampler(server.pid) if wl.sample_rss else None
        server_side = _watch(server, t_warm, t_end)
        if wl.mode == "run":
            _exchange_counts(procs, wl.duration_s)
        results = [lp.expect("RESULT", LINE_TIMEOUT_S + wl.drain_s) for lp in procs]
    except BaseException:
        for lp in procs:
            lp.close()
        raise
    finally:
        if sampler is not None:
            sampler.stop()
    for lp in procs:
        lp.close()
    merged = _merge(results)
    merged.update(server_side)
    merged["peak_rss_kib"] = max(server_side["peak_rss_kib"], sampler.peak if sampler else 0)
    merged["ready"] = ready
    merged["window_s"] = wl.duration_s - wl.warmup_s
    # CPU used by processes outside the benchmark (other jobs on the machine), in cores
    merged["other_cores"] = max(
        0.0,
        merged["machine_busy"] * (os.cpu_count() or 1)
        - merged["server_cpu_util"]
        - merged["load_cpu_util_sum"],
    )
    return merged


def _exchange_counts(procs: list[LoadProcess], duration_s: float) -> None:
    expected: dict[str, int] = {}
    for lp in procs:
        for index, count in lp.expect("SENT", LINE_TIMEOUT_S + duration_s).items():
            expected[index] = expected.get(index, 0) + count
    line = "EXPECT " + json.dumps(expected)
    for lp in procs:
        lp.send(line)


def finish_idle(handle: dict[str, Any]) -> None:
    for lp in handle["_procs"]:
        lp.send("STOP")
    for lp in handle["_procs"]:
        with contextlib.suppress(RuntimeError):
            lp.expect("RESULT", 30)
        lp.close()


class RssSampler:
    """Peak RSS of a process, sampled every 10 ms on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = procfs.rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, procfs.rss_kib(self.pid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        time.sleep(delay)


def _watch(server: Server, t_warm: int, t_end: int) -> dict[str, Any]:
    """Server CPU and machine CPU over [t_warm, t_end]."""
    _sleep_until(t_warm)
    cpu0, (busy0, total0) = procfs.cpu_seconds(server.pid), procfs.machine_cpu()
    _sleep_until(t_end)
    cpu1, (busy1, total1) = procfs.cpu_seconds(server.pid), procfs.machine_cpu()
    window = (t_end - t_warm) / 1e9
    return {
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_util": (cpu1 - cpu0) / window,
        "machine_busy": (busy1 - busy0) / max(1e-9, total1 - total0),
        "cores": os.cpu_count(),
        "peak_rss_kib": procfs.rss_kib(server.pid),
        "server_alive": server.alive(),
    }


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for r in results:
        for key, value in r.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif isinstance(value, dict):
                into = merged.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    merged["load_cpu_util_max"] = max((r.get("cpu_util", 0.0) for r in results), default=0.0)
    merged["load_cpu_util_sum"] = sum(r.get("cpu_util", 0.0) for r in results)
    return merged
