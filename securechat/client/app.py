"""Opening a client: identity, state store, known relays, messenger (shell).

Shared by ``talk``, ``send``, ``receive``, ``history``, ``trust`` and the demo so
that each command is only its own loop and output.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from securechat import keys, keystore, wire
from securechat.client.link import KNOWN_RELAYS, KnownRelays, read_relay_key_file
from securechat.client.messenger import Conversation, Event, Messenger
from securechat.client.store import ClientStore, StoreKeys

ENV_RELAY: Final = "SECURECHAT_RELAY"
DEFAULT_RELAY: Final = "127.0.0.1:5050"
STATE_SUFFIX: Final = ".state.db"


def default_relay() -> str:
    return os.environ.get(ENV_RELAY) or DEFAULT_RELAY


def state_path(identity: keys.Identity) -> Path:
    return keystore.home() / f"{identity.name}{STATE_SUFFIX}"


def open_store(identity: keys.Identity) -> ClientStore:
    keystore.ensure_home()
    return ClientStore(state_path(identity), StoreKeys.of(identity))


@dataclass(slots=True)
class Client:
    identity: keys.Identity
    store: ClientStore
    messenger: Messenger

    def conversation(self, peers: Iterable[keys.PublicIdentity]) -> Conversation:
        return Conversation.with_peers(self.identity.public, peers)


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
    """Load the identity (asking for the passphrase if needed) and start the messenger."""
    ident = identity or keystore.load_identity(key)
    pinned = read_relay_key_file(Path(relay_key_file)) if relay_key_file else None
    store = open_store(ident)
    try:
        messenger = Messenger(
            ident,
            store,
            relay or default_relay(),
            KnownRelays(keystore.home() / KNOWN_RELAYS),
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


def load_peers(names: Iterable[str]) -> list[keys.PublicIdentity]:
    return [keystore.load_public(name) for name in names]
