"""Open an identity for a front-end: through its daemon when one runs, else in-process.

``talk``, ``send`` and ``receive`` call :func:`open_client` where they used
:func:`securechat.client.app.open_client`; they get either the in-process
client (this command holds the identity's lock, as before) or a
:class:`~securechat.daemon.remote.RemoteClient`, both with a ``messenger`` that
is an :class:`~securechat.client.engine.Engine`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from securechat.client import app, keystore
from securechat.client.events import Event, NoticeEvent
from securechat.core import keys
from securechat.daemon import remote

Since = int | None | Callable[[remote.RemoteMessenger], int | None]


@contextlib.contextmanager
def open_client(
    key: str | None,
    relay: str | None,
    relay_key: str | None,
    on_event: Callable[[Event], None],
    *,
    keep_history: bool = True,
    watch: Iterable[keys.PublicIdentity] = (),
    receive: bool = True,
    since: Since = None,
) -> Iterator[app.Client | remote.RemoteClient]:
    """See the module docstring; ``since``: where a daemon's events start (None: now)."""
    path = remote.find(key)
    if path is None:
        with app.open_client(
            key, relay, relay_key, on_event, keep_history=keep_history, watch=watch, receive=receive
        ) as client:
            yield client
        return
    address = app.relay_address(relay) if relay is not None else None
    with remote.attach(path, address, on_event, since) as attached:
        if not keep_history:
            on_event(NoticeEvent("a daemon runs for this identity: it keeps the history"))
        yield attached


def cursor_file(name: str) -> Path:
    """Where ``receive`` keeps the daemon's cursor it printed up to (0600)."""
    return keystore.home() / f"{name}.receive.cursor"
