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
from securechat.relay.mailboxes import Mailboxes
from securechat.relay.rendezvous import Rendezvous
from securechat.relay.router import Router


class RelayContext:
    """What every worker shares: configuration, routing table, store, relay key, budgets."""

    def __init__(
        self,
        config: RelayConfig,
        router: Router,
        store: Mailboxes,
        static_private: bytes,
        budgets: Budgets | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.store = store
        self.static_private = static_private
        self.admission: Admission[Conn] = Admission(config)
        # A cluster's budgets live in Redis (cluster.RedisBudgets); alone, in memory.
        self.budgets = budgets if budgets is not None else Budgets(config)
        self.partial: PartialBytes[Conn] = PartialBytes(
            config.partial_bytes, config.partial_bytes_per_prefix
        )
        self.rendezvous: Rendezvous[Conn] = Rendezvous(config)  # invites
        self.listener: socket.socket | None = None  # set by the relay before workers start
