"""``securechat daemon``: one long-lived client per identity, serving JSON-RPC 2.0.

On ``NAME.sock`` in the key directory, and with ``--stdio`` on stdin/stdout
too (one JSON object per line; the daemon stops at the end of stdin).
``docs/api.md`` documents the methods and events. ``talk``, ``send``,
``receive`` and ``history`` go through the daemon while it runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from securechat.cli.options import add_client_arguments


def configure(command: str, p: argparse.ArgumentParser) -> None:
    assert command == "daemon"
    p.description = (
        "Run one long-lived client for the identity (relay connection, outbox, receipts) "
        "and serve JSON-RPC 2.0 on NAME.sock in the key directory (mode 0600); with "
        "--stdio also on stdin/stdout, one JSON object per line. talk, send, receive, "
        "history and web use it while it runs. Methods and events: docs/api.md."
    )
    add_client_arguments(p, peers=None)
    p.add_argument(
        "--stdio",
        action="store_true",
        help="also serve JSON-RPC on stdin/stdout; stop at the end of stdin",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from securechat.daemon.run import running_daemon, say
    from securechat.daemon.server import serve_connection

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with running_daemon(args.key, args.relay, args.relay_key) as (daemon, sock):
        say(f"securechat: daemon for {daemon.account} listening on {sock.path}")

        def stdio() -> None:
            try:
                serve_connection(daemon, sys.stdin.buffer, sys.stdout.buffer)
            finally:
                stop.set()

        if args.stdio:
            threading.Thread(target=stdio, name="securechat-stdio", daemon=True).start()
        while not stop.wait(0.5):
            pass
    return 0
