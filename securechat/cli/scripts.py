"""``securechat send``, ``receive``, ``history`` and ``trust``: commands for scripts and bots.

Like signal-cli: plain lines on stdout (``NAME: text``) or JSON lines with
``--json``, exit status that a script can rely on (``send`` exits 0 only once
the relay has durably accepted every message), diagnostics on stderr only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Final

from securechat.cli.options import add_client_arguments, add_timeout
from securechat.client import app, keystore
from securechat.client.app import load_peers, open_store
from securechat.client.engine import Engine
from securechat.client.events import Event, MessageEvent, NoticeEvent
from securechat.client.peers import KnownPeers
from securechat.client.relays import canonical_address, read_relay_key_file
from securechat.core import envelope
from securechat.core.encoding import fingerprint
from securechat.daemon import attach, remote
from securechat.errors import DeliveryTimeoutError, RelayError, UsageError
from securechat.ui import format as fmt
from securechat.ui.format import json_line, pipe_line

DEFAULT_ACK_TIMEOUT: Final = 30.0
NOTHING_SENT: Final = "nothing was sent or queued: run the command again once that is fixed"


class _Printer:
    """Prints messages as they arrive (from the network thread) and counts them."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.last_message = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, MessageEvent):
            with self._lock:
                print(json_line(event) if self.as_json else pipe_line(event), flush=True)
                self.last_message = time.monotonic()
        elif isinstance(event, NoticeEvent):
            # Errors, and the one line saying a relay key was pinned.
            with self._lock:
                print(f"securechat: {fmt.safe(event.text)}", file=sys.stderr, flush=True)


def cmd_send(args: argparse.Namespace) -> int:
    """Connect first, then seal: a send that cannot reach the relay queues nothing.

    So a failed send is safe to run again (nothing was queued), and a message
    that was queued is said to be, and goes out once: by this run, or by the
    next send, receive or talk, never by both.
    """
    texts = _texts_to_send(args)
    peers = load_peers(args.peer)
    printer = _Printer(as_json=False)
    with attach.open_client(args.key, args.relay, args.relay_key, printer, receive=False) as client:
        conv = client.conversation(peers)
        messenger = client.messenger
        changed = messenger.check_peers(peers)  # refused before anything else (trust on first use)
        if changed:
            raise next(iter(changed.values()))
        app.wait_for_relay(messenger, what=NOTHING_SENT + _earlier(messenger))
        sent = [messenger.send_text(conv, text) for text in texts]
        if not messenger.wait_all_accepted(args.timeout):
            _raise_not_accepted(messenger, args.timeout)
        refused = [messenger.refused[m] for m in sent if m in messenger.refused]
        if refused:
            raise RelayError(
                f"the relay refused {len(refused)} of {len(sent)} message(s) for good "
                f"({refused[0]}); they were not delivered and are not queued",
                hint="send them again shorter, or in parts",
            )
    return 0


def _texts_to_send(args: argparse.Namespace) -> list[str]:
    if args.message is not None:
        texts = [args.message] if args.message.strip() else []
    else:
        texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise UsageError("nothing to send: give -m TEXT (not empty) or lines on stdin")
    for number, text in enumerate(texts, start=1):
        size = len(text.encode())
        if size > envelope.MAX_TEXT_BYTES:
            which = "the message" if args.message is not None else f"input line {number}"
            raise UsageError(
                f"{which} is {size} bytes, more than {envelope.MAX_TEXT_BYTES}; nothing was sent",
                hint="shorten it, or split it into several messages",
            )
    return texts


def _earlier(messenger: Engine) -> str:
    pending = messenger.pending()
    if not pending:
        return ""
    return (
        f" ({pending} message{'s' if pending != 1 else ''} from earlier runs still wait "
        "in the outbox)"
    )


def _raise_not_accepted(messenger: Engine, timeout: float) -> None:
    pending = messenger.pending()
    queued = (
        f"{pending} message{'s' if pending != 1 else ''} queued in the outbox: the next "
        "send, receive or talk sends them, so do not send them again"
    )
    if messenger.fatal is not None:
        raise messenger.fatal.with_note(queued)
    state = "is unreachable" if not messenger.connected else "did not accept them"
    raise DeliveryTimeoutError(
        f"the relay at {messenger.relay_address} {state} within {timeout:g}s; {queued}"
    )


def cmd_receive(args: argparse.Namespace) -> int:
    """Through a daemon: the messages it stored since the last receive (its cursor is kept
    in NAME.receive.cursor), then new ones; without one: what the relay holds, as before."""
    printer = _Printer(as_json=args.json)
    name = remote.socket_of(args.key).stem
    saved = _read_cursor(name)

    def since(daemon: remote.RemoteMessenger) -> int:
        return saved if saved is not None else daemon.start_cursor

    with attach.open_client(args.key, args.relay, args.relay_key, printer, since=since) as client:
        messenger = client.messenger
        app.wait_for_relay(messenger, what="nothing was received")
        messenger.synced.wait(args.timeout)
        printer.last_message = time.monotonic()
        while time.monotonic() - printer.last_message < args.timeout:
            if messenger.fatal is not None:
                raise messenger.fatal
            time.sleep(0.05)
        # Anything we sent earlier and still had queued gets a last chance too.
        messenger.wait_all_accepted(1.0)
        if isinstance(messenger, remote.RemoteMessenger):
            _write_cursor(name, messenger.cursor)
        elif isinstance(client, app.Client):
            _write_cursor(name, client.store.events_bounds()[1])
    return 0


def _read_cursor(name: str) -> int | None:
    """The daemon cursor the last receive printed up to (None: never, or unreadable)."""
    try:
        text = attach.cursor_file(name).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.strip().isdigit() else None


def _write_cursor(name: str, cursor: int) -> None:
    """Best effort: a lost cursor file means the next receive starts at the daemon's start."""
    path = attach.cursor_file(name)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{cursor}\n")
        os.replace(tmp, path)
    except OSError:
        pass


def cmd_history(args: argparse.Namespace) -> int:
    """Read the history without the identity's lock, so it works while talk runs; through
    the daemon when one runs (then no passphrase is asked)."""
    if args.n <= 0:
        raise UsageError("-n must be a positive number of messages", hint="for example -n 20")
    path = remote.find(args.key)
    if path is not None:
        return _history_through(path, args)
    identity = keystore.load_identity(args.key)
    peers = load_peers(args.peer)
    conv = app.conversation(identity.public, peers)
    store = app.open_store_read_only(identity)
    if store is None:
        return 0  # this identity has not talked to anyone yet
    try:
        entries = store.history(conv.conv_id, args.n)
    finally:
        store.close()
    _print_history(
        [{**e.record, "status": e.status, "msg_id": e.msg_id.hex()} for e in entries], args.json
    )
    return 0


def _history_through(path: Path, args: argparse.Namespace) -> int:
    peers = load_peers(args.peer)
    daemon = remote.RemoteMessenger(path, lambda event: None)
    try:
        conv = app.conversation(daemon.identity.public, peers)
        _print_history(daemon.history(conv.conv_id, args.n), args.json)
    finally:
        daemon.close()
    return 0


def _print_history(records: list[dict[str, object]], as_json: bool) -> None:
    for record in records:
        if as_json:
            print(json.dumps(fmt.history_json(record), ensure_ascii=False))
        else:
            print(fmt.history_text(record))


def cmd_trust(args: argparse.Namespace) -> int:
    if args.relay is not None or args.relay_key is not None:
        if args.peer is not None:
            raise UsageError("trust either a PEER or a relay (--relay with --relay-key), not both")
        return _trust_relay(args)
    if args.peer is None:
        raise UsageError(
            "name the PEER whose key to trust, or a relay with --relay and --relay-key"
        )
    identity = keystore.load_identity(args.key)
    peer = keystore.load_public(args.peer, peer=True)
    store = open_store(identity)
    try:
        with store.transaction():
            replaced = KnownPeers(store).trust(peer)
    finally:
        store.close()
    verb = "replaced the old key; now trusting" if replaced else "trusting"
    print(f"{verb} {peer.name} {peer.fingerprint}")
    return 0


def _trust_relay(args: argparse.Namespace) -> int:
    """Pin a relay's (new) key from its relay.pub: the way back after a legitimate change."""
    if args.relay is None or args.relay_key is None:
        raise UsageError(
            "to pin a relay's key give both --relay HOST:PORT and --relay-key "
            "relay.pub (the file the relay's operator hands out)"
        )
    address = app.relay_address(args.relay)
    key = read_relay_key_file(Path(args.relay_key))
    known = app.known_relays()
    old = known.lookup(address)
    where = canonical_address(address)
    if old == key:
        print(f"the relay at {where} is already pinned to {fingerprint(key)}")
        return 0
    known.remember(address, key)
    if old is None:
        print(f"pinned the relay at {where}: {fingerprint(key)}")
    else:
        print(
            f"the relay at {where}: replaced the pinned key {fingerprint(old)} with "
            f"{fingerprint(key)}"
        )
    return 0


def configure(command: str, p: argparse.ArgumentParser) -> None:
    {"send": _send, "receive": _receive, "history": _history, "trust": _trust}[command](p)


def _send(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Send -m TEXT, or one message per stdin line, to --peer "
        "(several --peer: a group). Exits 0 only after the relay durably accepted "
        "every message. If the relay cannot be reached, nothing is queued (exit "
        "7: run it again later); if it was reached but did not accept in time, "
        "the messages are queued and the next send, receive or talk sends them "
        "(exit 10: do not send them again)."
    )
    add_client_arguments(p)
    p.add_argument("-m", "--message", metavar="TEXT", help="the message (default: stdin lines)")
    add_timeout(p, DEFAULT_ACK_TIMEOUT, "how long to wait for the relay's acceptance (default 30)")
    p.set_defaults(handler=cmd_send)


def _receive(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Connect, print every waiting message and new ones as "
        "'NAME: text' (or JSON lines), acknowledge them, and exit after SECONDS "
        "without a new message."
    )
    add_client_arguments(p, peers=None)
    add_timeout(p, 2.0, "exit after this long without a new message (default 2)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of 'NAME: text'")
    p.set_defaults(handler=cmd_receive)


def _history(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print the locally stored (encrypted at rest) history of the "
        "conversation with --peer (several: the group)."
    )
    p.add_argument("--peer", action="append", required=True, metavar="NAME|FILE")
    p.add_argument("--key", metavar="NAME|FILE", help="your identity (default: the only key)")
    p.add_argument("-n", type=int, default=50, metavar="N", help="last N messages (default 50)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per message (sender, fingerprint, id, time, text, outgoing, status)",
    )
    p.set_defaults(handler=cmd_history)


def _trust(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Record PEER's current key as trusted, replacing a different "
        "one recorded earlier (verify the safety number out of band first). Or, "
        "with --relay HOST:PORT --relay-key relay.pub, pin that relay's key in "
        "known_relays, replacing the one pinned before (both fingerprints are "
        "shown)."
    )
    p.add_argument("peer", metavar="NAME|FILE", nargs="?", help="the peer whose key to trust")
    p.add_argument("--key", metavar="NAME|FILE", help="your identity (default: the only key)")
    p.add_argument("--relay", metavar="HOST[:PORT]", help="the relay whose key to pin")
    p.add_argument("--relay-key", metavar="FILE", help="the relay's relay.pub")
    p.set_defaults(handler=cmd_trust)
