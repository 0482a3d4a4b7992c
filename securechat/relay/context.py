"""What every worker of one relay shares: configuration, routing table, store, budgets.

Each part is thread-safe on its own terms (``router.py``, ``store_thread.py``,
``guard.py``, ``rendezvous.py``); the relay builds one context (``server.py``)
and hands it to every worker.
"""

from __future__ import annotations

import socket

from securechat.relay.conn import Conn
from securechat.relay.guard import Admission, Budgets, PartialBytes
from securechat.relay.limits import RelayConfig
from securechat.relay.rendezvous import Rendezvous
from securechat.relay.router import Router
from securechat.relay.store_thread import StoreThread


class RelayContext:
    """What every worker shares: configuration, routing table, store, relay key, budgets."""

    def __init__(
        self, config: RelayConfig, router: Router, store: StoreThread, static_private: bytes
    ) -> None:
        self.config = config
        self.router = router
        self.store = store
        self.static_private = static_private
        self.admission: Admission[Conn] = Admission(config)
        self.budgets = Budgets(config)
        self.partial: PartialBytes[Conn] = PartialBytes(
            config.partial_bytes, config.partial_bytes_per_prefix
        )
        self.rendezvous: Rendezvous[Conn] = Rendezvous(config)  # invites
        self.listener: socket.socket | None = None  # set by the relay before workers start
