"""The interactive ``talk`` screen: a prompt_toolkit application (shell).

Layout, top to bottom: the scrolling message area, one status line (relay
state, members with presence, pending outbox count) and the input line.
Because prompt_toolkit owns the whole screen and redraws it, an incoming
message never garbles what the user is typing (no ``print`` racing a prompt).

Input: Enter sends; a bracketed paste of several lines is shown in the input
(up to :data:`MAX_INPUT_ROWS` rows, scrolling) and sent as ONE multi-line
message; Alt-Enter adds a line break by hand. A text over the size limit is
refused and stays in the input to be shortened. When talk exits, the last
screenful of the conversation is printed to the terminal, as other terminal
chats leave it.

Threads: the messenger reports from its network thread, and ``send_text``
(sealing and a store commit, behind the network thread's lock) runs on a
one-worker executor so the UI never blocks and messages keep their order.
Neither thread touches the screen state: they put events on a queue and wake
the UI loop with ``call_soon_threadsafe``; only the UI thread mutates
:class:`ChatScreen` and its :class:`~securechat.ui.chatlog.ChatLog`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import queue
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from prompt_toolkit.application import Application
from prompt_toolkit.buffer import Buffer
from prompt_toolkit.data_structures import Point
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.layout.dimension import Dimension
from prompt_toolkit.widgets import TextArea

from securechat.client import keystore
from securechat.client.engine import Engine
from securechat.client.events import STATUS_PENDING
from securechat.client.peers import Conversation
from securechat.core import envelope, keys
from securechat.daemon import attach
from securechat.errors import SecureChatError, UsageError
from securechat.ui import format as fmt
from securechat.ui import status as status_line
from securechat.ui.chatlog import ChatLog, ScreenEvent, SendFailed, Sent
from securechat.ui.lines import STYLE, Line, message_text, render, rows

MAX_INPUT_ROWS: Final = 6  # the input grows to this many rows for a multi-line text


class ChatScreen:
    """Input, commands and drawing of one talk session; its lines are a :class:`ChatLog`."""

    def __init__(self, peers: list[keys.PublicIdentity], relay: str) -> None:
        self._peers = peers
        self._relay = relay
        self._events: queue.SimpleQueue[ScreenEvent] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.log = ChatLog(relay)
        self._pending = 0
        self._blocked: dict[str, str] = {}  # peer name -> why we refuse to send
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="securechat-send")
        self._messenger: Engine | None = None
        self._conv: Conversation | None = None
        self.input = TextArea(
            prompt=[("class:prompt", "> ")],
            multiline=True,
            wrap_lines=True,
            height=Dimension(min=1, max=MAX_INPUT_ROWS),
            dont_extend_height=True,
            get_line_prefix=lambda line, wrap: "  " if line or wrap else "",
            accept_handler=self._accept,
        )
        self.application: Application[int] = Application(
            layout=self._layout(),
            key_bindings=self._bindings(),
            style=STYLE,
            full_screen=True,
            mouse_support=False,
        )

    # --- from other threads ---------------------------------------------------------------

    def post(self, event: ScreenEvent) -> None:
        """Thread-safe: queue an event and wake the UI loop (if it runs yet)."""
        self._events.put(event)
        loop = self._loop
        if loop is not None:
            # RuntimeError: the loop closed while we were leaving; nothing left to draw.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._drain)

    # --- life cycle -----------------------------------------------------------------------

    def attach(self, messenger: Engine, conv: Conversation) -> None:
        self._messenger = messenger
        self._relay = messenger.relay_address  # a daemon's, when talk goes through one
        self._conv = conv
        self.log.conv_id = conv.conv_id
        me = messenger.identity.public
        names = ", ".join(fmt.safe(p.name) for p in conv.peers)
        self.log.info(f"securechat talk: {fmt.safe(me.name)} with {names}. /help lists commands.")
        self._check_peers()
        for warning in self._blocked.values():
            self.log.add(Line("warn", warning))
        if self._blocked:
            self.log.add(
                Line(
                    "warn",
                    "Messages will NOT be sent until you accept the new key "
                    "with /trust NAME (or 'securechat trust NAME').",
                )
            )
        self._show_history(fmt.STARTUP_HISTORY, header="recent history")

    def run(self) -> int:
        def started() -> None:
            self._loop = asyncio.get_running_loop()
            self._drain()

        try:
            return self.application.run(pre_run=started) or 0
        finally:
            self._loop = None
            self._sender.shutdown(wait=True)

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self.log.apply(event, self._failure())
        if self._messenger is not None:
            self._pending = self._messenger.pending()
        self.application.invalidate()

    def _failure(self) -> str | None:
        error = self._failure_error()
        return None if error is None else error.full_text()

    def _failure_error(self) -> SecureChatError | None:
        messenger = self._messenger
        if messenger is None:
            return None
        return messenger.fatal or messenger.last_connect_error

    def _check_peers(self) -> None:
        assert self._messenger is not None
        changed = self._messenger.check_peers(self._peers)
        self._blocked = {name: exc.full_text() for name, exc in changed.items()}

    # --- input ----------------------------------------------------------------------------

    def _accept(self, buffer: Buffer) -> bool:
        """Enter: a command (one line) or a message; True keeps the text in the input."""
        command = fmt.parse_command(buffer.text) if "\n" not in buffer.text.strip() else None
        if command is not None:
            self._command(command)
            return False
        text = fmt.unescape_message(buffer.text)
        size = len(text.encode())
        if size > envelope.MAX_TEXT_BYTES:
            self.log.add(
                Line(
                    "error",
                    f"not sent: {size} bytes is more than the "
                    f"{envelope.MAX_TEXT_BYTES} a message may hold; the text "
                    "is still in the input line to shorten or split",
                )
            )
            return True
        if text:
            self._send(text)
        return False  # clear the input line

    def _send(self, text: str) -> None:
        messenger, conv = self._messenger, self._conv
        assert messenger is not None and conv is not None
        me = messenger.identity.public.name
        line = Line(
            "msg",
            message_text(text),
            time.strftime("%H:%M"),
            fmt.safe(me),
            "own",
            status=STATUS_PENDING,
        )
        self.log.add(line)
        if self._blocked:
            line.refused = True
            for warning in self._blocked.values():
                self.log.add(Line("warn", warning))
            return
        if messenger.fatal is not None:
            # A changed relay key (or a dead network thread): queuing would send the text
            # later, behind the user's back, after they may have typed it again.
            line.refused = True
            why = fmt.safe(messenger.fatal.full_text())
            self.log.add(Line("error", f"not sent, nothing queued: {why}"))
            return

        def work() -> None:
            try:
                self.post(Sent(line, messenger.send_text(conv, text)))
            except SecureChatError as exc:
                self.post(SendFailed(line, exc.full_text()))

        self._sender.submit(work)

    def _command(self, command: fmt.Command) -> None:
        messenger, conv = self._messenger, self._conv
        assert messenger is not None and conv is not None
        me = messenger.identity.public
        if command.name == "quit":
            self.application.exit(result=0)
        elif command.name == "help":
            for text in fmt.HELP_TEXT:
                self.log.info(text)
        elif command.name == "peers":
            self._show_peers(conv)
        elif command.name == "fingerprint":
            self.log.info(f"your fingerprint ({fmt.safe(me.name)}): {me.fingerprint}")
        elif command.name == "verify":
            for peer in conv.peers:
                number = keys.safety_number(me, peer)
                self.log.info(f"safety number with {fmt.safe(peer.name)}: {number}")
            self.log.info(
                "compare it with each peer in person or by phone; equal numbers mean "
                "no one is in the middle"
            )
        elif command.name == "history":
            try:
                count = fmt.history_count(command.arg)
            except UsageError as exc:
                self.log.add(Line("error", str(exc)))
                return
            self._show_history(count, header=f"last {count} messages")
        elif command.name == "trust":
            self._trust(messenger, command.arg)
        else:
            self.log.add(
                Line(
                    "error",
                    f"unknown command /{fmt.safe(command.arg)}: /help lists "
                    "the commands (start a message with // to send a '/')",
                )
            )

    def _show_peers(self, conv: Conversation) -> None:
        for peer in conv.peers:
            online = self.log.online.get(peer.name)
            state = "presence unknown" if online is None else ("online" if online else "offline")
            flag = "  KEY CHANGED, not trusted" if peer.name in self._blocked else ""
            self.log.info(f"{fmt.safe(peer.name):<12} {peer.fingerprint}  {state}{flag}")

    def _show_history(self, count: int, *, header: str) -> None:
        messenger, conv = self._messenger, self._conv
        assert messenger is not None and conv is not None
        self.log.show_history(messenger.history(conv.conv_id, count), header)

    def _trust(self, messenger: Engine, name: str) -> None:
        if not name:
            self.log.add(Line("error", "usage: /trust NAME (the peer whose new key you verified)"))
            return
        try:
            peer = keystore.load_public(name, peer=True)
            replaced = messenger.trust(peer)
        except SecureChatError as exc:
            self.log.add(Line("error", fmt.safe(exc.full_text())))
            return
        what = "now trusted (the old key is forgotten)" if replaced else "trusted"
        self.log.info(f"{fmt.safe(peer.name)}'s key {peer.fingerprint} is {what}")
        self._check_peers()

    # --- rendering ------------------------------------------------------------------------

    def _layout(self) -> Layout:
        messages = Window(
            FormattedTextControl(
                self._message_fragments, focusable=False, get_cursor_position=self._last_line
            ),
            wrap_lines=True,
        )
        status = Window(
            FormattedTextControl(self._status_fragments), height=1, style="class:status"
        )
        return Layout(HSplit([messages, status, self.input]), focused_element=self.input)

    def _last_line(self) -> Point:
        return Point(0, max(0, sum(rows(line) for line in self.log.lines) - 1))

    def transcript(self, max_rows: int) -> list[str]:
        """The last ``max_rows`` rows of the conversation as plain text."""
        return self.log.transcript(max_rows)

    def _message_fragments(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        for line in self.log.lines:
            out.extend(render(line))
            out.append(("", "\n"))
        if out:
            out.pop()
        return out

    def _status_fragments(self) -> StyleAndTextTuples:
        messenger = self._messenger
        state = status_line.Status(
            connected=self.log.connected,
            relay=self._relay,
            detail=self.log.conn_detail,
            failure=self._failure_error(),
            retrying=messenger is None or messenger.fatal is None,
            members=fmt.members_text([p.name for p in self._peers], self.log.online),
            pending=self._pending,
            blocked=bool(self._blocked),
        )
        return status_line.fragments(state, self._columns())

    def _columns(self) -> int:
        try:
            return self.application.output.get_size().columns
        except Exception:  # no terminal yet (tests build the screen without one)
            return 80

    def _bindings(self) -> KeyBindings:
        bindings = KeyBindings()

        @bindings.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            event.app.exit(result=0)

        @bindings.add("enter", eager=True)
        def _enter(event: KeyPressEvent) -> None:
            self.input.buffer.validate_and_handle()

        @bindings.add("escape", "enter")
        def _newline(event: KeyPressEvent) -> None:
            self.input.buffer.insert_text("\n")

        @bindings.add("c-d")
        def _eof(event: KeyPressEvent) -> None:
            if self.input.buffer.text:
                self.input.buffer.delete()
            else:
                event.app.exit(result=0)

        return bindings


def run_screen(args: argparse.Namespace, relay: str, peers: list[keys.PublicIdentity]) -> int:
    """Open the client, run the screen until the user leaves, report what is still queued."""
    screen = ChatScreen(peers, relay)
    with attach.open_client(
        args.key,
        args.relay,  # None unless given: a daemon's own relay is then no surprise
        args.relay_key,
        screen.post,
        keep_history=not args.no_history,
        watch=peers,
    ) as client:
        conv = client.conversation(peers)
        screen.attach(client.messenger, conv)
        code = screen.run()
        pending = client.messenger.pending()
    # The full-screen view is gone with the alternate screen: leave the conversation.
    rows_left = shutil.get_terminal_size().lines - 2
    for text in screen.transcript(rows_left):
        print(text)
    if pending:
        what = "1 message" if pending == 1 else f"{pending} messages"
        print(
            f"{what} not yet accepted by the relay: queued in the outbox, the next talk, send "
            "or receive sends them (do not send them again)"
        )
    return code
