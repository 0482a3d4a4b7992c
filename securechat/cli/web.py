"""``securechat web``: the chat in a browser, served on 127.0.0.1 by the identity's daemon.

Attaches to the daemon when one runs; otherwise runs one in this process (its
socket serves talk, send and the rest meanwhile) until interrupted. Prints one
line, the URL with its token, and opens a browser unless ``--no-browser``.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from securechat.cli.options import add_client_arguments
from securechat.errors import UsageError


def configure(command: str, p: argparse.ArgumentParser) -> None:
    assert command == "web"
    p.description = (
        "Serve the chat to a browser on 127.0.0.1 (a free port, or --port) through the "
        "identity's daemon (started here if none runs). Prints the URL, which holds a "
        "random token; keep it private like a password."
    )
    add_client_arguments(p, peers=None)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-browser", action="store_true", help="only print the URL")
    p.set_defaults(handler=run)


@contextlib.contextmanager
def _daemon_socket(args: argparse.Namespace) -> Iterator[Path]:
    from securechat.daemon import remote
    from securechat.daemon.run import running_daemon

    found = remote.find(args.key)
    if found is not None:
        yield found
        return
    with running_daemon(args.key, args.relay, args.relay_key) as (_daemon, sock):
        yield sock.path


def run(args: argparse.Namespace) -> int:
    from securechat.ui.web.server import WebServer

    if not 0 <= args.port < 65536:
        raise UsageError("--port must be from 1 to 65535 (or 0 for a free one)")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with _daemon_socket(args) as path:
        web = WebServer(path, args.port)
        web.start()
        try:
            print(web.url, flush=True)
            if not args.no_browser:
                _open_browser(web.url)
            while not stop.wait(0.5):
                pass
        finally:
            web.stop()
    return 0


def _open_browser(url: str) -> None:
    import webbrowser

    try:
        if not webbrowser.open(url):
            print("securechat: no browser found; open the URL above", file=sys.stderr)
    except webbrowser.Error:
        print("securechat: no browser found; open the URL above", file=sys.stderr)
