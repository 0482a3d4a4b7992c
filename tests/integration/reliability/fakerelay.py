"""A malicious relay test double speaking the real protocol (Noise XX + wire frames).

A TCP proxy cannot see inside the Noise link, so this relay terminates it: it is
a real responder (``NoiseConnection`` + ``wire.FrameDecoder``) that routes
frames between real clients like the relay does (Accepted after "storing",
Deliver to the recipient's mailbox, prekey bundles, Synced, Pong), and passes
every Deliver through ``attack``: a policy that may flip bits, truncate,
duplicate, hold back (reorder), replay old frames, reflect a frame to its
sender, or attribute it to somebody else. It records what it forged, so the test
can count the rejections the clients must report.

One thread per connection: this is a test double for a handful of clients.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from securechat.core import wire

from noise_server import NoiseServerDouble, PeerConn

ATTACKS = ("honest", "flip", "truncate", "dup", "hold", "replay", "reflect", "wrong_sender")


@dataclass
class Tally:
    forged: int = 0  # copies that must be rejected with a notice (flip/truncate/reflect/...)
    silent: int = 0  # copies that must be silently recognised as duplicates (dup/replay)
    held: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


class FakeRelay(NoiseServerDouble):
    """See the module docstring. ``attack_rate`` 0 makes it an honest relay."""

    def __init__(self, seed: int, attack_rate: float = 0.5, port: int = 0) -> None:
        self.rnd = random.Random(seed)
        self.attack_rate = attack_rate
        # Lies a malicious relay can tell (issue 11 items 11 and 12), off by default:
        self.claim_delivered = False  # answer Accepted(2) for every Send and drop it
        self.refuse_too_large = False  # answer Error(TOO_LARGE) for every Send
        self.withhold_bundles: set[bytes] = set()  # identity keys answered "no bundle"
        self.corrupt_next: set[bytes] = set()  # senders whose next frame arrives broken, alone
        self.attack_only: bytes | None = None  # if set, frames of other senders pass untouched
        self.received: dict[str, int] = {}  # frames received, by type name (idle checks)
        self.tally = Tally()
        self._lock = threading.RLock()
        self._conns: dict[bytes, PeerConn] = {}  # mailbox -> live connection
        self._backlog: dict[bytes, list[wire.Deliver]] = {}  # mailbox -> unacked deliveries
        self._held: dict[bytes, list[wire.Deliver]] = {}
        self._history: dict[bytes, list[wire.Deliver]] = {}  # honest deliveries per mailbox
        self._keys: dict[bytes, bytes] = {}  # mailbox -> identity key
        self._signed: dict[bytes, bytes] = {}
        self._otks: dict[bytes, list[bytes]] = {}
        super().__init__(port)  # listening starts last: the tables above exist

    def _on_connect(self, c: PeerConn) -> None:
        box = wire.mailbox_address(c.key)
        with self._lock:
            self._keys[box] = c.key
            self._conns[box] = c
            backlog = list(self._backlog.get(box, []))
            count = len(self._otks.get(c.key, []))
        c.send(wire.PrekeyCount(count), *backlog, wire.Synced())

    def _on_frame(self, c: PeerConn, frame: wire.Frame) -> None:
        name = type(frame).__name__
        with self._lock:
            self.received[name] = self.received.get(name, 0) + 1
        if isinstance(frame, wire.Send) and self.refuse_too_large:
            c.send(wire.Error(wire.TOO_LARGE, frame.msg_id, "payload too large"))
        elif isinstance(frame, wire.Send) and self.claim_delivered:
            c.send(wire.Accepted(frame.msg_id, wire.STATUS_DELIVERED))  # and drop it
        elif isinstance(frame, wire.Send):
            self._route(c.key, frame.msg_id, frame.mailbox, frame.payload)
            c.send(wire.Accepted(frame.msg_id, wire.STATUS_STORED))
        elif isinstance(frame, wire.SendMulti):
            for box, payload in frame.recipients:
                self._route(c.key, frame.msg_id, box, payload)
            c.send(wire.Accepted(frame.msg_id, wire.STATUS_STORED))
        elif isinstance(frame, wire.Ack):
            done = set(frame.entries)
            box = wire.mailbox_address(c.key)
            with self._lock:
                self._backlog[box] = [
                    d for d in self._backlog.get(box, []) if (d.sender_key, d.msg_id) not in done
                ]
        elif isinstance(frame, wire.PublishPrekeys):
            with self._lock:
                if frame.signed_prekey:
                    self._signed[c.key] = frame.signed_prekey
                self._otks.setdefault(c.key, []).extend(frame.one_time_prekeys)
                count = len(self._otks[c.key])
            c.send(wire.PrekeyCount(count))  # as the real relay answers every publish
        elif isinstance(frame, wire.FetchPrekeys):
            with self._lock:
                otks = self._otks.get(frame.identity_key, [])
                otk = otks.pop(0) if otks else None
                signed = self._signed.get(frame.identity_key, b"")
                if frame.identity_key in self.withhold_bundles:
                    signed, otk = b"", None
            c.send(wire.Prekeys(frame.identity_key, signed, otk))
        elif isinstance(frame, wire.Ping):
            c.send(wire.Pong(frame.nonce))

    # --- routing and malice -------------------------------------------------------------------

    def _push(self, box: bytes, frames: list[wire.Deliver]) -> None:
        with self._lock:
            self._backlog.setdefault(box, []).extend(frames)
            conn = self._conns.get(box)
        if conn is not None and frames:
            conn.send(*frames)

    def _count(self, kind: str) -> None:
        self.tally.by_kind[kind] = self.tally.by_kind.get(kind, 0) + 1

    def _route(self, sender: bytes, msg_id: bytes, box: bytes, payload: bytes) -> None:
        honest = wire.Deliver(msg_id, sender, int(time.time() * 1000), payload)
        with self._lock:
            if sender in self.corrupt_next:
                self.corrupt_next.discard(sender)
                self._count("corrupt")
                broken = wire.Deliver(msg_id, sender, honest.timestamp_ms, payload[:-1])
                self._push(box, [broken])
                return
            spared = self.attack_only is not None and sender != self.attack_only
            kind = (
                "honest"
                if spared or self.rnd.random() >= self.attack_rate
                else self.rnd.choice(ATTACKS[1:])
            )
            out = self._attack(kind, honest, box)
            self._history.setdefault(box, []).append(honest)
            self._count(kind)
            if kind != "hold":
                out += [(box, d) for d in self._held.pop(box, [])]
        for target in dict.fromkeys(b for b, _ in out):
            self._push(target, [d for b, d in out if b == target])

    def _forge(
        self, honest: wire.Deliver, payload: bytes, sender: bytes | None = None
    ) -> wire.Deliver:
        self.tally.forged += 1
        return wire.Deliver(
            os.urandom(16), sender or honest.sender_key, honest.timestamp_ms, payload
        )

    def _attack(
        self, kind: str, honest: wire.Deliver, box: bytes
    ) -> list[tuple[bytes, wire.Deliver]]:
        p = honest.payload
        out: list[wire.Deliver] = [honest]
        if kind == "flip":
            forged = bytearray(p)
            forged[self.rnd.randrange(len(p))] ^= 1 << self.rnd.randrange(8)
            out = [self._forge(honest, bytes(forged)), honest]
        elif kind == "truncate":
            out = [self._forge(honest, p[: self.rnd.randrange(1, len(p))]), honest]
        elif kind == "dup":
            self.tally.silent += 1
            out = [honest, honest]
        elif kind == "hold":
            self.tally.held += 1
            self._held.setdefault(box, []).append(honest)
            out = []
        elif kind == "replay" and self._history.get(box):
            self.tally.silent += 1
            out = [honest, self.rnd.choice(self._history[box])]
        elif kind == "reflect" and box in self._keys:
            back = wire.mailbox_address(honest.sender_key)
            return [(box, honest), (back, self._forge(honest, p, self._keys[box]))]
        elif kind == "wrong_sender":
            others = [k for b, k in self._keys.items() if b != box and k != honest.sender_key]
            if others:
                out = [self._forge(honest, p, self.rnd.choice(others)), honest]
        return [(box, d) for d in out]

    def flush(self) -> None:
        """Release every held-back frame (the relay's 'reordering' ends)."""
        with self._lock:
            held, self._held = self._held, {}
        for box, frames in held.items():
            self._push(box, frames)


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()

    def _on_close(self, c: PeerConn) -> None:
        with self._lock:
            box = wire.mailbox_address(c.key)
            if self._conns.get(box) is c:
                del self._conns[box]
