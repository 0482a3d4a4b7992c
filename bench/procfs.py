"""What the benchmark reads from /proc: process CPU, process RSS, machine CPU.

Why /proc and not psutil: no extra dependency, and these three numbers are
all the suite needs. ``utime + stime`` of ``/proc/<pid>/stat`` already sums
every thread of the process (the naive relay's threads, Redis's I/O threads).
"""

from __future__ import annotations

import os
from typing import Final

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
PAGE_KIB: Final = os.sysconf("SC_PAGE_SIZE") // 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by every thread of ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name may contain spaces: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS), 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def machine_cpu() -> tuple[float, float]:
    """(busy seconds, total seconds) summed over all CPUs since boot."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def threads(pid: int) -> int:
    """Number of threads of ``pid``."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0
