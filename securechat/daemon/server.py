"""The daemon's transports: a Unix socket in the key directory, and stdin/stdout (shell).

Each connection is read by one thread, one request at a time (so a client's
requests are answered in the order sent and at most one is in flight; the
kernel's socket buffer, which is bounded, holds what it pipelines), and written
by another, from a queue: answers always get in (at most one per request in
flight), events only while fewer than :data:`MAX_QUEUED_EVENTS` wait, else the
subscription is dropped with an error event (see :mod:`securechat.daemon.service`).

Who may connect: the socket file is ``0600`` in the key directory (created
``0700``), and a connection whose peer (``SO_PEERCRED``) runs as another user is
closed at once, before it reads anything. A line longer than
:data:`~securechat.daemon.rpc.MAX_REQUEST_BYTES` closes its connection after an
error (a line cannot be resynchronised without reading it whole). At most
:data:`MAX_CONNECTIONS` connections at once.

Start: refuse if a daemon already answers on the socket; remove a stale socket
file (one nobody answers on) only while holding the identity's lock, so two
daemons starting together cannot both bind.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import Any, BinaryIO, Final

from securechat.daemon import rpc
from securechat.daemon.service import Caller, Daemon
from securechat.errors import InUseError, StorageError

MAX_CONNECTIONS: Final = 32  # chosen: a talk, a few commands, a web page or two, bots
MAX_QUEUED_EVENTS: Final = 1000  # per connection, then the subscription is dropped
LISTEN_BACKLOG: Final = 16
CONNECT_PROBE: Final = 1.0  # seconds to see whether a daemon answers on the socket
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid
# sun_path is 108 bytes on Linux; a longer path is reached through /proc/self/fd.
_SUN_PATH_MAX: Final = 100


class Outbox:
    """A connection's queue of lines to write: answers always, events while there is room."""

    def __init__(self, max_events: int = MAX_QUEUED_EVENTS) -> None:
        self._lines: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._events = 0
        self._max = max_events
        self._cond = threading.Condition()
        self.closed = False

    def put(self, message: dict[str, Any]) -> None:
        self._push(rpc.encode(message), event=False)

    def offer(self, event: dict[str, Any]) -> bool:
        with self._cond:
            if self._events >= self._max:
                return False
            self._push(rpc.encode(rpc.notification("event", event)), event=True)
            return True

    def fail(self, event: dict[str, Any]) -> None:
        self._push(rpc.encode(rpc.notification("event", event)), event=False)

    def _push(self, line: bytes, *, event: bool) -> None:
        with self._cond:
            if self.closed:
                return
            self._lines.append((line, event))
            self._events += event
            self._cond.notify()

    def take(self) -> bytes | None:
        """The next line, waiting for one; None once closed."""
        with self._cond:
            while not self._lines and not self.closed:
                self._cond.wait()
            if self.closed:
                return None
            line, event = self._lines.popleft()
            self._events -= event
            return line

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._lines.clear()
            self._cond.notify_all()


def serve_connection(daemon: Daemon, reader: BinaryIO, writer: BinaryIO) -> None:
    """Answer requests from ``reader`` on ``writer`` until either ends (blocks)."""
    outbox = Outbox()
    caller = Caller(outbox)
    writing = threading.Thread(
        target=_write_loop, args=(outbox, writer), name="securechat-rpc-out", daemon=True
    )
    writing.start()
    try:
        while not outbox.closed:
            line = reader.readline(rpc.MAX_REQUEST_BYTES + 1)
            if not line:
                break
            if len(line) > rpc.MAX_REQUEST_BYTES:
                outbox.put(
                    rpc.error(
                        None,
                        rpc.RpcError(
                            rpc.INVALID_REQUEST,
                            f"request longer than {rpc.MAX_REQUEST_BYTES} bytes; closing",
                        ),
                    )
                )
                break
            if line.strip():
                _answer(daemon, caller, line)
    except OSError:
        pass  # the client went away mid-line
    finally:
        daemon.close(caller)
        _drain_then_close(outbox, writing)


def _answer(daemon: Daemon, caller: Caller, line: bytes) -> None:
    try:
        request = rpc.parse(line)
    except rpc.RpcError as exc:
        caller_outbox(caller).put(rpc.error(rpc.request_id(exc), exc))
        return
    try:
        value = daemon.call(request, caller)
    except rpc.RpcError as exc:
        reply = rpc.error(request.id, exc)
    except Exception as exc:  # a bug: answer it, keep the daemon up
        reply = rpc.error(
            request.id,
            rpc.RpcError(rpc.INTERNAL_ERROR, f"internal error ({type(exc).__name__}); a bug"),
        )
    else:
        reply = rpc.result(request.id, value)
    if not request.notify:
        caller_outbox(caller).put(reply)
    for after in caller.after:
        after()
    caller.after.clear()


def caller_outbox(caller: Caller) -> Outbox:
    sink = caller.sink
    assert isinstance(sink, Outbox)
    return sink


def _write_loop(outbox: Outbox, writer: BinaryIO) -> None:
    while (line := outbox.take()) is not None:
        try:
            writer.write(line)
            writer.flush()
        except (OSError, ValueError):
            outbox.close()
            return


def _drain_then_close(outbox: Outbox, writing: threading.Thread) -> None:
    """Let the answers already queued go out (briefly), then stop the writer."""
    for _ in range(50):
        with outbox._cond:
            if not outbox._lines:
                break
        writing.join(0.02)
    outbox.close()
    writing.join(1.0)


# --- the Unix socket ---------------------------------------------------------------------


def _address(path: Path) -> tuple[str, int | None]:
    """A path short enough for sun_path: as is, or through a directory descriptor."""
    text = str(path)
    if len(text.encode()) <= _SUN_PATH_MAX:
        return text, None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def connect(path: Path, timeout: float | None = CONNECT_PROBE) -> socket.socket:
    """A connected socket to the daemon at ``path``; OSError if none answers."""
    address, fd = _address(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    finally:
        if fd is not None:
            os.close(fd)
    return sock


def answers(path: Path) -> bool:
    """Whether a daemon listens at ``path`` (a stale file or no file: False)."""
    try:
        connect(path).close()
    except OSError:
        return False
    return True


class SocketServer:
    """Accepts connections on ``NAME.sock`` and serves each in its own thread."""

    def __init__(self, daemon: Daemon, path: Path) -> None:
        self.daemon = daemon
        self.path = path
        self._count = 0
        self._count_lock = threading.Lock()
        self._stopped = threading.Event()
        if answers(path):
            raise InUseError(
                f"a daemon for {daemon.account} already runs (it answers on {path})",
                hint="use it: talk, send, receive, history and web go through it",
            )
        self._sock = self._bind(path)
        self._thread = threading.Thread(target=self._accept_loop, name="securechat-accept")

    def _bind(self, path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise StorageError(
                    f"{path} exists and is not a socket", hint="move it away, then start again"
                )
            path.unlink()  # stale: nobody answered, and we hold the identity's lock
        address, fd = _address(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise StorageError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        finally:
            if fd is not None:
                os.close(fd)
        return sock

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(2.0)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not _same_user(conn) or not self._admit():
                _refuse(conn)
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="securechat-rpc", daemon=True
            ).start()

    def _admit(self) -> bool:
        with self._count_lock:
            if self._count >= MAX_CONNECTIONS:
                return False
            self._count += 1
            return True

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as reader, conn.makefile("wb") as writer:
                serve_connection(self.daemon, reader, writer)
        except OSError:
            pass
        finally:
            with self._count_lock:
                self._count -= 1


def _same_user(conn: socket.socket) -> bool:
    """Only our own user (or root) may talk to our daemon, whatever the file's mode."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return True  # no peer credentials on this system: the 0600 socket file decides
    _pid, uid, _gid = _UCRED.unpack(raw)
    return uid in (os.getuid(), 0)


def _refuse(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        busy = rpc.RpcError(rpc.BUSY, "refused: too many connections, or another user")
        conn.sendall(rpc.encode(rpc.error(None, busy)))
    conn.close()
