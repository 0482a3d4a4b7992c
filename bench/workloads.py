"""The workloads of issue 7, built the same way for the three systems.

A workload is a list of client specs per load process. Pair ``i`` has its
sender in process ``i % P`` and its receiver in process ``(i + 1) % P``, so
every delivery crosses processes and the two ends never share a loop turn.
Addresses per system: Redis channel ``c<i>`` (direct) or ``g<g>`` (group);
naive mailbox ``i``; securechat mailbox of receiver ``i``'s key.
"""

from __future__ import annotations

from typing import Any

from bench.driver import Workload

LOAD_PROCS = 2


def _spread(specs: list[tuple[int, dict[str, Any]]], procs: int) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = [[] for _ in range(procs)]
    for where, spec in specs:
        out[where % procs].append(spec)
    return out


def direct(
    pairs: int, procs: int = LOAD_PROCS, offline: bool = False
) -> list[list[dict[str, Any]]]:
    """``pairs`` sender->receiver pairs; with ``offline`` the receivers never connect."""
    specs: list[tuple[int, dict[str, Any]]] = []
    for i in range(pairs):
        specs.append((i, {"role": "send", "index": i, "targets": [i], "channel": f"c{i}"}))
        if not offline:
            specs.append((i + 1, {"role": "recv", "index": i, "channel": f"c{i}"}))
    # receivers first in each process so they are subscribed before any sender starts
    return [sorted(p, key=lambda s: s["role"] != "recv") for p in _spread(specs, procs)]


def group(groups: int, size: int, procs: int = LOAD_PROCS) -> list[list[dict[str, Any]]]:
    """``groups`` senders, each fanning out to its own ``size`` receivers."""
    specs: list[tuple[int, dict[str, Any]]] = []
    r = 0
    for g in range(groups):
        members = list(range(g * size, (g + 1) * size))
        specs.append((g, {"role": "send", "index": g, "targets": members, "channel": f"g{g}"}))
        for m in members:
            specs.append((r, {"role": "recv", "index": m, "channel": f"g{g}"}))
            r += 1
    return [sorted(p, key=lambda s: s["role"] != "recv") for p in _spread(specs, procs)]


def idle(conns: int, procs: int = LOAD_PROCS) -> list[list[dict[str, Any]]]:
    specs = [(i, {"role": "recv", "index": 100_000 + i, "channel": f"i{i}"}) for i in range(conns)]
    return _spread(specs, procs)


def throughput(pairs: int, size: int, seconds: float) -> Workload:
    """Unpaced: the drain only serves the delivered-fraction check, so keep it short."""
    return Workload("run", direct(pairs), {"size": size}, duration_s=seconds, drain_s=1.0)


def fanout(groups: int, members: int, size: int, seconds: float) -> Workload:
    return Workload(
        "run",
        group(groups, members),
        {"size": size, "multi": True},
        duration_s=seconds,
        drain_s=1.0,
    )


def paced(pairs: int, size: int, rate: float, seconds: float) -> Workload:
    return Workload("run", direct(pairs), {"size": size}, duration_s=seconds, rate=rate)


def burst(receivers: int, frames: int, size: int, pause_s: float) -> Workload:
    """One sender, ``frames`` frames to ``receivers`` stalled receivers, then they read."""
    return Workload(
        "run",
        group(1, receivers),
        {
            "size": size,
            "multi": True,
            "burst_count": frames,
            "pause_ns": int(pause_s * 1e9),
            "batch": 16,
            "max_out": 1 << 22,
        },
        duration_s=pause_s,
        warmup_s=0.0,
        drain_s=20.0,
        sample_rss=True,
    )


def durable(senders: int, recipients_per_sender: int, rate: float, seconds: float) -> Workload:
    """Senders to recipients that are never connected: every frame goes to the store."""
    specs: list[tuple[int, dict[str, Any]]] = []
    for i in range(senders):
        base = 500_000 + i * recipients_per_sender
        targets = list(range(base, base + recipients_per_sender))
        specs.append((i, {"role": "send", "index": i, "targets": targets, "channel": f"o{i}"}))
    return Workload(
        "run",
        _spread(specs, LOAD_PROCS),
        {"size": 256, "record_accept": True},
        duration_s=seconds,
        rate=rate,
    )


def handshakes(concurrency: int, seconds: float) -> Workload:
    per: list[list[dict[str, Any]]] = [[] for _ in range(LOAD_PROCS)]
    return Workload(
        "handshake",
        per,
        {"size": 256, "concurrency": concurrency},
        duration_s=seconds,
        warmup_s=0.3,
        drain_s=0.0,
    )
