"""One load process: many client connections in one selector loop.

Started by ``bench/driver.py`` as ``python -m bench.load``; talks to it over
stdin/stdout with one JSON or text line per step::

    driver -> load   {config}                 which clients, which system, the mode
    load -> driver   READY {stats}            every client connected and ready
    driver -> load   GO t0 t_warm t_end t_stop (monotonic ns, shared by all processes)
    load -> driver   RESULT {counters}

Modes: ``run`` (send frames, unpaced or paced, count deliveries and
latencies), ``idle`` (hold the connections until the driver writes ``STOP``)
and ``handshake`` (keep ``concurrency`` handshakes in flight, count
completions). Non-blocking sockets only, so one process drives hundreds of
connections; every wait is bounded by the deadlines the driver sends.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from bench import protocols as p

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RECV_SIZE = 256 * 1024
CONNECT_TIMEOUT_S = 120.0


@dataclass
class Conn:
    sock: socket.socket
    client: p.Client
    sender: bool
    out: bytearray = field(default_factory=bytearray)
    events: int = 0
    sent: int = 0
    dead: bool = False
    spec: dict[str, Any] = field(default_factory=dict)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_client(cfg: dict[str, Any], spec: dict[str, Any]) -> p.Client:
    system, size = cfg["system"], cfg["size"]
    if system == "redis":
        if spec["role"] == "recv":
            return p.redis_receiver(spec["channel"].encode(), size)
        return p.RedisSender(spec["channel"].encode(), size)
    if system == "naive":
        if spec["role"] == "recv":
            return p.naive_receiver(spec["index"], size)
        return p.NaiveSender(spec["targets"], size)
    seed = bytes.fromhex(cfg["run_seed"])
    from securechat.core import wire

    if spec["role"] == "recv":
        return p.SecureChatClient(p.client_key(seed, "r", spec["index"]), [], size, False)
    boxes = [wire.mailbox_address(p.public_of(p.client_key(seed, "r", t))) for t in spec["targets"]]
    key = p.client_key(seed, "s", spec["index"])
    return p.SecureChatClient(key, boxes, size, cfg.get("multi", False))


class Loop:
    """The selector pump shared by every mode."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.dead = 0
        self.last_rx = 0
        # recv(256 KiB) mallocs (mmaps) and frees 256 KiB per call (~13 us here):
        # receive into one buffer and copy only what came, for every system alike.
        self.rbuf = bytearray(RECV_SIZE)
        self.rview = memoryview(self.rbuf)
        self.last_error = ""
        self.expected: dict[str, int] | None = None
        self.reasons: dict[str, int] = {}
        self.sel.register(sys.stdin.fileno(), READ, None)

    # --- socket plumbing ------------------------------------------------------------------
    def open(self, client: p.Client, sender: bool) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.connect_ex((self.cfg["host"], self.cfg["port"]))
        conn = Conn(sock, client, sender)
        conn.out += client.start()
        conn.events = READ | WRITE
        self.sel.register(sock, conn.events, conn)
        return conn

    def set_events(self, c: Conn, events: int) -> None:
        if c.dead or events == c.events:
            return
        if events == 0:
            self.sel.unregister(c.sock)
        elif c.events == 0:
            self.sel.register(c.sock, events, c)
        else:
            self.sel.modify(c.sock, events, c)
        c.events = events

    def kill(self, c: Conn, why: str) -> None:
        if c.dead:
            return
        self.set_events(c, 0)
        c.dead = True
        self.dead += 1
        self.last_error = why
        reason = why.split(":")[0] if why.startswith("protocol") else why
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        c.sock.close()

    def flush(self, c: Conn) -> None:
        if c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.kill(c, f"send: {exc}")
                return
            del c.out[:n]
        want = (c.events & READ) | (WRITE if c.out else 0)
        if c.events and want != c.events:
            self.set_events(c, want)

    def on_read(self, c: Conn, now: int) -> None:
        try:
            size = c.sock.recv_into(self.rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.kill(c, f"recv: {exc}")
            return
        data = self.rview[:size].tobytes()
        if not data:
            self.kill(c, "closed by server")
            return
        self.last_rx = now
        try:
            reply = c.client.on_data(data, now)
        except Exception as exc:  # a protocol failure ends this connection only
            self.kill(c, f"protocol: {type(exc).__name__}: {exc}")
            return
        if reply:
            c.out += reply
            self.flush(c)

    def poll(self, timeout: float) -> int:
        events = self.sel.select(timeout)
        now = time.monotonic_ns()  # after select: the receive time of what it reported
        for key, mask in events:
            c: Conn | None = key.data
            if c is None:
                self.on_driver_line(sys.stdin.readline())
                continue
            if mask & READ:
                self.on_read(c, now)
            if mask & WRITE and not c.dead:
                self.flush(c)
        return time.monotonic_ns()

    def on_driver_line(self, line: str) -> None:
        """EXPECT {receiver index: frames}: what our receivers must get before we stop."""
        if line.startswith("EXPECT "):
            self.expected = json.loads(line[7:])
        elif not line:  # the driver went away: stop listening to stdin
            self.sel.unregister(sys.stdin.fileno())

    def drained(self, receivers: list[Conn]) -> bool:
        expected = self.expected
        if expected is None:
            return False
        return all(
            c.dead or c.client.delivered >= expected.get(str(c.spec["index"]), 0) for c in receivers
        )

    # --- phases ---------------------------------------------------------------------------
    def connect_all(self, specs: list[dict[str, Any]]) -> dict[str, Any]:
        """Open every connection, at most ``connect_concurrency`` not yet ready at once."""
        start = time.monotonic()
        todo = list(reversed(specs))
        limit = self.cfg.get("connect_concurrency", 200)
        pending: list[Conn] = []
        deadline = start + CONNECT_TIMEOUT_S
        while (todo or pending) and time.monotonic() < deadline:
            while todo and len(pending) < limit:
                spec = todo.pop()
                conn = self.open(make_client(self.cfg, spec), spec["role"] == "send")
                conn.spec = spec
                self.conns.append(conn)
                pending.append(conn)
            self.poll(0.01)
            pending = [c for c in pending if not c.client.ready and not c.dead]
        ready = sum(1 for c in self.conns if c.client.ready and not c.dead)
        return {
            "connect_s": time.monotonic() - start,
            "ready": ready,
            "wanted": len(specs),
            "dead": self.dead,
            "last_error": self.last_error,
        }


def _stats(conns: list[Conn]) -> tuple[int, int, int]:
    sent = sum(c.sent for c in conns if c.sender)
    delivered = sum(c.client.delivered for c in conns if not c.sender)
    acked = sum(c.client.acked for c in conns if c.sender)
    return sent, delivered, acked


def _report_sent(senders: list[Conn]) -> None:
    """SENT {receiver index: frames sent to it} (final: nothing is generated after t_end)."""
    counts: dict[int, int] = {}
    for c in senders:
        for target in c.spec["targets"]:
            counts[target] = counts.get(target, 0) + c.sent
    print("SENT " + json.dumps(counts), flush=True)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_mode(loop: Loop, go: list[int]) -> dict[str, Any]:
    """Send (unpaced with a window, or paced) from t0 to t_end; drain until t_stop."""
    cfg = loop.cfg
    t0, t_warm, t_end, t_stop = go
    senders = [c for c in loop.conns if c.sender and not c.dead]
    receivers = [c for c in loop.conns if not c.sender and not c.dead]
    window, batch = cfg.get("window", 256), cfg.get("batch", 64)
    rate = cfg.get("rate", 0.0)  # frames/s for this process; 0 = unpaced
    burst = cfg.get("burst_count", 0)
    has_acks = cfg["system"] != "naive"
    for c in loop.conns:
        c.client.win_lo, c.client.win_hi = t_warm, t_end
        if cfg.get("record_accept"):
            c.client.record_accept = True  # type: ignore[attr-defined]
    paused = cfg.get("pause_ns", 0)
    if paused:
        for c in receivers:
            loop.set_events(c, 0)
    generated = 0
    snap_warm = snap_end = None
    cpu_warm = cpu_end = 0.0
    max_out = cfg.get("max_out", 1 << 20)
    now = time.monotonic_ns()
    while now < t_stop:
        if snap_warm is None and now >= t_warm:
            snap_warm, cpu_warm = _stats(loop.conns), _cpu()
        if snap_end is None and now >= t_end:
            snap_end, cpu_end = _stats(loop.conns), _cpu()
            _report_sent(senders)
        if paused and now >= t0 + paused:
            paused = 0
            for c in receivers:
                loop.set_events(c, READ)
        timeout = 0.005
        if t0 <= now < t_end and senders:
            if rate:
                due = int((now - t0) * rate / 1e9) - generated
                n = len(senders)
                if due > 0:
                    base, extra = divmod(due, n)
                    start = generated % n
                    for j in range(min(n, due)):
                        c = senders[(start + j) % n]
                        k = base + (1 if j < extra else 0)
                        if c.dead or len(c.out) > max_out:
                            continue  # cannot offer more: shows up as achieved < offered
                        c.out += c.client.encode_batch(k, now)
                        c.sent += k
                        loop.flush(c)
                    generated += due
                nxt = t0 + (generated + 1) * 1e9 / rate
                timeout = min(0.005, max(0.0, (nxt - now) / 1e9))
            else:
                for c in senders:
                    if c.out or c.dead:
                        continue
                    room = window - (c.sent - c.client.acked) if has_acks else batch
                    if burst:
                        room = min(room, burst - c.sent)
                    if room <= 0:
                        continue
                    k = min(room, batch)
                    c.out += c.client.encode_batch(k, now)
                    c.sent += k
                    loop.flush(c)
                    timeout = 0.0
        elif now >= t_end and loop.drained(receivers):
            busy = any(c.out for c in loop.conns if not c.dead)
            waiting = has_acks and any(c.sent > c.client.acked for c in senders if not c.dead)
            if not busy and not waiting:
                break
        now = loop.poll(timeout)
    if snap_warm is None:
        snap_warm, cpu_warm = _stats(loop.conns), _cpu()
    if snap_end is None:
        snap_end, cpu_end = _stats(loop.conns), _cpu()
        _report_sent(senders)
    sent, delivered, acked = _stats(loop.conns)
    return {
        "sent": sent,
        "sent_win": snap_end[0] - snap_warm[0],
        "delivered": delivered,
        "delivered_win": snap_end[1] - snap_warm[1],
        "acked": acked,
        "acked_win": snap_end[2] - snap_warm[2],
        "accepted_stored": sum(getattr(c.client, "stored", 0) for c in senders),
        "errors": sum(c.client.errors for c in loop.conns),
        "client_errors": sorted({getattr(c.client, "last_error", "") for c in loop.conns} - {""}),
        "lat": [x for c in receivers for x in c.client.lat],
        "accept_lat": [x for c in senders for x in c.client.accept_lat],
        "cpu_win": cpu_end - cpu_warm,
        "cpu_util": (cpu_end - cpu_warm) / max(1e-9, (t_end - t_warm) / 1e9),
        "dead": loop.dead,
        "kill_reasons": loop.reasons,
        "last_error": loop.last_error,
        "drain_s": (time.monotonic_ns() - t_end) / 1e9,
    }


def handshake_mode(loop: Loop, go: list[int]) -> dict[str, Any]:
    """Keep ``concurrency`` handshakes in flight from t0 to t_end; count completions."""
    cfg = loop.cfg
    t0, t_warm, t_end, _ = go
    concurrency = cfg.get("concurrency", 64)
    done = done_win = failed = 0
    pending: list[Conn] = []
    i = 0
    now = time.monotonic_ns()
    while now < t0:
        time.sleep((t0 - now) / 1e9)
        now = time.monotonic_ns()
    cpu_warm = cpu_end = None
    while now < t_end:
        if cpu_warm is None and now >= t_warm:
            cpu_warm = _cpu()
        while len(pending) < concurrency:
            spec = {"role": "recv", "index": cfg.get("index_base", 0) + i}
            i += 1
            pending.append(loop.open(make_client(cfg, spec), False))
        now = loop.poll(0.005)
        still = []
        for c in pending:
            if c.client.ready:
                done += 1
                if now >= t_warm:
                    done_win += 1
                loop.set_events(c, 0)
                c.sock.close()
                c.dead = True
            elif c.dead:
                failed += 1
            else:
                still.append(c)
        pending = still
    cpu_end = _cpu()
    for c in pending:
        loop.kill(c, "end of run")
    return {
        "handshakes": done,
        "handshakes_win": done_win,
        "failed": failed,
        "kill_reasons": loop.reasons,
        "cpu_win": cpu_end - (cpu_warm or cpu_end),
        "cpu_util": (cpu_end - (cpu_warm or cpu_end)) / max(1e-9, (t_end - t_warm) / 1e9),
        "last_error": loop.last_error,
    }


def main() -> int:
    _raise_nofile()
    gc.disable()  # no reference cycles in the hot loop; a collection pause would look like latency
    cfg = json.loads(sys.stdin.readline())
    loop = Loop(cfg)
    specs = cfg["clients"]
    mode = cfg.get("mode", "run")
    if mode == "handshake":
        ready_stats: dict[str, Any] = {"ready": 0, "wanted": 0}
    else:
        ready_stats = loop.connect_all(specs)
    print("READY " + json.dumps(ready_stats), flush=True)
    line = sys.stdin.readline().split()
    if not line or line[0] != "GO":
        return 0
    go = [int(x) for x in line[1:5]]
    if mode == "idle":
        sys.stdin.readline()  # STOP (or EOF when the driver dies)
        result: dict[str, Any] = {"dead": loop.dead}
    elif mode == "handshake":
        result = handshake_mode(loop, go)
    else:
        while time.monotonic_ns() < go[0] - 2_000_000:
            loop.poll(0.001)
        result = run_mode(loop, go)
    print("RESULT " + json.dumps(result), flush=True)
    for c in loop.conns:
        if not c.dead:
            c.sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
