"""The naive baseline relay: how the old socket-chat tutorials route frames.

Kept on purpose as the yardstick of issue 7, so do not "fix" it: one thread
per client, ``recv(4)`` then ``recv(n)`` per frame, one ``sendall`` per
delivery, a global table of clients. Plain TCP, no crypto, no acks.

Framing (all integers big-endian), every frame is ``u32 length || body``:

- ``b"H" || u32 mailbox``: register this connection as ``mailbox``.
- ``b"S" || u16 count || count * u32 mailbox || payload``: send ``payload``
  to every listed mailbox (count 1 is direct routing, more is fan-out).
- relay to client: ``b"D" || payload`` once per delivery.

Run: ``python -m bench.naive_relay --port 0``; prints ``listening on HOST:PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import struct
import sys
import threading
from typing import Final

HOST: Final = "127.0.0.1"
MAX_FRAME: Final = 1 << 20
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")

_clients: dict[int, tuple[socket.socket, threading.Lock]] = {}
_clients_lock = threading.Lock()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Loop on recv until n bytes arrive, as the tutorials do."""
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _deliver(mailbox: int, payload: bytes) -> None:
    with _clients_lock:
        entry = _clients.get(mailbox)
    if entry is None:
        return  # offline: the naive relay just drops it
    sock, lock = entry
    frame = _U32.pack(1 + len(payload)) + b"D" + payload
    try:
        with lock:
            sock.sendall(frame)
    except OSError:
        pass


def _handle(sock: socket.socket) -> None:
    mailbox = -1
    try:
        while True:
            header = _recv_exact(sock, 4)
            if header is None:
                return
            (length,) = _U32.unpack(header)
            if length == 0 or length > MAX_FRAME:
                return
            body = _recv_exact(sock, length)
            if body is None:
                return
            kind = body[:1]
            if kind == b"H":
                (mailbox,) = _U32.unpack_from(body, 1)
                with _clients_lock:
                    _clients[mailbox] = (sock, threading.Lock())
            elif kind == b"S":
                (count,) = _U16.unpack_from(body, 1)
                start = 3 + 4 * count
                payload = body[start:]
                for i in range(count):
                    (dest,) = _U32.unpack_from(body, 3 + 4 * i)
                    _deliver(dest, payload)
            else:
                return
    except OSError:
        return
    finally:
        with _clients_lock:
            if mailbox in _clients and _clients[mailbox][0] is sock:
                del _clients[mailbox]
        sock.close()


def serve(port: int) -> None:
    """Accept forever, one daemon thread per client."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((HOST, port))
    server.listen(4096)
    host, real_port = server.getsockname()
    print(f"listening on {host}:{real_port}", flush=True)
    while True:
        client, _ = server.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_handle, args=(client,), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="naive thread-per-client relay (baseline)")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
