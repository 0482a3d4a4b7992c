"""Shared helpers: in-process Messenger clients with their own key directory."""

from __future__ import annotations

import threading
from pathlib import Path

from securechat.client import keystore
from securechat.client.app import open_store
from securechat.client.events import Event, MessageEvent, NoticeEvent
from securechat.client.messenger import Messenger
from securechat.client.relays import KNOWN_RELAYS, KnownRelays
from securechat.core import keys

from relay_fixture import keygen


class Recorder:
    """Collects a Messenger's events (called from its network thread)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def texts(self) -> list[str]:
        with self._lock:
            return [e.text for e in self.events if isinstance(e, MessageEvent)]

    def notices(self) -> list[str]:
        with self._lock:
            return [e.text for e in self.events if isinstance(e, NoticeEvent) and e.error]


class Client:
    """One identity's Messenger, started against ``address``; stop() closes its store."""

    def __init__(self, home: Path, name: str, address: str, relay_key: bytes | None) -> None:
        self.name = name
        self.identity = keystore.load_identity(str(home / f"{name}.key"))
        self.store = open_store(self.identity)
        self.events = Recorder()
        self.messenger = Messenger(
            self.identity,
            self.store,
            address,
            KnownRelays(home / KNOWN_RELAYS),
            self.events,
            pinned_relay_key=relay_key,
        )
        self.messenger.start()

    def stop(self) -> None:
        self.messenger.stop()
        self.store.close()


def make_identities(home: Path, *names: str) -> dict[str, keys.PublicIdentity]:
    """Key files for ``names`` in ``home`` (SECURECHAT_HOME must point there)."""
    keygen(home, *names)
    return {n: keystore.load_public(str(home / f"{n}.pub")) for n in names}
