"""The end-to-end state of one identity, kept as rows of its client store (shell).

The state (:class:`~securechat.core.e2e.E2EState`) lives in memory while the
client runs; every change to it is written in the *same* store transaction as
the outbox entry, history line or receipt that caused it (docs/protocol.md,
section 5), so a crash leaves both or neither. Only the rows that changed are
written: one core row and one row per peer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

from securechat.client.store import ClientStore
from securechat.core import e2e, keys
from securechat.errors import StorageError

LEGACY_BLOB: Final = "e2e_state"  # schema 1: the whole E2E state in one sealed blob


class E2EStore:
    """The loaded state (:attr:`state`) and the transactions that save its changes."""

    def __init__(self, identity: keys.Identity, store: ClientStore) -> None:
        self._store = store
        self.state = _load(identity, store)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """A store transaction that also writes the E2E rows changed since the last one.

        If it fails (the body raises or COMMIT does), those rows roll back with
        the rest and are marked changed again, so the next transaction writes them.
        """
        changes = self.state.take_changes()
        try:
            with self._store.transaction():
                self._store.put_e2e_rows(changes.core, changes.peers, changes.deleted)
                yield
        except BaseException:
            self.state.requeue(changes)
            raise

    def save_if_changed(self) -> None:
        """Write the E2E rows that changed, if any (no empty transaction while idle)."""
        if self.state.has_changes():
            with self.transaction():
                pass


def _load(identity: keys.Identity, store: ClientStore) -> e2e.E2EState:
    """The E2E state from its rows, after moving a schema 1 single blob into rows.

    The move is one transaction (rows written, blob deleted), so a crash leaves
    either the blob or the rows. Rows already there can only be older than a
    blob (a downgraded client wrote it): the blob's core and peers win.
    """
    with store.transaction():
        legacy = store.get_blob(LEGACY_BLOB)
        if legacy is not None:
            changes = e2e.E2EState.deserialize(identity, legacy).take_changes()
            store.put_e2e_rows(changes.core, changes.peers)
            store.delete_blob(LEGACY_BLOB)
        core, peers = store.e2e_rows()
    if core is None:
        if peers:
            raise StorageError(
                f"{store.path} has sessions but no end-to-end core state (corrupt?)",
                hint=f"move {store.path} away to start fresh (sessions are set up again)",
            )
        return e2e.E2EState.new(identity)  # its core is written by the first save
    return e2e.E2EState.load(identity, core, peers, key_of=store.peer_key)
