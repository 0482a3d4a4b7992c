"""Heap allocations the relay makes per Send -> Deliver -> Ack round trip.

``python -m bench.allocs [--tree DIR] [--rounds N] [--batches N]``

Why a count and not a time: a restructuring of the delivery path (actions
returned instead of methods called) can cost a few objects per frame, which a
throughput run on a busy 2-core machine cannot see but a relay doing 30k
frames/s pays for in allocator and garbage-collector time. So the relay runs
in a child process whose every ``malloc``/``calloc``/``realloc`` is counted
(``PYTHONMALLOC=malloc``, so that Python objects reach libc too, and an
``LD_PRELOAD`` shim compiled here with ``cc``), and clients in this process
drive it in lock step: one frame in flight at a time, so each loop turn of
the relay handles exactly one frame and the count per round trip is
deterministic (up to the relay's once-a-second timers, amortised over the
batch).

Rounds: ``direct`` (alice Sends to bob; bob Acks; alice gets Accepted(2)) and
``multi`` (alice SendMultis to four recipients, each Acks). ``--tree DIR``
measures the ``securechat/`` of another tree (a ``git worktree`` of the base
commit), so the figure of a change is a before/after pair.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
MULTI_RECIPIENTS = 4
PAYLOAD = bytes(range(256))
TIMEOUT_S = 10.0

_SHIM = r"""
#include <stddef.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
static unsigned long count;
#define COUNT() __atomic_add_fetch(&count, 1, __ATOMIC_RELAXED)
void *malloc(size_t n) { COUNT(); return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { COUNT(); return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { COUNT(); return __libc_realloc(p, n); }
unsigned long alloc_count(void) { return __atomic_load_n(&count, __ATOMIC_RELAXED); }
"""


def _build_shim(workdir: Path) -> Path:
    source = workdir / "count_alloc.c"
    source.write_text(_SHIM)
    lib = workdir / "count_alloc.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return lib


def _relay_child() -> None:
    """The relay under measurement (run by ``_start``): answers ``count`` on stdin."""
    import ctypes

    from securechat.relay.limits import RelayConfig
    from securechat.relay.server import Relay

    counter = ctypes.CDLL(os.environ["ALLOC_SHIM"]).alloc_count
    counter.restype = ctypes.c_ulong
    data = Path(tempfile.mkdtemp(prefix="securechat-allocs-"))
    relay = Relay(RelayConfig(host="127.0.0.1", port=0, data_dir=data, sync_full=False))
    relay.start()
    print(relay.address[1], relay.public.hex(), flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            print(counter(), flush=True)
        else:
            break
    relay.stop()


class _Client:
    """A minimal blocking client: handshake, frames out, frames in (lock step)."""

    def __init__(self, port: int) -> None:
        from securechat.core import dh, wire
        from securechat.core.noise import NoiseConnection

        self.wire = wire
        private = os.urandom(32)
        self.identity = dh.public_key(private)
        self.mailbox = wire.mailbox_address(self.identity)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.noise = NoiseConnection(initiator=True, static_private=private, rng=os.urandom)
        self.decoder = wire.FrameDecoder()
        self.frames: list[Any] = []
        self.sock.sendall(self.noise.initiate())
        while not self.noise.complete:
            _, plain, reply = self.noise.receive_data(self._recv())
            if reply:
                self.sock.sendall(reply)
            self.frames += self.decoder.feed(plain)
        self.wait_for(wire.PrekeyCount)  # Synced, then PrekeyCount: the connection is live

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the relay closed the connection")
        return data

    def send(self, frame: Any) -> None:
        self.sock.sendall(self.noise.send(self.wire.encode(frame)))

    def wait_for(self, kind: type) -> Any:
        while True:
            for i, frame in enumerate(self.frames):
                if isinstance(frame, kind):
                    del self.frames[i]
                    return frame
            _, plain, _ = self.noise.receive_data(self._recv())
            self.frames += self.decoder.feed(plain)


def _round(kind: str, alice: _Client, others: list[_Client], n: int) -> None:
    wire = alice.wire
    for _ in range(n):
        msg_id = os.urandom(wire.ID_SIZE)  # never a retry (the relay answers those itself)
        targets = others[:1] if kind == "direct" else others
        if kind == "direct":
            alice.send(wire.Send(msg_id, targets[0].mailbox, PAYLOAD))
        else:
            alice.send(wire.SendMulti(msg_id, tuple((t.mailbox, PAYLOAD) for t in targets)))
        for target in targets:
            deliver = target.wait_for(wire.Deliver)
            target.send(wire.Ack(((deliver.sender_key, deliver.msg_id),)))
        accepted = alice.wait_for(wire.Accepted)
        assert accepted.status == wire.STATUS_DELIVERED, accepted


def _ask(child: subprocess.Popen[str]) -> int:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("count\n")
    child.stdin.flush()
    return int(_readline(child.stdout))


def _readline(stream: IO[str]) -> str:
    ready, _, _ = select.select([stream], [], [], TIMEOUT_S)
    if not ready:
        raise TimeoutError("the relay under measurement did not answer")
    return stream.readline()


def measure(tree: Path, kind: str, rounds: int, batches: int, shim: Path) -> list[float]:
    """Allocations per round trip in each batch (relay process only)."""
    env = dict(os.environ, PYTHONMALLOC="malloc", LD_PRELOAD=str(shim), ALLOC_SHIM=str(shim))
    env["PYTHONPATH"] = str(tree)  # its securechat/, whatever the editable install says
    child = subprocess.Popen(
        [sys.executable, __file__, "--child"],
        cwd=tree,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(_readline(child.stdout).split()[0])
        alice = _Client(port)
        others = [_Client(port) for _ in range(MULTI_RECIPIENTS)]
        _round(kind, alice, others, rounds // 4)  # warm-up: caches, free lists, dicts grown
        per_round = []
        for _ in range(batches):
            before = _ask(child)
            _round(kind, alice, others, rounds)
            per_round.append((_ask(child) - before) / rounds)
        return per_round
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.allocs", description=__doc__)
    p.add_argument("--tree", type=Path, default=ROOT, help="tree holding securechat/")
    p.add_argument("--rounds", type=int, default=2000, help="round trips per batch")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--kind", choices=("direct", "multi", "both"), default="both")
    args = p.parse_args(argv)
    kinds = ("direct", "multi") if args.kind == "both" else (args.kind,)
    with tempfile.TemporaryDirectory() as tmp:
        shim = _build_shim(Path(tmp))
        for kind in kinds:
            start = time.monotonic()
            batches = measure(args.tree.resolve(), kind, args.rounds, args.batches, shim)
            text = " ".join(f"{b:.2f}" for b in batches)
            print(
                f"{kind}: {statistics.median(batches):.2f} allocations per round trip"
                f" (median of batches: {text}; {time.monotonic() - start:.1f} s)"
            )
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _relay_child()
    else:
        raise SystemExit(main())
