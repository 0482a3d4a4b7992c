"""The daemon as a real process, and a plain JSON-RPC line client for the tests."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay_fixture import RelayProcess as Relay
from relay_fixture import cli_cmd, stop_process
from relay_fixture import cli_env as env_for
from relayclient import PipeDrain

LISTENING = re.compile(r"listening on (.+)$")
WEB_URL = re.compile(r"^http://127\.0\.0\.1:\S+")
START_TIMEOUT = 30.0  # a busy 2-core machine: Python start, key, store
CALL_TIMEOUT = 10.0


@dataclass
class Daemon:
    """``securechat daemon --key NAME`` on a relay; stopped by its PID."""

    proc: subprocess.Popen[str]
    socket: Path
    log: PipeDrain

    @classmethod
    def start(cls, home: Path, key: str, relay: Relay, *extra: str) -> Daemon:
        proc = subprocess.Popen(
            [*cli_cmd(), "daemon", "--key", key, "--relay", relay.address, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(home, PYTHONFAULTHANDLER="1"),
            cwd=home.parent,
        )
        assert proc.stderr is not None
        log = PipeDrain(proc.stderr)
        match = log.wait_for(LISTENING, START_TIMEOUT)
        if match is not None:
            return cls(proc, Path(match.group(1).strip()), log)
        # Stuck: SIGABRT makes faulthandler print every thread's stack into the log.
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        raise RuntimeError(
            f"daemon did not start within {START_TIMEOUT}s (exit {proc.returncode}): {log.text()}"
        )

    def stop(self) -> int:
        stop_process(self.proc)
        self.log.text()
        return self.proc.returncode


@dataclass
class LineRpc:
    """JSON-RPC over a byte stream: one JSON object per line; events kept in order."""

    reader: Any
    writer: Any
    closer: Any = None
    events: deque[dict[str, Any]] = field(default_factory=deque)
    replies: dict[Any, dict[str, Any]] = field(default_factory=dict)
    _next: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False

    @classmethod
    def unix(cls, path: Path) -> LineRpc:
        from securechat.daemon.server import connect

        sock = connect(path)
        rpc = cls(sock.makefile("rb"), sock.makefile("wb"), sock)
        rpc.start()
        return rpc

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.reader:
                message = json.loads(line)
                with self._cond:
                    if message.get("method") == "event":
                        self.events.append(message["params"])
                    else:
                        self.replies[message.get("id")] = message
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        self.writer.flush()

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole reply (result or error)."""
        self._next += 1
        req_id = self._next
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            body["params"] = params
        self.send_raw(json.dumps(body).encode() + b"\n")
        return self.reply(req_id)

    def reply(self, req_id: Any, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: req_id in self.replies or self.closed, timeout=timeout)
            assert ok and req_id in self.replies, f"no reply to {req_id}"
            return self.replies.pop(req_id)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        reply = self.request(method, params)
        assert "result" in reply, reply
        return reply["result"]

    def wait_events(
        self, predicate: Any, count: int = 1, timeout: float = CALL_TIMEOUT
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events match ``predicate``; return every matching one."""
        with self._cond:
            self._cond.wait_for(
                lambda: sum(1 for e in self.events if predicate(e)) >= count, timeout=timeout
            )
            found = [e for e in self.events if predicate(e)]
        assert len(found) >= count, f"only {len(found)} of {count} events: {list(self.events)}"
        return found

    def close(self) -> None:
        """Shut the socket down first: closing a file a thread is reading would block."""
        if self.closer is not None:
            with contextlib.suppress(OSError):
                self.closer.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.writer.close()
        if self.closer is not None:
            with self._cond:
                self._cond.wait_for(lambda: self.closed, timeout=5)
            with contextlib.suppress(OSError):
                self.reader.close()
            self.closer.close()


@dataclass
class Web:
    """``securechat web --no-browser`` (its own daemon unless one runs); stopped by its PID."""

    proc: subprocess.Popen[str]
    url: str
    log: PipeDrain

    @classmethod
    def start(cls, home: Path, key: str, relay: Relay) -> Web:
        proc = subprocess.Popen(
            [*cli_cmd(), "web", "--key", key, "--relay", relay.address, "--no-browser"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(home),
            cwd=home.parent,
        )
        assert proc.stdout is not None and proc.stderr is not None
        log = PipeDrain(proc.stderr)
        match = PipeDrain(proc.stdout).wait_for(WEB_URL, START_TIMEOUT)
        if match is not None:
            return cls(proc, match.group(0), log)
        proc.kill()
        proc.wait(timeout=5)
        raise RuntimeError(f"web did not start: {log.text()}")

    @property
    def base(self) -> str:
        return self.url.split("#", 1)[0]

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1].strip("/"))

    @property
    def token(self) -> str:
        return self.url.split("#token=", 1)[1]

    def stop(self) -> int:
        stop_process(self.proc)
        self.log.text()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode
