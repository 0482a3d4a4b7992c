"""Opening a client: identity, state store, known relays, messenger (shell).

Shared by ``talk``, ``send``, ``receive``, ``history``, ``trust`` and the demo so
that each command is only its own loop and output.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from securechat.client import keystore
from securechat.client.engine import Engine
from securechat.client.events import Event, NoticeEvent
from securechat.client.link import CONNECT_TIMEOUT, HANDSHAKE_TIMEOUT
from securechat.client.messenger import Messenger
from securechat.client.peers import Conversation
from securechat.client.relays import (
    DEFAULT_PORT,
    KNOWN_RELAYS,
    KnownRelays,
    read_relay_key_file,
    split_relays,
    with_port,
)
from securechat.client.store import ClientStore, StoreKeys
from securechat.core import keys, wire
from securechat.errors import RelayUnreachableError, UsageError

ENV_RELAY: Final = "SECURECHAT_RELAY"
DEFAULT_RELAY: Final = f"127.0.0.1:{DEFAULT_PORT}"
STATE_SUFFIX: Final = ".state.db"
# How long a command waits for its first connection before it gives up: one full
# attempt (TCP connect, then the relay's handshake answer) and a little slack.
RELAY_WAIT: Final = CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT + 1.0
_POLL: Final = 0.02


def default_relay() -> str:
    return os.environ.get(ENV_RELAY) or DEFAULT_RELAY


def relay_address(arg: str | None) -> str:
    """``--relay`` (or the default) with the default port added; UsageError if malformed.

    A comma-separated list names the nodes of one relay cluster (``split_relays``).
    """
    text = arg or default_relay()
    if "," in text:
        return ",".join(split_relays(text))
    return with_port(text)


def state_path(identity: keys.Identity) -> Path:
    return keystore.home() / f"{identity.name}{STATE_SUFFIX}"


def open_store(identity: keys.Identity) -> ClientStore:
    keystore.ensure_home()
    return ClientStore(state_path(identity), StoreKeys.of(identity))


def open_store_read_only(identity: keys.Identity) -> ClientStore | None:
    """The store for reading beside a running talk (no lock, no writes); None if absent."""
    path = state_path(identity)
    if not path.exists():
        return None
    return ClientStore(path, StoreKeys.of(identity), read_only=True)


def known_relays(announce: Callable[[str], None] | None = None) -> KnownRelays:
    return KnownRelays(keystore.home() / KNOWN_RELAYS, announce)


def conversation(me: keys.PublicIdentity, peers: Iterable[keys.PublicIdentity]) -> Conversation:
    """The conversation with ``peers``; messaging only yourself is a usage error."""
    peers = list(peers)
    if peers and all(p.dh == me.dh for p in peers):
        raise UsageError(
            f"--peer {peers[0].name or 'that key'} is your own identity ({me.name})",
            hint="give someone else's key with --peer",
        )
    return Conversation.with_peers(me, peers)


@dataclass(slots=True)
class Client:
    identity: keys.Identity
    store: ClientStore
    messenger: Messenger

    def conversation(self, peers: Iterable[keys.PublicIdentity]) -> Conversation:
        return conversation(self.identity.public, peers)


@contextlib.contextmanager
def open_client(
    key: str | None,
    relay: str | None,
    relay_key_file: str | None,
    on_event: Callable[[Event], None],
    *,
    keep_history: bool = True,
    watch: Iterable[keys.PublicIdentity] = (),
    identity: keys.Identity | None = None,
    tap: Callable[[str, wire.Frame], None] | None = None,
    receive: bool = True,
) -> Iterator[Client]:
    """Load the identity (asking for the passphrase if needed) and start the messenger.

    A pin recorded or replaced in ``known_relays`` reaches the user as a
    :class:`NoticeEvent` (not an error) through ``on_event``.
    """
    address = relay_address(relay)
    pinned = read_relay_key_file(Path(relay_key_file)) if relay_key_file else None
    ident = identity or keystore.load_identity(key)
    store = open_store(ident)
    try:
        messenger = Messenger(
            ident,
            store,
            address,
            known_relays(lambda text: on_event(NoticeEvent(text))),
            on_event,
            pinned_relay_key=pinned,
            keep_history=keep_history,
            watch=watch,
            tap=tap,
            receive=receive,
        )
        messenger.start()
        try:
            yield Client(ident, store, messenger)
        finally:
            messenger.stop()
    finally:
        store.close()


def wait_for_relay(messenger: Engine, *, what: str, timeout: float = RELAY_WAIT) -> None:
    """Return once connected; otherwise raise why, at once, ending with ``what`` happened.

    The first failed attempt is reported (refused, unreachable, not a relay, a
    changed relay key) rather than waited out: the messenger would keep retrying
    with backoff, but a command's user needs to know now.
    """
    deadline = time.monotonic() + timeout
    while not messenger.connected:
        failure = messenger.fatal or messenger.last_connect_error
        if failure is not None:
            raise failure.with_note(what)
        if time.monotonic() >= deadline:
            raise RelayUnreachableError(
                f"no connection to the relay at {messenger.relay_address} after {timeout:g}s; "
                f"{what}",
                hint="is the relay running? check --relay HOST:PORT (or $SECURECHAT_RELAY)",
            )
        time.sleep(_POLL)


def load_peers(names: Iterable[str]) -> list[keys.PublicIdentity]:
    return [keystore.load_public(name, peer=True) for name in names]
