"""A malicious relay double for invites: the real protocol (Noise XX + frames), a rendezvous
that pairs an opener with its joiner, and a hook through which every InviteData passes.

A TCP proxy cannot touch what travels inside the Noise link, so the double terminates
it, as a relay that is not honest would. ``tamper(from_opener, payload)`` gets every
InviteData (the kind is ``payload[1]``: 1 a PAKE message, 2 a sealed public line) and
returns what to forward instead (or None to drop it).

One thread per connection: a test double for two clients.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from securechat.core import dh, noise, wire
from securechat.errors import SecureChatError

Tamper = Callable[[bool, bytes], bytes | None]


class _Conn:
    def __init__(self, sock: socket.socket, conn: noise.NoiseConnection) -> None:
        self.sock, self.noise = sock, conn
        self.lock = threading.Lock()

    def send(self, *frames: wire.Frame) -> None:
        data = b"".join(wire.encode(f) for f in frames)
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(self.noise.send(data))


class TamperingRelay:
    def __init__(self, tamper: Tamper) -> None:
        self.tamper = tamper
        self.private = os.urandom(32)
        self.public = dh.public_key(self.private)
        self.seen: list[bytes] = []  # every InviteData payload as the clients sent it
        self._lock = threading.Lock()
        self._openers: dict[int, _Conn] = {}
        self._pairs: dict[int, tuple[_Conn, _Conn]] = {}
        self._next = 1
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        conn = noise.NoiseConnection(initiator=False, static_private=self.private, rng=os.urandom)
        decoder = wire.FrameDecoder()
        live: _Conn | None = None
        try:
            while not self._stop.is_set():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                _, plain, reply = conn.receive_data(data)
                if reply:
                    sock.sendall(reply)
                if live is None and conn.complete:
                    live = _Conn(sock, conn)
                    live.send(wire.Synced(), wire.PrekeyCount(0))
                if live is not None and plain:
                    for frame in decoder.feed(plain):
                        self._on_frame(live, frame)
        except (OSError, SecureChatError):
            pass
        finally:
            sock.close()
            if live is not None:
                self._left(live)

    def _left(self, c: _Conn) -> None:
        """As the relay does: the other party of a pair is told (PEER_LEFT)."""
        with self._lock:
            gone = [(p, pair) for p, pair in self._pairs.items() if c in pair]
            for plate, _ in gone:
                del self._pairs[plate]
        for plate, (opener, joiner) in gone:
            (joiner if c is opener else opener).send(
                wire.InviteClosed(plate, wire.INVITE_PEER_LEFT)
            )

    def _on_frame(self, c: _Conn, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Ping):
            c.send(wire.Pong(frame.nonce))
        elif isinstance(frame, wire.InviteOpen):
            with self._lock:
                plate, self._next = self._next, self._next + 1
                self._openers[plate] = c
            c.send(wire.InviteOpened(plate))
        elif isinstance(frame, wire.InviteJoin):
            with self._lock:
                opener = self._openers.pop(frame.nameplate, None)
                if opener is not None:
                    self._pairs[frame.nameplate] = (opener, c)
            if opener is None:
                c.send(wire.InviteClosed(frame.nameplate, wire.INVITE_NO_SUCH))
        elif isinstance(frame, wire.InviteData):
            with self._lock:
                pair = self._pairs.get(frame.nameplate)
                self.seen.append(frame.payload)
            if pair is None:
                return
            from_opener = c is pair[0]
            other = pair[1] if from_opener else pair[0]
            payload = self.tamper(from_opener, frame.payload)
            if payload is not None:
                other.send(wire.InviteData(frame.nameplate, payload))
