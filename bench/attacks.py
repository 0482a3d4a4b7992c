"""Issue 11's relay attacks, alone and all at once, against an honest conversation.

``python -m bench.attacks [--seconds 10] [--only NAME ...] [--json FILE]``

A relay with its shipped defaults runs on loopback. Honest clients on 127.0.0.1:

* alice and bob exchange live messages back to back (the measured round trip:
  Send -> Deliver -> Ack), bob has published prekeys;
* alice also sends a message every 0.25 s to carol, who is offline (stored);
  each must be accepted (``Accepted``, never an ``Error``), and carol must get
  every one of them afterwards;
* every 0.5 s a fresh connection (a new handshake) fetches bob's bundle: it must
  get in and get the bundle with its signed prekey.

Meanwhile the attackers run in their own processes (``nice 19``, so that on a
small machine the relay is not measured against the attackers' own CPU use:
a real attacker's CPU is elsewhere), from other loopback networks
(127.100.0.0/14; Linux routes all of 127/8 to lo). One scenario per attack of
issue 11, items 4 to 10, then all of them at once. Each reports the honest
round trip (p50, p99, max), the relay's peak RSS and CPU, and what the honest
clients lost or had refused.

``tests/reliability/test_relay_attacks.py`` runs the same scenarios for a few
seconds each with generous bounds (CI); this script gives the figures for
``docs/reliability.md`` against the issue's targets (p99 < 50 ms, RSS < 300 MiB,
nothing honest lost or refused).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import select
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from securechat.core import dh, wire
from securechat.core.encoding import decode_token
from securechat.core.noise import NoiseConnection

from bench import procfs

REPO: Final = Path(__file__).resolve().parent.parent
ROUND_TRIP_PAUSE_S: Final = 0.02
STORED_EVERY_S: Final = 0.25
FRESH_EVERY_S: Final = 0.5
HONEST_TIMEOUT_S: Final = 5.0  # half the real client's connect timeout (link.py: 10 s)
TARGET_P99_MS: Final = 50.0
TARGET_RSS_MIB: Final = 300.0


# --- a minimal client (the bench does not import the tests' helpers) --------------------------


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    relay_key: bytes
    victim: bytes  # bob's identity key: whose prekeys the attackers drain


class Link:
    """One authenticated connection; blocking until ``nonblocking()``."""

    def __init__(self, sock: socket.socket, noise: NoiseConnection) -> None:
        self.sock = sock
        self.noise = noise
        self.decoder = wire.FrameDecoder()
        self.pending = b""  # ciphertext not yet taken by the kernel (non-blocking mode)

    @classmethod
    def connect(
        cls,
        t: Target,
        private: bytes | None = None,
        source: str | None = None,
        timeout: float = HONEST_TIMEOUT_S,
    ) -> Link:
        sock = socket.create_connection(
            (t.host, t.port), timeout=timeout, source_address=(source, 0) if source else None
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def verify(remote: bytes) -> None:
            if remote != t.relay_key:
                raise ConnectionError("not the relay we started")

        noise = NoiseConnection(
            initiator=True,
            static_private=private or os.urandom(32),
            rng=os.urandom,
            verify_remote=verify,
        )
        try:
            sock.sendall(noise.initiate())
            while not noise.complete:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake")
                _, _, reply = noise.receive_data(data)
                if reply:
                    sock.sendall(reply)
        except BaseException:
            sock.close()
            raise
        return cls(sock, noise)

    def send(self, frames: list[wire.Frame]) -> None:
        self.sock.sendall(self.noise.send(b"".join(wire.encode(f) for f in frames)))

    def recv(self, deadline: float) -> list[wire.Frame]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame in time")
        self.sock.settimeout(remaining)
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the relay closed the connection")
        _, plain, _ = self.noise.receive_data(data)
        return self.decoder.feed(plain) if plain else []

    def until(self, pred: Callable[[wire.Frame], bool], timeout: float) -> wire.Frame:
        deadline = time.monotonic() + timeout
        while True:
            for frame in self.recv(deadline):
                if pred(frame):
                    return frame

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- attacks (each in its own process) ---------------------------------------------------------

Chunk = bytes | Callable[[], bytes]  # what a flooding connection sends, or a maker of it


class Flood:
    """Connections that each send one plaintext chunk over and over (as fast as the relay
    reads, or ``rate`` chunks a second) and read and drop whatever comes back; a closed
    connection is made again. ``attempts`` counts chunks sent and connections made."""

    def __init__(
        self,
        t: Target,
        plans: Sequence[tuple[str, Chunk, float]],
        on_plain: Callable[[Link, bytes], bytes] | None = None,
    ) -> None:
        self.t = t
        self.plans = plans  # (source, chunk or a maker of chunks, chunks per second; 0: unpaced)
        self.on_plain = on_plain  # answer to what the relay sent (e.g. the publish loop)
        self.attempts = 0

    def _open(self, source: str) -> Link | None:
        try:
            link = Link.connect(self.t, source=source)
        except (OSError, ConnectionError, ValueError):
            return None
        finally:
            self.attempts += 1
        link.sock.setblocking(False)
        return link

    def run(self, end: float) -> None:
        links: list[Link | None] = [self._open(src) for src, _, _ in self.plans]
        due = [0.0] * len(self.plans)
        while time.monotonic() < end:
            now = time.monotonic()
            live = [(i, lk) for i, lk in enumerate(links) if lk is not None]
            readable: list[socket.socket] = []
            writable: list[socket.socket] = []
            if not live:
                time.sleep(0.05)
            else:
                socks = [lk.sock for _, lk in live]
                want_w = [lk.sock for i, lk in live if lk.pending or now >= due[i]]
                readable, writable, _ = select.select(socks, want_w, [], 0.005)
            now = time.monotonic()
            for i, (src, chunk, rate) in enumerate(self.plans):
                link = links[i]
                if link is None:
                    links[i] = self._open(src)
                    continue
                try:
                    if link.sock in readable:
                        self._read(link)
                    if link.sock in writable and (link.pending or now >= due[i]):
                        if not link.pending:
                            plain = chunk() if callable(chunk) else chunk
                            link.pending = link.noise.send(plain)
                            self.attempts += 1
                            due[i] = now + (1.0 / rate if rate else 0.0)
                        link.pending = link.pending[link.sock.send(link.pending) :]
                except BlockingIOError:
                    pass
                except (OSError, ConnectionError, ValueError):
                    link.close()
                    links[i] = None
        for link in links:
            if link is not None:
                link.close()

    def _read(self, link: Link) -> None:
        data = link.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("closed")
        if self.on_plain is not None:
            _, plain, _ = link.noise.receive_data(data)
            answer = self.on_plain(link, plain) if plain else b""
            if answer and not link.pending:
                link.pending = link.noise.send(answer)
        # (without on_plain the ciphertext is dropped unread: the relay cannot tell)


def _many_keys(n: int) -> tuple[bytes, ...]:
    return tuple(os.urandom(32) for _ in range(n))


def attack_prekey_drain(t: Target, end: float) -> int:
    """Item 4: identities on one network and on eight others fetch the victim's bundle."""
    chunk = wire.encode(wire.FetchPrekeys(t.victim)) * 50
    plans = [(f"127.101.0.{i + 1}", chunk, 0.0) for i in range(8)]
    plans += [(f"127.102.{i}.1", chunk, 0.0) for i in range(8)]
    flood = Flood(t, plans)
    flood.run(end)
    return flood.attempts


def attack_ack_flood(t: Target, end: float) -> int:
    """Item 5: four connections acknowledge 1,024 invented copies per Ack, without pause."""
    entries = tuple((os.urandom(32), os.urandom(16)) for _ in range(wire.MAX_ACKS))
    chunk = wire.encode(wire.Ack(entries)) * 4
    flood = Flood(t, [(f"127.103.0.{i + 1}", chunk, 0.0) for i in range(4)])
    flood.run(end)
    return flood.attempts


def attack_disk_fill(t: Target, end: float) -> int:
    """Item 6: one network stores 64 KiB payloads for random (never connected) mailboxes."""
    payload = os.urandom(wire.MAX_PAYLOAD)

    def chunk() -> bytes:  # new ids and mailboxes every time (a retry would be a no-op)
        return b"".join(
            wire.encode(wire.Send(os.urandom(16), os.urandom(32), payload)) for _ in range(8)
        )

    flood = Flood(t, [(f"127.104.0.{i + 1}", chunk, 0.0) for i in range(4)])
    flood.run(end)
    return flood.attempts


def attack_partial_frames(t: Target, end: float) -> int:
    """Item 7: 600 connections from 20 networks each start a 1 MiB frame and stop."""
    head = struct.pack(">IBB", wire.MAX_FRAME, wire.VERSION, wire.T_SEND)
    body = head + bytes(wire.MAX_FRAME - 64)
    held: dict[int, tuple[Link, str]] = {}
    attempts = 0
    sources = [f"127.105.{n}.{i + 1}" for n in range(20) for i in range(30)]
    for source in sources:
        if time.monotonic() >= end:
            break
        try:
            link = Link.connect(t, source=source)
            link.sock.sendall(link.noise.send(body))
        except (OSError, ConnectionError, ValueError):
            attempts += 1
            continue
        attempts += 1
        held[link.sock.fileno()] = (link, source)
    while time.monotonic() < end and held:  # closed ones come back (and are closed again)
        with selectors.DefaultSelector() as sel:
            for fd in held:
                sel.register(fd, selectors.EVENT_READ)
            ready = [key.fd for key, _ in sel.select(0.2)]
        for fd in ready:
            link, source = held.pop(fd)
            link.close()
            with contextlib.suppress(OSError, ConnectionError, ValueError):
                again = Link.connect(t, source=source)
                again.sock.sendall(again.noise.send(body))
                held[again.sock.fileno()] = (again, source)
            attempts += 1
    for link, _ in held.values():
        link.close()
    return attempts


def attack_cheap_frames(t: Target, end: float) -> int:
    """Item 8: PresenceSubscribe (256 keys), FetchPrekeys and Ping floods, each paced just
    under the per-connection frame limit (20,000/s) so only the per-type budgets bind."""
    plans = [
        ("127.106.0.1", wire.encode(wire.PresenceSubscribe(_many_keys(256))) * 10, 200.0),
        ("127.106.1.1", wire.encode(wire.PresenceSubscribe(_many_keys(256))) * 10, 200.0),
        ("127.106.2.1", wire.encode(wire.FetchPrekeys(os.urandom(32))) * 100, 150.0),
        ("127.106.3.1", wire.encode(wire.Ping(7)) * 100, 150.0),
    ]
    flood = Flood(t, plans)
    flood.run(end)
    return flood.attempts


def attack_half_open(t: Target, end: float) -> int:
    """Item 9: 48 addresses, each in its own /24, keep 256 plain TCP connections open that
    never start a handshake (12,288: more than the relay's 12,000 slots, as in the issue);
    every one the relay closes is opened again."""
    sel = selectors.DefaultSelector()  # thousands of descriptors: select() stops at 1024
    attempts = 0

    def open_one(source: str) -> None:
        nonlocal attempts
        attempts += 1
        s = socket.socket()
        try:
            s.bind((source, 0))
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((t.host, t.port))
            sel.register(s, selectors.EVENT_READ, source)
        except OSError:
            s.close()

    for n in range(48):
        for _ in range(256):
            open_one(f"127.107.{n}.1")
            if time.monotonic() >= end:
                break
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            sel.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
            open_one(key.data)
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return attempts


def attack_publish_loop(t: Target, end: float) -> int:
    """Item 10: twenty clients that publish their bundle on every PrekeyCount (the client
    before issue 10 did, so idle clients looped forever)."""
    spk = os.urandom(109)

    def on_plain(link: Link, plain: bytes) -> bytes:
        frames = link.decoder.feed(plain)
        n = sum(1 for f in frames if isinstance(f, wire.PrekeyCount))
        return wire.encode(wire.PublishPrekeys(spk, ())) * n

    plans = [(f"127.108.0.{i + 1}", wire.encode(wire.Ping(1)), 1.0) for i in range(20)]
    flood = Flood(t, plans, on_plain)
    flood.run(end)
    return flood.attempts


ATTACKS: Final[dict[str, Callable[[Target, float], int]]] = {
    "prekey drain (4)": attack_prekey_drain,
    "ack flood (5)": attack_ack_flood,
    "disk fill (6)": attack_disk_fill,
    "partial frames (7)": attack_partial_frames,
    "cheap frames (8)": attack_cheap_frames,
    "half-open slots (9)": attack_half_open,
    "publish loop (10)": attack_publish_loop,
}


def _attack_main(name: str, t: Target, end: float, out: Any) -> None:
    with contextlib.suppress(OSError):
        os.nice(19)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        out.put((name, ATTACKS[name](t, end), ""))
    except Exception as exc:  # reported, never silent
        out.put((name, 0, repr(exc)))


# --- the relay and the honest clients ------------------------------------------------------------


@dataclass
class RelayUnderTest:
    proc: subprocess.Popen[bytes]
    target: Target
    log: Path

    @classmethod
    def start(cls, workdir: Path, extra: list[str]) -> RelayUnderTest:
        data = workdir / "relay-data"
        log = workdir / "relay.log"
        victim = dh.public_key(os.urandom(32))  # replaced once bob exists
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "securechat",
                    "relay",
                    "--port",
                    "0",
                    "--data",
                    str(data),
                    "--log-level",
                    "WARNING",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=out,
                cwd=REPO,
            )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"relay did not start: {log.read_text()[-2000:]}")
        host, port = line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)
        key = decode_token((data / "relay.pub").read_text().strip(), "screlay1", 32)
        return cls(proc, Target(host, int(port), key, victim), log)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


@dataclass
class Honest:
    """What the honest clients saw."""

    round_trips: list[float]
    stored_accept: list[float] = field(default_factory=list)  # Send -> Accepted(1), seconds
    fresh_times: list[float] = field(default_factory=list)  # connect + bundle, seconds
    stored_sent: int = 0
    stored_refused: int = 0
    stored_lost: int = 0
    fresh: int = 0
    fresh_failed: int = 0
    rss_peak_kib: int = 0
    errors: list[str] | None = None


def _publish(link: Link, n: int) -> None:
    otks = tuple(i.to_bytes(4, "big") + os.urandom(32) for i in range(1, n + 1))
    link.send([wire.PublishPrekeys(os.urandom(109), otks)])
    link.until(lambda f: isinstance(f, wire.PrekeyCount), HONEST_TIMEOUT_S)


def _fresh_fetch(t: Target, bob: bytes) -> bool:
    """A new handshake and one bundle: what a new session costs an honest client."""
    try:
        link = Link.connect(t, timeout=HONEST_TIMEOUT_S)
    except (OSError, ConnectionError, ValueError):
        return False
    try:
        link.send([wire.FetchPrekeys(bob)])
        frame = link.until(lambda f: isinstance(f, wire.Prekeys), HONEST_TIMEOUT_S)
        return isinstance(frame, wire.Prekeys) and bool(frame.signed_prekey)
    except (OSError, ConnectionError, ValueError, TimeoutError):
        return False
    finally:
        link.close()


def _answer_to(msg_id: bytes) -> Callable[[wire.Frame], bool]:
    return lambda f: isinstance(f, wire.Accepted | wire.Error) and f.msg_id == msg_id


def _delivery_of(msg_id: bytes) -> Callable[[wire.Frame], bool]:
    return lambda f: isinstance(f, wire.Deliver) and f.msg_id == msg_id


def _honest(r: RelayUnderTest, seconds: float, keys: dict[str, bytes]) -> Honest:
    t = r.target
    h = Honest(round_trips=[], errors=[])
    try:
        alice, bob = Link.connect(t, keys["alice"]), Link.connect(t, keys["bob"])
        for link in (alice, bob):
            link.until(lambda f: isinstance(f, wire.PrekeyCount), HONEST_TIMEOUT_S)
    except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
        h.errors.append(f"honest client could not connect: {exc!r}")  # type: ignore[union-attr]
        return h
    bob_pub, alice_pub = dh.public_key(keys["bob"]), dh.public_key(keys["alice"])
    carol_box = wire.mailbox_address(dh.public_key(keys["carol"]))
    end = time.monotonic() + seconds
    next_stored = next_fresh = time.monotonic()
    stored_ids: set[bytes] = set()
    turn = 0
    try:
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_stored:  # a message for offline carol: must be accepted
                next_stored = now + STORED_EVERY_S
                m = os.urandom(16)
                t_stored = time.monotonic()
                alice.send([wire.Send(m, carol_box, b"for carol")])
                frame = alice.until(_answer_to(m), HONEST_TIMEOUT_S)
                h.stored_accept.append(time.monotonic() - t_stored)
                h.stored_sent += 1
                if isinstance(frame, wire.Error):
                    h.stored_refused += 1
                    h.errors.append(f"stored message refused: {frame.reason}")  # type: ignore
                else:
                    stored_ids.add(m)
            if now >= next_fresh:
                next_fresh = now + FRESH_EVERY_S
                h.fresh += 1
                t_fresh = time.monotonic()
                if not _fresh_fetch(t, bob_pub):
                    h.fresh_failed += 1
                h.fresh_times.append(time.monotonic() - t_fresh)
            sender, receiver, to = (
                (alice, bob, bob_pub) if turn % 2 == 0 else (bob, alice, alice_pub)
            )
            turn += 1
            m = os.urandom(16)
            t0 = time.monotonic()
            sender.send([wire.Send(m, wire.mailbox_address(to), b"honest %d" % turn)])
            frame = receiver.until(_delivery_of(m), HONEST_TIMEOUT_S)
            assert isinstance(frame, wire.Deliver)
            receiver.send([wire.Ack(((frame.sender_key, m),))])
            h.round_trips.append(time.monotonic() - t0)
            h.rss_peak_kib = max(h.rss_peak_kib, procfs.rss_kib(r.proc.pid))
            time.sleep(ROUND_TRIP_PAUSE_S)
    except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
        h.errors.append(f"honest client failed: {exc!r}")  # type: ignore[union-attr]
    finally:
        alice.close()
        bob.close()
    try:
        h.stored_lost = len(stored_ids) - _collect(t, keys["carol"], stored_ids)
    except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
        h.stored_lost = len(stored_ids)
        h.errors.append(f"carol could not collect: {exc!r}")  # type: ignore[union-attr]
    return h


def _collect(t: Target, carol: bytes, ids: set[bytes]) -> int:
    """carol connects and takes her mailbox; how many of ``ids`` she got."""
    got: set[bytes] = set()
    link = Link.connect(t, carol)
    try:
        deadline = time.monotonic() + 20.0
        synced = False
        while not (synced and ids <= got) and time.monotonic() < deadline:
            try:
                frames = link.recv(deadline)
            except TimeoutError:
                break
            acks = []
            for f in frames:
                if isinstance(f, wire.Deliver):
                    got.add(f.msg_id)
                    acks.append((f.sender_key, f.msg_id))
                synced = synced or isinstance(f, wire.Synced)
            if acks:
                link.send([wire.Ack(tuple(acks))])
    finally:
        link.close()
    return len(ids & got)


def run_scenario(
    names: list[str], seconds: float, workdir: Path, relay_args: list[str] | None = None
) -> dict[str, Any]:
    """One relay, the honest clients, and the ``names`` attacks for ``seconds``."""
    relay = RelayUnderTest.start(workdir, relay_args or [])
    keys = {n: os.urandom(32) for n in ("alice", "bob", "carol")}
    try:
        t = relay.target = Target(
            relay.target.host, relay.target.port, relay.target.relay_key, dh.public_key(keys["bob"])
        )
        for name in ("bob", "carol"):  # bob publishes prekeys; carol is known, then offline
            link = Link.connect(t, keys[name])
            link.until(lambda f: isinstance(f, wire.PrekeyCount), HONEST_TIMEOUT_S)
            if name == "bob":
                _publish(link, 100)
            link.close()
        rss_start = procfs.rss_kib(relay.proc.pid)
        cpu_start = procfs.cpu_seconds(relay.proc.pid)
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        end = time.monotonic() + seconds + 1.0
        procs = [
            ctx.Process(target=_attack_main, args=(n, t, end, out), daemon=True) for n in names
        ]
        for p in procs:
            p.start()
        time.sleep(1.0)  # the attacks get going before the measurement starts
        t0 = time.monotonic()
        honest = _honest(relay, seconds, keys)
        wall = time.monotonic() - t0
        cpu = procfs.cpu_seconds(relay.proc.pid) - cpu_start
        attempts: dict[str, int] = {}
        failures: list[str] = []
        for _ in procs:
            with contextlib.suppress(Exception):
                name, n, err = out.get(timeout=30)
                attempts[name] = n
                if err:
                    failures.append(f"{name}: {err}")
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    finally:
        code = relay.stop()
    store_bytes = sum(f.stat().st_size for f in (workdir / "relay-data").glob("relay.sqlite3*"))
    log = relay.log.read_text(errors="replace")
    rt = sorted(honest.round_trips) or [float("nan")]
    return {
        "attacks": names,
        "seconds": seconds,
        "round_trips": len(honest.round_trips),
        "p50_ms": rt[len(rt) // 2] * 1000,
        "p99_ms": rt[max(int(len(rt) * 0.99) - 1, 0)] * 1000,
        "max_ms": rt[-1] * 1000,
        "rss_start_mib": rss_start / 1024,
        "rss_peak_mib": honest.rss_peak_kib / 1024,
        "relay_cores": cpu / wall if honest.round_trips else 0.0,
        "store_mib": store_bytes / 2**20,
        "stored_accept_max_ms": max(honest.stored_accept, default=0.0) * 1000,
        "fresh_max_ms": max(honest.fresh_times, default=0.0) * 1000,
        "stored_sent": honest.stored_sent,
        "stored_refused": honest.stored_refused,
        "stored_lost": honest.stored_lost,
        "fresh": honest.fresh,
        "fresh_failed": honest.fresh_failed,
        "honest_errors": honest.errors,
        "attack_attempts": attempts,
        "attack_failures": failures,
        "relay_exit": code,
        "relay_traceback": "Traceback" in log,
    }


def scenarios(only: list[str] | None = None) -> list[list[str]]:
    names = [n for n in ATTACKS if not only or any(o in n for o in only)]
    return [[n] for n in names] + ([names] if len(names) > 1 else [])


def _row(r: dict[str, Any]) -> str:
    label = "all at once" if len(r["attacks"]) > 1 else r["attacks"][0]
    return (
        f"| {label} | {r['round_trips']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
        f"{r['max_ms']:.1f} | {r['rss_start_mib']:.0f} -> {r['rss_peak_mib']:.0f} | "
        f"{r['relay_cores']:.2f} | {r['stored_sent']}/{r['stored_refused']}/"
        f"{r['stored_lost']} | {r['stored_accept_max_ms']:.0f} | "
        f"{r['fresh']}/{r['fresh_failed']} | {r['fresh_max_ms']:.0f} | "
        f"{sum(r['attack_attempts'].values()):,} |"
    )


HEADER: Final = (
    "| attack (issue 11 item) | round trips | p50 ms | p99 ms | max ms | relay RSS MiB | "
    "relay cores | stored sent/refused/lost | stored accepted within, max ms | "
    "new sessions/failed | new session within, max ms | attacker attempts |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.attacks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seconds", type=float, default=10.0, help="per scenario (default 10)")
    p.add_argument("--only", nargs="*", help="substrings of attack names")
    p.add_argument("--json", type=Path, help="write every result here")
    args = p.parse_args(argv)
    results = []
    print(HEADER)
    for names in scenarios(args.only):
        with tempfile.TemporaryDirectory(prefix="securechat-attacks-") as tmp:
            result = run_scenario(names, args.seconds, Path(tmp))
        results.append(result)
        print(_row(result), flush=True)
        for problem in (result["honest_errors"] or [])[:3] + result["attack_failures"]:
            print(f"  ! {problem}", file=sys.stderr)
    busy = [
        r
        for r in results
        if not r["round_trips"]
        or r["honest_errors"]
        or r["p99_ms"] > TARGET_P99_MS
        or r["rss_peak_mib"] > TARGET_RSS_MIB
        or r["stored_refused"]
        or r["stored_lost"]
        or r["fresh_failed"]
    ]
    print(
        f"\ntargets (p99 < {TARGET_P99_MS:.0f} ms, RSS < {TARGET_RSS_MIB:.0f} MiB, nothing "
        f"honest lost or refused): {'met' if not busy else f'missed in {len(busy)} scenarios'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
