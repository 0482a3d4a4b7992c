"""The client side of the daemon: talk, send, receive and history through it (shell).

:func:`find` says whether a daemon answers for an identity (``NAME.sock`` in
the key directory); :class:`RpcClient` is one JSON-RPC connection (a reader
thread matches answers to calls and hands events to a callback);
:class:`RemoteMessenger` offers the :class:`~securechat.client.engine.Engine`
calls through it, so the front-ends run unchanged, and turns the daemon's
events back into the client's :mod:`~securechat.client.events`.

Errors come back as our own classes (the JSON-RPC error's ``data.type`` names
it, its code is the exit code), so a command that went through the daemon
prints the same line and exits with the same code as one that did not. A
daemon that goes away mid-command is a :class:`~securechat.errors.TransportError`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from securechat import errors
from securechat.client import app, keystore
from securechat.client.events import (
    ConnectionEvent,
    Event,
    MessageEvent,
    NoticeEvent,
    PresenceEvent,
    StatusEvent,
)
from securechat.client.peers import Conversation
from securechat.core import keys
from securechat.daemon import api, rpc, server
from securechat.errors import (
    InternalError,
    PeerKeyChangedError,
    SecureChatError,
    TransportError,
    UsageError,
)

MAX_HISTORY: Final = 1000  # history: the daemon's most per call
CALL_TIMEOUT: Final = 30.0  # seconds for one answer: the daemon answers in milliseconds
STATUS_CACHE: Final = 0.05  # seconds a status answer is reused (status lines poll it)
_WAIT_STEP: Final = 0.02
_RPC_USAGE: Final = (rpc.INVALID_PARAMS, rpc.INVALID_REQUEST, rpc.METHOD_NOT_FOUND)


def socket_of(key: str | None) -> Path:
    """Where the daemon of ``--key`` (or the only key) would listen."""
    path = keystore.resolve(key, keystore.PRIVATE_SUFFIX) if key else None
    if path is None:
        path = keystore.default_private_path()
    return keystore.home() / f"{path.stem}.sock"


def find(key: str | None) -> Path | None:
    """The socket of the identity's daemon if one answers there, else None."""
    path = socket_of(key)
    if not path.exists():
        return None
    return path if server.answers(path) else None


def error_from(body: dict[str, Any]) -> SecureChatError:
    """Our error class back from a JSON-RPC error (``data.type``), with its hint."""
    code = body.get("code")
    message = str(body.get("message", "the daemon refused"))
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    assert isinstance(data, dict)
    cls = getattr(errors, str(data.get("type", "")), None)
    exc: SecureChatError
    if isinstance(cls, type) and issubclass(cls, SecureChatError):
        try:
            exc = cls(message)
        except TypeError:
            exc = SecureChatError(message)
            exc.exit_code = int(data.get("exitCode", 1))
    elif code in _RPC_USAGE:
        exc = UsageError(f"the daemon refused the request: {message}")
    else:
        exc = InternalError(f"the daemon failed: {message}")
    if data.get("hint"):
        exc.hint = str(data["hint"])
    return exc


class RpcClient:
    """One connection to a daemon; thread-safe calls; events to ``on_event``."""

    def __init__(self, sock: socket.socket, on_event: Callable[[dict[str, Any]], None]) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._on_event = on_event
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._read, name="securechat-rpc-in", daemon=True)
        self._thread.start()

    @classmethod
    def connect(cls, path: Path, on_event: Callable[[dict[str, Any]], None]) -> RpcClient:
        try:
            sock = server.connect(path)
        except OSError as exc:
            raise TransportError(f"cannot reach the daemon at {path}: {exc}") from exc
        return cls(sock, on_event)

    def call(self, method: str, params: dict[str, Any], timeout: float = CALL_TIMEOUT) -> Any:
        req_id = next(self._ids)
        done, slot = threading.Event(), list[dict[str, Any]]()
        with self._lock:
            self._waiting[req_id] = (done, slot)
        try:
            line = rpc.encode(rpc.request(req_id, method, params))
            try:
                with self._write_lock:
                    self._sock.sendall(line)
            except OSError as exc:
                raise _lost() from exc
            if not done.wait(timeout):
                raise errors.DeliveryTimeoutError(f"the daemon did not answer {method} in time")
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)
        if not slot:
            raise _lost()
        reply = slot[0]
        if "error" in reply:
            raise error_from(reply["error"])
        return reply.get("result")

    def _read(self) -> None:
        try:
            for line in self._reader:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                if message.get("method") == "event" and isinstance(message.get("params"), dict):
                    self._on_event(message["params"])
                    continue
                with self._lock:
                    waiting = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
                if waiting is not None:
                    waiting[1].append(message)
                    waiting[0].set()
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            with self._lock:
                for done, _slot in self._waiting.values():
                    done.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(2.0)
        with contextlib.suppress(OSError, ValueError):
            self._reader.close()


def _lost() -> TransportError:
    return TransportError(
        "lost the connection to the daemon",
        hint="is 'securechat daemon' still running? what it accepted is in its outbox",
    )


@dataclass(frozen=True, slots=True)
class RemoteIdentity:
    """The daemon's identity as a front-end sees it: the public half only."""

    public: keys.PublicIdentity

    @property
    def name(self) -> str:
        return self.public.name


class _Synced:
    """``synced`` as the front-ends wait for it: asks the daemon."""

    def __init__(self, remote: RemoteMessenger) -> None:
        self._remote = remote

    def is_set(self) -> bool:
        return bool(self._remote.status().get("synced"))

    def wait(self, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (timeout if timeout is not None else CALL_TIMEOUT)
        while not self.is_set():
            if time.monotonic() >= deadline or self._remote.lost:
                return False
            time.sleep(_WAIT_STEP * 5)
        return True


class RemoteMessenger:
    """The :class:`~securechat.client.engine.Engine` of an identity whose daemon runs."""

    def __init__(self, path: Path, on_event: Callable[[Event], None]) -> None:
        self._emit = on_event
        self._client = RpcClient.connect(path, self._on_event)
        info = self._client.call("version", {})
        self.identity = RemoteIdentity(keys.PublicIdentity.from_line(str(info["publicKey"])))
        self.relay_address = str(info["relay"])
        self.start_cursor = int(info["startCursor"])
        self.cursor = int(info["cursor"])  # the last logged event seen
        self.refused: OrderedDict[bytes, str] = OrderedDict()
        self.synced = _Synced(self)
        self.received_count = 0
        self._sent: set[str] = set()
        self._status: tuple[float, dict[str, Any]] = (0.0, {})
        self._status_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    @property
    def lost(self) -> bool:
        return self._client.closed.is_set()

    # --- events ----------------------------------------------------------------------------

    def subscribe(self, since: int | None = None) -> None:
        params = {} if since is None else {"since": since}
        self._client.call("subscribe", params)

    def _on_event(self, event: dict[str, Any]) -> None:
        cursor = event.get("cursor")
        if isinstance(cursor, int):
            self.cursor = max(self.cursor, cursor)
        if event.get("code") == rpc.SLOW_SUBSCRIBER and isinstance(cursor, int):
            # Dropped for reading too slowly: resume from where we were (another thread:
            # this one must keep reading for the answer).
            threading.Thread(target=self.subscribe, args=(cursor,), daemon=True).start()
            return
        converted = to_event(event)
        if converted is None:
            return
        if isinstance(converted, MessageEvent):
            self.received_count += 1
        self._emit(converted)

    def replay_state(self) -> None:
        """Tell the front-end what a messenger of its own would have said on starting:
        the link's state and the peers' presence (the daemon's happened long ago)."""
        if self.connected:
            self._emit(
                ConnectionEvent(True, f"connected to {self.relay_address} (through the daemon)")
            )
        for peer in self._client.call("peers", {})["peers"]:
            if isinstance(peer.get("online"), bool):
                self._emit(PresenceEvent(str(peer["name"]), bool(peer["online"])))

    # --- the Engine calls ------------------------------------------------------------------

    def status(self, ids: Iterable[str] = ()) -> dict[str, Any]:
        wanted = list(ids)
        with self._status_lock:
            at, value = self._status
            if wanted or time.monotonic() - at > STATUS_CACHE or not value:
                params: dict[str, Any] = {"ids": wanted} if wanted else {}
                value = self._client.call("status", params)
                self._status = (time.monotonic(), value)
            return value

    @property
    def connected(self) -> bool:
        return not self.lost and bool(self.status().get("connected"))

    @property
    def fatal(self) -> SecureChatError | None:
        if self.lost:
            return _lost()
        body = self.status().get("fatal")
        return error_from(body) if isinstance(body, dict) else None

    @property
    def last_connect_error(self) -> SecureChatError | None:
        body = self.status().get("lastError") if not self.lost else None
        return error_from(body) if isinstance(body, dict) else None

    def pending(self) -> int:
        return int(self.status().get("pending", 0))

    def send_text(self, conv: Conversation, text: str) -> bytes:
        result = self._client.call("send", {"to": [p.to_line() for p in conv.peers], "text": text})
        self._sent.add(str(result["id"]))
        return bytes.fromhex(str(result["id"]))

    def check_peers(self, peers: Iterable[keys.PublicIdentity]) -> dict[str, PeerKeyChangedError]:
        lines = [p.to_line() for p in peers]
        if not lines:
            return {}
        result = self._client.call("checkPeers", {"to": lines})
        return {
            name: PeerKeyChangedError(
                str(text),
                hint=f"verify the new safety number with {name} out of band, then run "
                f"'securechat trust {name}'",
            )
            for name, text in dict(result["changed"]).items()
        }

    def trust(self, peer: keys.PublicIdentity) -> bool:
        return bool(self._client.call("trust", {"peer": peer.name})["replaced"])

    def history(self, conv: str, limit: int) -> list[dict[str, object]]:
        """The last ``limit`` messages, oldest first, a page of at most MAX_HISTORY at a time."""
        pages: list[list[dict[str, object]]] = []
        before: int | None = None
        while limit > 0:
            params: dict[str, Any] = {"conv": conv, "limit": min(limit, MAX_HISTORY)}
            if before is not None:
                params["before"] = before
            result = self._client.call("history", params)
            page = [record_of(item) for item in result["messages"]]
            pages.append(page)
            limit -= len(page)
            before = result["before"]
            if before is None or len(page) < params["limit"]:
                break
        return [record for page in reversed(pages) for record in page]

    def wait_all_accepted(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pending() == 0:
                break
            if self.fatal is not None:
                return False
            time.sleep(_WAIT_STEP)
        if self.pending() != 0:
            return False
        if self._sent:
            refused = self.status(sorted(self._sent)).get("refused", {})
            for hex_id, reason in dict(refused).items():
                self.refused[bytes.fromhex(hex_id)] = str(reason)
        return True


def record_of(item: dict[str, Any]) -> dict[str, object]:
    """An API message back as the history record the formatters take."""
    sender = item.get("sender", {})
    return {
        "sender": sender.get("name"),
        "fp": sender.get("fingerprint"),
        "verified": sender.get("verified"),
        "sent_ms": item.get("sentMs") or 0,
        "text": item.get("text"),
        "out": item.get("outgoing"),
        "status": int(api.WORD_STATUS.get(str(item.get("status")), 0)),
        "msg_id": item.get("id"),
        "conv": item.get("conversation", {}).get("id"),
    }


def to_event(event: dict[str, Any]) -> Event | None:
    """The daemon's event as the client's (None for what a front-end does not show)."""
    kind = event.get("type")
    if kind == "message" and not event.get("outgoing"):
        sender = event.get("sender", {})
        conv = event.get("conversation", {})
        return MessageEvent(
            str(conv.get("id")),
            bytes.fromhex(str(event.get("id"))),
            str(sender.get("name")),
            str(sender.get("fingerprint")),
            bool(sender.get("verified")),
            int(event.get("sentMs") or 0),
            str(event.get("text")),
            bool(conv.get("group")),
        )
    if kind == "receipt":
        return StatusEvent(bytes.fromhex(str(event.get("id"))), api.WORD_STATUS[event["status"]])
    if kind == "presence":
        return PresenceEvent(str(event.get("peer")), bool(event.get("online")))
    if kind == "connection":
        return ConnectionEvent(bool(event.get("connected")), str(event.get("detail")))
    if kind in ("notice", "error"):
        return NoticeEvent(str(event.get("message")), error=kind == "error")
    if kind == "keyChanged":
        peer = event.get("peer")
        return NoticeEvent(
            f"WARNING: the key for {peer!r} has CHANGED (was {event.get('oldFingerprint')}, "
            f"now {event.get('newFingerprint')}); verify it, then 'securechat trust {peer}'",
            error=True,
        )
    return None


@dataclass(slots=True)
class RemoteClient:
    """What :func:`securechat.client.app.open_client` yields, through a daemon."""

    identity: RemoteIdentity
    messenger: RemoteMessenger

    def conversation(self, peers: Iterable[keys.PublicIdentity]) -> Conversation:
        return app.conversation(self.identity.public, peers)


@contextlib.contextmanager
def attach(
    path: Path,
    relay: str | None,
    on_event: Callable[[Event], None],
    since: int | Callable[[RemoteMessenger], int | None] | None = None,
) -> Iterator[RemoteClient]:
    """A client of the daemon at ``path``, subscribed from ``since`` (None: from now;
    a function: asked once connected)."""
    remote = RemoteMessenger(path, on_event)
    try:
        if relay is not None and relay != remote.relay_address:
            on_event(
                NoticeEvent(
                    f"a daemon runs for {remote.identity.name}: using its relay "
                    f"{remote.relay_address}, not {relay}"
                )
            )
        remote.subscribe(since(remote) if callable(since) else since)
        remote.replay_state()
        yield RemoteClient(remote.identity, remote)
    finally:
        remote.close()
