"""``securechat talk``: chat with one peer or a group, on a terminal or through a pipe.

On a terminal (stdin and stdout are TTYs, no ``--json``) the prompt_toolkit
screen of :mod:`securechat.ui.screen`; otherwise the line filter of
:mod:`securechat.ui.pipe`. Only the one used is imported.
"""

from __future__ import annotations

import argparse
import sys
from typing import Final

from securechat.cli.options import add_client_arguments, add_timeout, positive_timeout
from securechat.client import app

DEFAULT_TIMEOUT: Final = 30.0  # --timeout: seconds to wait for the relay's acknowledgements


def configure(command: str, p: argparse.ArgumentParser) -> None:
    assert command == "talk"
    p.description = (
        "Open a conversation with --peer (several --peer: a group). On a terminal: an "
        "interactive chat (/help lists commands). On a pipe: each input line is sent, "
        "received messages are printed as 'NAME: text' (or JSON lines), and at end of "
        "input it waits until the relay accepted everything."
    )
    add_client_arguments(
        p, peers="who to talk to (a .pub file or a name in the key directory); repeat for a group"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print received messages as JSON lines (pipe mode, even on a terminal)",
    )
    p.add_argument(
        "--no-history", action="store_true", help="do not keep this session in local history"
    )
    add_timeout(
        p,
        DEFAULT_TIMEOUT,
        "pipe mode: how long to wait at end of input for the relay to accept every "
        f"message (default {DEFAULT_TIMEOUT:g})",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``securechat talk``; raises our errors, returns the exit code."""
    relay = app.relay_address(args.relay)
    positive_timeout(args.timeout)
    peers = app.load_peers(args.peer)
    if sys.stdin.isatty() and sys.stdout.isatty() and not args.json:
        from securechat.ui.screen import run_screen

        return run_screen(args, relay, peers)
    from securechat.ui.pipe import run_pipe

    return run_pipe(args, relay, peers)
