"""Tests of the benchmark harness itself (not of speed): ``pytest bench/test_harness.py``.

They check that the load clients count and time exactly what arrives, that
the naive relay routes, and that the report judges targets from the numbers.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import protocols as p
from bench import report
from bench.servers import LISTEN_RE, REPO
from bench.suite import percentile


def _redis_message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


@given(st.lists(st.integers(1, 300), min_size=1, max_size=20), st.integers(0, 2**63))
def test_redis_receiver_counts_records_split_anywhere(cuts: list[int], stamp: int) -> None:
    size = 64
    recv = p.redis_receiver(b"c7", size)
    assert recv.start().startswith(b"*2\r\n$9\r\nSUBSCRIBE")
    payload = p.TS.pack(stamp) + bytes(size - 8)
    stream = recv.confirm + _redis_message(b"c7", payload) * 5
    pos = 0
    for cut in [*cuts, len(stream)]:
        recv.on_data(stream[pos : pos + cut], 0)
        pos += cut
        if pos >= len(stream):
            break
    assert recv.ready
    assert recv.delivered == 5


def test_receiver_rejects_broken_framing_even_when_payload_mimics_header() -> None:
    size = 64
    recv = p.naive_receiver(3, size)
    recv.start()
    prefix = struct.pack(">Ic", 1 + size, b"D")
    good = prefix + prefix + bytes(size - len(prefix))  # payload starts with a header look-alike
    assert recv.on_data(good, 0) == b""
    assert recv.delivered == 1
    with pytest.raises(RuntimeError):
        recv.on_data(b"\x00" * len(good), 0)


def test_latency_only_for_frames_stamped_in_window() -> None:
    size = 32
    recv = p.naive_receiver(1, size)
    recv.start()
    recv.win_lo, recv.win_hi = 1000, 2000
    head = struct.pack(">Ic", 1 + size, b"D")
    frames = b"".join(head + p.TS.pack(t) + bytes(size - 8) for t in (999, 1000, 1500, 2000))
    recv.on_data(frames, 2500)
    assert recv.delivered == 4
    assert sorted(recv.lat) == [1000, 1500]


def test_percentile_nearest_rank() -> None:
    values = [i * 1_000_000 for i in range(1, 101)]  # 1..100 ms
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) is None


def test_report_judges_targets_from_paired_ratios() -> None:
    runs = {
        "direct_256": {
            "securechat": [{"deliveries_per_s": 110.0}, {"deliveries_per_s": 90.0}],
            "redis": [{"deliveries_per_s": 100.0}, {"deliveries_per_s": 100.0}],
        }
    }
    assert report.paired_ratio(runs, "direct_256", "deliveries_per_s") == pytest.approx(1.0)
    rows = report.figures(runs, {})
    direct = next(r for r in rows if r["figure"].startswith("direct 256"))
    assert direct["met"] is True
    runs["direct_256"]["securechat"][0]["deliveries_per_s"] = 80.0
    direct = next(r for r in report.figures(runs, {}) if r["figure"].startswith("direct 256"))
    assert direct["met"] is False


def test_naive_relay_routes_direct_and_fanout() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.naive_relay", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        match = LISTEN_RE.search(proc.stdout.readline())
        assert match is not None
        addr = (match.group(1), int(match.group(2)))
        size = 40
        receivers = []
        for box in (1, 2):
            s = socket.create_connection(addr, timeout=5)
            r = p.naive_receiver(box, size)
            s.sendall(r.start())
            receivers.append((s, r))
        time.sleep(0.2)  # registration has no reply in the naive protocol
        sender = socket.create_connection(addr, timeout=5)
        sender.sendall(p.NaiveSender([1, 2], size).encode_batch(3, 42))
        for s, r in receivers:
            deadline = time.monotonic() + 5
            while r.delivered < 3 and time.monotonic() < deadline:
                r.on_data(s.recv(4096), 0)
            assert r.delivered == 3
            s.close()
        sender.close()
    finally:
        proc.terminate()
        proc.wait(5)


def test_missing_redis_is_reported_not_fatal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bench import redis_runner

    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setattr("os.geteuid", lambda: 1000)  # not root: no apt-get
    log: list[str] = []
    assert redis_runner.start(tmp_path, log) is None
    assert "cannot install" in log[0]
    runs = {"direct_256": {"securechat": [{"deliveries_per_s": 5.0}]}}
    direct = next(r for r in report.figures(runs, {}) if r["figure"].startswith("direct 256"))
    assert direct["redis"] is None and direct["met"] is None
    assert "n/a" in report.table([direct])
