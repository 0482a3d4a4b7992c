"""Starting and stopping a daemon for one identity (shell): what ``securechat daemon``
and ``securechat web`` (when no daemon runs yet) share."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from securechat.client import app, keystore
from securechat.client.relays import read_relay_key_file
from securechat.client.store import ClientStore
from securechat.daemon.server import SocketServer, answers
from securechat.daemon.service import Daemon, socket_path
from securechat.errors import InUseError


def say(line: str) -> None:
    """One line on stderr in one write: threads (the relay pin notice, the start-up line)
    must not interleave inside a line (``print`` writes the text and the newline apart)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def running_daemon(
    key: str | None, relay: str | None, relay_key_file: str | None
) -> Iterator[tuple[Daemon, SocketServer]]:
    """Load the identity, take its lock, start the messenger and the socket; stop on exit."""
    address = app.relay_address(relay)
    pinned = read_relay_key_file(Path(relay_key_file)) if relay_key_file else None
    home = keystore.ensure_home()
    identity = keystore.load_identity(key)
    path = socket_path(home, identity.name)
    if answers(path):  # before the lock, to say the right thing
        raise InUseError(
            f"a daemon for {identity.name} already runs (it answers on {path})",
            hint="use it: talk, send, receive, history and web go through it",
        )
    store = app.open_store(identity)
    reader: ClientStore | None = None
    try:
        reader = app.open_store_read_only(identity)
        assert reader is not None  # the writer just created it
        daemon = Daemon(
            identity,
            store,
            reader,
            address,
            app.known_relays(lambda text: say(f"securechat: {text}")),
            pinned_relay_key=pinned,
        )
        sock = SocketServer(daemon, path)
        daemon.start()
        sock.start()
        try:
            yield daemon, sock
        finally:
            sock.stop()
            daemon.stop()
    finally:
        if reader is not None:
            reader.close()  # closed by daemon.stop() already, unless it never started
        store.close()
