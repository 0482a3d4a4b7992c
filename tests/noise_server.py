"""The plumbing of the relay test doubles: a Noise XX responder on a loopback port, one
thread per connection, frames in through hooks and out through :class:`PeerConn`.

Subclasses (``reliability/fakerelay.py``, ``invite_fakerelay.py``) decide what a frame
does; this module only listens, runs the handshake and decodes. A test double for a
handful of clients, not a relay: stopped with :meth:`NoiseServerDouble.close`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

from securechat.core import dh, noise, wire
from securechat.errors import SecureChatError


class PeerConn:
    """One client's authenticated link; ``send`` is safe from any thread."""

    def __init__(self, sock: socket.socket, conn: noise.NoiseConnection, key: bytes) -> None:
        self.sock, self.noise, self.key = sock, conn, key
        self.lock = threading.Lock()

    def send(self, *frames: wire.Frame) -> None:
        data = b"".join(wire.encode(f) for f in frames)
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(self.noise.send(data))


class NoiseServerDouble:
    """Listens on 127.0.0.1 (``port`` 0: a free one) under a fresh relay key."""

    def __init__(self, port: int = 0) -> None:
        self.private = os.urandom(32)
        self.public = dh.public_key(self.private)
        self._stop = threading.Event()
        self._socks: set[socket.socket] = set()
        self._socks_lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    # --- hooks ---------------------------------------------------------------------------------
    def _on_connect(self, c: PeerConn) -> None:
        """The handshake is done."""

    def _on_frame(self, c: PeerConn, frame: wire.Frame) -> None:
        """One frame from ``c``."""

    def _on_close(self, c: PeerConn) -> None:
        """``c`` is gone (closed by either side)."""

    # --- plumbing ------------------------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._socks_lock:
            for sock in self._socks:
                sock.close()
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
        with self._socks_lock:
            self._socks.add(sock)
        sock.settimeout(0.2)
        conn = noise.NoiseConnection(initiator=False, static_private=self.private, rng=os.urandom)
        decoder = wire.FrameDecoder()
        live: PeerConn | None = None
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
                if live is None and conn.complete and conn.remote_static is not None:
                    live = PeerConn(sock, conn, conn.remote_static)
                    self._on_connect(live)
                if live is not None and plain:
                    for frame in decoder.feed(plain):
                        self._on_frame(live, frame)
        except (OSError, SecureChatError):
            pass
        finally:
            if live is not None:
                self._on_close(live)
            sock.close()
            with self._socks_lock:
                self._socks.discard(sock)
