"""``securechat talk`` through a pipe: a line filter for scripts (shell).

Each input line is sent as one message, each received message is printed as
one line (``NAME: text``, or a JSON object with ``--json``), and at the end of
input it waits until the relay has accepted every message it sent, so exit
status 0 means "nothing is left only on this machine". Pipe mode starts only once
the relay is reached: if it cannot be, it says why at once and reads nothing, so
running it again later sends each line once. A connection lost later is told on
stderr; the lines go on into the outbox and out when the relay is back.

The engine (:class:`~securechat.client.messenger.Messenger`) runs its own
network thread and reports through a callback; this module only turns those
events into output and input lines into ``send_text`` calls.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from typing import Final, TextIO

from securechat.client import app
from securechat.client.engine import Engine
from securechat.client.events import ConnectionEvent, Event, MessageEvent, NoticeEvent
from securechat.client.peers import Conversation
from securechat.core import envelope, keys
from securechat.daemon import attach
from securechat.errors import DeliveryTimeoutError, SessionError, UsageError
from securechat.ui import format as fmt

CONNECT_GRACE: Final = 3.0  # wait this long for the relay before sealing offline
SYNC_WAIT: Final = 3.0  # at most this long for the relay's stored messages
LINGER: Final = 0.5  # late incoming messages after everything is acknowledged


class _PipePrinter:
    """Prints events from the network thread, one flushed line each, never interleaved."""

    def __init__(self, out: TextIO, err: TextIO, as_json: bool) -> None:
        self._out = out
        self._err = err
        self._json = as_json
        self._lock = threading.Lock()
        self.closed = False  # stdout went away (e.g. piped into `head`)
        self._offline_told = False  # one warning per lost connection, not one per retry
        self._was_connected = False  # before the first connection, the command says why

    def __call__(self, event: Event) -> None:
        if isinstance(event, MessageEvent):
            line = fmt.json_line(event) if self._json else fmt.pipe_line(event)
            self._write(self._out, line)
        elif isinstance(event, NoticeEvent):
            kind = "warning: " if event.error else ""
            self._write(self._err, f"securechat: {kind}{fmt.safe(event.text)}")
        elif isinstance(event, ConnectionEvent):
            if event.connected:
                if self._offline_told:
                    self._write(self._err, "securechat: connected to the relay again")
                self._offline_told = False
                self._was_connected = True
            elif self._was_connected and not self._offline_told:
                self._offline_told = True
                self._write(
                    self._err,
                    f"securechat: warning: relay connection lost "
                    f"({fmt.safe(event.detail)}); new lines wait in the outbox",
                )

    def _write(self, stream: TextIO, line: str) -> None:
        with self._lock:
            if self.closed:
                return
            try:
                stream.write(line + "\n")
                stream.flush()
            except (BrokenPipeError, ValueError):
                self.closed = True


def _input_lines(stream: TextIO) -> Iterator[tuple[int, str]]:
    """Numbered non-empty lines; a blank line is not a message."""
    for number, raw in enumerate(stream, start=1):
        line = raw.rstrip("\r\n")
        if line.strip():
            yield number, line


def run_pipe(args: argparse.Namespace, relay: str, peers: list[keys.PublicIdentity]) -> int:
    """Send stdin's lines to ``peers``, print what arrives; raise why it failed."""
    printer = _PipePrinter(sys.stdout, sys.stderr, args.json)
    with attach.open_client(
        args.key,
        args.relay,  # None unless given: a daemon's own relay is then no surprise
        args.relay_key,
        printer,
        keep_history=not args.no_history,
        watch=peers,
    ) as client:
        messenger = client.messenger
        changed = messenger.check_peers(peers)
        if changed:
            raise next(iter(changed.values()))
        conv = client.conversation(peers)
        app.wait_for_relay(messenger, what="no input was read, nothing was sent or queued")
        # Give the relay a moment first: a session started online uses the peer's
        # prekeys (stronger than the offline start), and the outbox left by an
        # earlier run goes out before the new lines, so order is kept.
        messenger.synced.wait(min(CONNECT_GRACE, args.timeout))
        refused = _send_lines(messenger, conv, sys.stdin)
        _finish(messenger, messenger.relay_address, args.timeout, printer)
        if refused is not None:
            raise refused
    return 0


def _send_lines(messenger: Engine, conv: Conversation, stream: TextIO) -> UsageError | None:
    """Send each line; stop at the first one that cannot be sent and say which."""
    for number, line in _input_lines(stream):
        if len(line.encode()) > envelope.MAX_TEXT_BYTES:
            return UsageError(
                f"input line {number} is longer than {envelope.MAX_TEXT_BYTES} bytes; it and "
                "the lines after it were not sent (the lines before it were)",
                hint="split it into shorter lines, then send the rest again",
            )
        try:
            messenger.send_text(conv, line)
        except SessionError as exc:
            return UsageError(f"input line {number} was not sent: {exc}")
        if messenger.fatal is not None:
            raise messenger.fatal
    return None


def _finish(messenger: Engine, relay: str, timeout: float, printer: _PipePrinter) -> None:
    """Wait for the relay's acknowledgements, then briefly for incoming messages."""
    if not messenger.wait_all_accepted(timeout):
        if messenger.fatal is not None:
            raise messenger.fatal
        pending = messenger.pending()
        state = "unreachable" if not messenger.connected else "did not acknowledge in time"
        raise DeliveryTimeoutError(
            f"relay {relay} {state} after {timeout:g}s: {pending} message"
            f"{'' if pending == 1 else 's'} queued in the outbox; the next send, receive or "
            "talk sends them, so do not send them again"
        )
    messenger.synced.wait(SYNC_WAIT)
    if not printer.closed:
        time.sleep(LINGER)
