"""Commands for scripts and bots: ``send``, ``receive``, ``history``, ``trust`` (shell).

Like signal-cli: plain lines on stdout (``NAME: text``) or JSON lines with
``--json``, exit status that a script can rely on (``send`` exits 0 only once
the relay has durably accepted every message), diagnostics on stderr only.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from datetime import datetime
from typing import Final

from securechat import keystore
from securechat.client.app import default_relay, load_peers, open_client, open_store
from securechat.client.messenger import (
    ConnectionEvent,
    Conversation,
    Event,
    KnownPeers,
    MessageEvent,
    NoticeEvent,
)
from securechat.errors import DeliveryTimeoutError, UsageError
from securechat.ui.format import json_line, pipe_line

CONNECT_GRACE: Final = 3.0  # seconds send waits for the relay before sealing offline
DEFAULT_ACK_TIMEOUT: Final = 30.0


class _Printer:
    """Prints messages as they arrive (from the network thread) and counts them."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.last_message = time.monotonic()
        self.connected = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, MessageEvent):
            with self._lock:
                print(json_line(event) if self.as_json else pipe_line(event), flush=True)
                self.last_message = time.monotonic()
        elif isinstance(event, ConnectionEvent):
            if event.connected:
                self.connected.set()
        elif isinstance(event, NoticeEvent) and event.error:
            print(f"securechat: {event.text}", file=sys.stderr, flush=True)


def add_client_arguments(p: argparse.ArgumentParser, *, peers: bool) -> None:
    if peers:
        p.add_argument("--peer", action="append", required=True, metavar="NAME|FILE",
                       help="recipient (repeat for a group)")
    p.add_argument("--key", metavar="NAME|FILE", help="your identity (default: the only key)")
    p.add_argument("--relay", metavar="HOST:PORT",
                   help=f"relay address (default: $SECURECHAT_RELAY or {default_relay()})")
    p.add_argument("--relay-key", metavar="FILE", help="pin the relay's key (its relay.pub)")


def cmd_send(args: argparse.Namespace) -> int:
    texts = [args.message] if args.message is not None else [
        line.rstrip("\n") for line in sys.stdin if line.strip()
    ]
    if not texts:
        raise UsageError("nothing to send: give -m TEXT or lines on stdin")
    peers = load_peers(args.peer)
    printer = _Printer(as_json=False)
    with open_client(args.key, args.relay, args.relay_key, printer, receive=False) as client:
        conv = client.conversation(peers)
        printer.connected.wait(CONNECT_GRACE)
        for text in texts:
            client.messenger.send_text(conv, text)
        if not client.messenger.wait_all_accepted(args.timeout):
            messenger = client.messenger
            _raise_not_accepted(messenger.pending(), messenger.relay_address, messenger.fatal)
    return 0


def _raise_not_accepted(pending: int, relay: str, fatal: Exception | None) -> None:
    if fatal is not None:
        raise fatal
    raise DeliveryTimeoutError(
        f"the relay at {relay} did not accept {pending} message(s) in time; they are kept "
        "in the outbox and will be sent by the next send, receive or talk"
    )


def cmd_receive(args: argparse.Namespace) -> int:
    printer = _Printer(as_json=args.json)
    with open_client(args.key, args.relay, args.relay_key, printer) as client:
        messenger = client.messenger
        if not printer.connected.wait(max(args.timeout, CONNECT_GRACE)):
            if messenger.fatal is not None:
                raise messenger.fatal
            raise DeliveryTimeoutError(f"cannot reach the relay at {messenger.relay_address}")
        messenger.synced.wait(args.timeout)
        printer.last_message = time.monotonic()
        while time.monotonic() - printer.last_message < args.timeout:
            if messenger.fatal is not None:
                raise messenger.fatal
            time.sleep(0.05)
        # Anything we sent earlier and still had queued gets a last chance too.
        messenger.wait_all_accepted(1.0)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    identity = keystore.load_identity(args.key)
    peers = load_peers(args.peer)
    conv = Conversation.with_peers(identity.public, peers)
    store = open_store(identity)
    try:
        entries = store.history(conv.conv_id, args.n)
    finally:
        store.close()
    for entry in entries:
        rec = entry.record
        stamp = datetime.fromtimestamp(int(rec["sent_ms"]) / 1000).strftime("%Y-%m-%d %H:%M")
        print(f"[{stamp}] {rec['sender']}: {rec['text']}")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    identity = keystore.load_identity(args.key)
    peer = keystore.load_public(args.peer)
    store = open_store(identity)
    try:
        with store.transaction():
            replaced = KnownPeers(store).trust(peer)
    finally:
        store.close()
    verb = "replaced the old key; now trusting" if replaced else "trusting"
    print(f"{verb} {peer.name} {peer.fingerprint}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("send", help="send messages and exit once the relay accepted them",
                       description="Send -m TEXT, or one message per stdin line, to --peer "
                       "(several --peer: a group). Exits 0 only after the relay durably accepted "
                       "every message; otherwise they stay in the outbox for the next run.")
    add_client_arguments(p, peers=True)
    p.add_argument("-m", "--message", metavar="TEXT", help="the message (default: stdin lines)")
    p.add_argument("--timeout", type=float, default=DEFAULT_ACK_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for the relay's acceptance (default 30)")
    p.set_defaults(handler=cmd_send)

    p = sub.add_parser("receive", help="print waiting and new messages, then exit",
                       description="Connect, print every waiting message and new ones as "
                       "'NAME: text' (or JSON lines), acknowledge them, and exit after SECONDS "
                       "without a new message.")
    add_client_arguments(p, peers=False)
    p.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                   help="exit after this long without a new message (default 2)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of 'NAME: text'")
    p.set_defaults(handler=cmd_receive)

    p = sub.add_parser("history", help="print the local history of a conversation",
                       description="Print the locally stored (encrypted at rest) history of the "
                       "conversation with --peer (several: the group).")
    p.add_argument("--peer", action="append", required=True, metavar="NAME|FILE")
    p.add_argument("--key", metavar="NAME|FILE", help="your identity (default: the only key)")
    p.add_argument("-n", type=int, default=50, metavar="N", help="last N messages (default 50)")
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser("trust", help="accept a peer's (changed) key",
                       description="Record PEER's current key as trusted, replacing a different "
                       "one recorded earlier. Verify the safety number out of band first.")
    p.add_argument("peer", metavar="NAME|FILE")
    p.add_argument("--key", metavar="NAME|FILE", help="your identity (default: the only key)")
    p.set_defaults(handler=cmd_trust)
