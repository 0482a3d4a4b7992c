"""Client side of the three systems, as sans-I/O objects the load loop pumps.

Each client object is one connection. The load loop (``bench/load.py``) owns
the socket; it calls ``start()`` once connected, ``on_data(data, now_ns)`` for
every chunk read (writing back what it returns) and, for senders,
``encode_batch(k, ts_ns)`` to get ``k`` frames in one buffer. Counters live on
the object so the loop can sum them cheaply:

- ``ready``: connected, subscribed / registered / authenticated.
- ``acked``: frames the server acknowledged to this sender (the window).
- ``delivered``: frames this receiver got; ``lat`` the latencies (ns) of
  those whose payload timestamp lies in the measured window.

Every payload starts with the send time (``time.monotonic_ns()``, u64
big-endian, a clock shared by every process of the machine), so latency is
receive time minus that stamp. Receivers of Redis and of the naive relay
parse fixed-size records (the size is known from the payload size) and
check every record's header with one C-speed ``bytes.count``, so that the
load generator stays cheap; the securechat client runs the real decoder.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any, Final

TS: Final = struct.Struct(">Q")


def make_payload(size: int) -> bytes:
    """Filler after the 8-byte timestamp (incompressible is irrelevant here)."""
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


class Client:
    """Common counters and the latency window filter."""

    def __init__(self) -> None:
        self.ready = False
        self.acked = 0
        self.delivered = 0
        self.errors = 0
        self.lat: list[int] = []
        self.accept_lat: list[int] = []
        self.win_lo = 0
        self.win_hi = 0  # record latencies of frames stamped in [win_lo, win_hi)

    def start(self) -> bytes:
        return b""

    def on_data(self, data: bytes, now: int) -> bytes:
        raise NotImplementedError

    def encode_batch(self, k: int, ts: int) -> bytes:
        raise NotImplementedError

    def _stamps(self, buf: bytes, first: int, stride: int, n: int, now: int) -> None:
        lo, hi, lat = self.win_lo, self.win_hi, self.lat
        unpack = TS.unpack_from
        for i in range(n):
            (ts,) = unpack(buf, first + i * stride)
            if lo <= ts < hi:
                lat.append(now - ts)


class FixedRecords(Client):
    """Receiver of fixed-size records: ``prefix || payload || suffix``."""

    def __init__(self, prefix: bytes, size: int, suffix: bytes, greeting: bytes, confirm: bytes):
        super().__init__()
        self.prefix = prefix
        self.stride = len(prefix) + size + len(suffix)
        self.greeting = greeting
        self.confirm = confirm
        self.buf = b""

    def start(self) -> bytes:
        if not self.confirm:
            self.ready = True
        return self.greeting

    def _framed(self, buf: bytes, n: int, end: int) -> bool:
        """Every record starts with the prefix: one strided slice per prefix byte (C speed)."""
        stride, prefix = self.stride, self.prefix
        return all(buf[j:end:stride] == prefix[j : j + 1] * n for j in range(len(prefix)))

    def on_data(self, data: bytes, now: int) -> bytes:
        buf = self.buf + data if self.buf else data
        if not self.ready:
            if len(buf) < len(self.confirm):
                self.buf = buf
                return b""
            if not buf.startswith(self.confirm):
                raise RuntimeError(f"unexpected reply {buf[:60]!r}")
            buf = buf[len(self.confirm) :]
            self.ready = True
        stride = self.stride
        n = len(buf) // stride
        if n:
            end = n * stride
            if not self._framed(buf, n, end):
                raise RuntimeError("receiver lost framing")
            self.delivered += n
            if self.win_hi:
                self._stamps(buf, len(self.prefix), stride, n, now)
            self.buf = buf[end:]
        else:
            self.buf = buf
        return b""


# --- Redis pub/sub, raw RESP --------------------------------------------------------------


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def redis_receiver(channel: bytes, size: int) -> FixedRecords:
    sub = b"*2\r\n" + _bulk(b"SUBSCRIBE") + _bulk(channel)
    confirm = b"*3\r\n" + _bulk(b"subscribe") + _bulk(channel) + b":1\r\n"
    prefix = b"*3\r\n" + _bulk(b"message") + _bulk(channel) + b"$%d\r\n" % size
    return FixedRecords(prefix, size, b"\r\n", sub, confirm)


class RedisSender(Client):
    """PUBLISH pipelined; each ``:n`` integer reply is one ack for the window."""

    def __init__(self, channel: bytes, size: int) -> None:
        super().__init__()
        self.ready = True
        self.head = b"*3\r\n" + _bulk(b"PUBLISH") + _bulk(channel) + b"$%d\r\n" % size
        self.body = make_payload(size - TS.size) + b"\r\n"

    def on_data(self, data: bytes, now: int) -> bytes:
        self.acked += data.count(b"\n")
        if b"-" in data[:1]:
            self.errors += 1
        return b""

    def encode_batch(self, k: int, ts: int) -> bytes:
        return (self.head + TS.pack(ts) + self.body) * k


# --- the naive relay -------------------------------------------------------------------


def naive_receiver(mailbox: int, size: int) -> FixedRecords:
    hello = struct.pack(">IcI", 5, b"H", mailbox)
    prefix = struct.pack(">Ic", 1 + size, b"D")
    return FixedRecords(prefix, size, b"", hello, b"")


class NaiveSender(Client):
    """One ``S`` frame per message with its recipient list; the relay sends no acks."""

    def __init__(self, mailboxes: list[int], size: int) -> None:
        super().__init__()
        self.ready = True
        body_len = 1 + 2 + 4 * len(mailboxes) + size
        self.head = struct.pack(">IcH", body_len, b"S", len(mailboxes)) + b"".join(
            struct.pack(">I", m) for m in mailboxes
        )
        self.body = make_payload(size - TS.size)

    def on_data(self, data: bytes, now: int) -> bytes:
        return b""

    def encode_batch(self, k: int, ts: int) -> bytes:
        return (self.head + TS.pack(ts) + self.body) * k


# --- securechat: Noise XX + wire frames -------------------------------------------------


def client_key(run_seed: bytes, role: str, index: int) -> bytes:
    """A fresh X25519 static key per client and run, derivable by every load process."""
    material = run_seed + role.encode() + index.to_bytes(4, "big")
    return hashlib.blake2b(material, digest_size=32).digest()


def public_of(private: bytes) -> bytes:
    from securechat.core import dh

    return dh.public_key(private)


class SecureChatClient(Client):
    """A real client: Noise XX initiator, then wire frames inside transport records.

    Senders pipeline ``Send`` (or ``SendMulti``) frames, many per Noise record;
    receivers answer every batch of ``Deliver`` frames with one ``Ack`` frame.
    """

    def __init__(self, private: bytes, mailboxes: list[bytes], size: int, multi: bool) -> None:
        super().__init__()
        from securechat.core import noise, wire

        self.wire = wire
        self.conn = noise.NoiseConnection(initiator=True, static_private=private, rng=os.urandom)
        self.decoder = wire.FrameDecoder()
        self.mailboxes = mailboxes
        self.multi = multi
        self.body = make_payload(size - TS.size)
        self.counter = 0
        self.tag = os.urandom(8)
        self.pending: dict[bytes, int] = {}
        self.record_accept = False
        self.stored = 0  # Accepted with status 1: committed to the relay's store
        self.last_error = ""

    def start(self) -> bytes:
        return self.conn.initiate()

    def on_data(self, data: bytes, now: int) -> bytes:
        events, plain, reply = self.conn.receive_data(data)
        if events:
            self.ready = True
        if not plain:
            return reply
        wire = self.wire
        acks: list[tuple[bytes, bytes]] = []
        lo, hi, lat = self.win_lo, self.win_hi, self.lat
        pending = self.pending
        for frame in self.decoder.feed(plain):
            kind = type(frame)
            if kind is wire.Deliver:
                self.delivered += 1
                acks.append((frame.sender_key, frame.msg_id))  # type: ignore[union-attr]
                if hi:
                    (ts,) = TS.unpack_from(frame.payload)  # type: ignore[union-attr]
                    if lo <= ts < hi:
                        lat.append(now - ts)
            elif kind is wire.Accepted:
                self.acked += 1
                if frame.status == wire.STATUS_STORED:  # type: ignore[union-attr]
                    self.stored += 1
                sent = pending.pop(frame.msg_id, 0)  # type: ignore[union-attr]
                if self.record_accept and sent:
                    self.accept_lat.append(now - sent)
            elif kind is wire.Error:
                self.errors += 1
                self.acked += 1
                pending.pop(frame.msg_id, 0)  # type: ignore[union-attr]
                self.last_error = f"{frame.code}: {frame.reason}"  # type: ignore[union-attr]
        if acks:
            out = [
                wire.encode(wire.Ack(tuple(acks[i : i + wire.MAX_ACKS])))
                for i in range(0, len(acks), wire.MAX_ACKS)
            ]
            reply += self.conn.send(b"".join(out))
        return reply

    def encode_batch(self, k: int, ts: int) -> bytes:
        wire = self.wire
        payload = TS.pack(ts) + self.body
        frames = []
        pending = self.pending
        for _ in range(k):
            self.counter += 1
            msg_id = self.tag + self.counter.to_bytes(8, "big")
            pending[msg_id] = ts
            if self.multi:
                frame: Any = wire.SendMulti(msg_id, tuple((m, payload) for m in self.mailboxes))
            else:  # rotate over the targets (spreads offline frames over mailboxes)
                box = self.mailboxes[self.counter % len(self.mailboxes)]
                frame = wire.Send(msg_id, box, payload)
            frames.append(wire.encode(frame))
        return self.conn.send(b"".join(frames))
