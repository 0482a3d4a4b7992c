"""Whom we talk to: conversations, and the peers we trust (shell).

Trust is on first use, per name, like OpenSSH's ``known_hosts``: the first
time the user names a peer (``talk --peer bob``) its key is recorded; a later
different key under that name is refused until the user runs ``securechat
trust``. The record lives sealed in the client store. The engine also asks,
for every incoming message, which identity the user trusts for the sender's
X25519 key, so an INITIAL claiming a known peer with another signing key is
refused (``E2EState.decrypt(trusted=...)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import nacl.bindings

from securechat.client import keystore
from securechat.client.store import ClientStore
from securechat.core import envelope, keys
from securechat.errors import PeerKeyChangedError, SecureChatError, UsageError

DIRECT_CONV_KEY: Final = b"securechat/v1/client/direct"


@dataclass(frozen=True, slots=True)
class Conversation:
    """Who a message goes to: one peer, or a group of several whose id is derived."""

    conv_id: str
    peers: tuple[keys.PublicIdentity, ...]
    group: envelope.Group | None

    @classmethod
    def with_peers(
        cls, me: keys.PublicIdentity, peers: Iterable[keys.PublicIdentity]
    ) -> Conversation:
        unique = {p.dh: p for p in peers if p.dh != me.dh}
        members = tuple(unique.values())
        if not members:
            raise UsageError(
                "a conversation needs at least one peer other than yourself",
                hint="name someone with --peer",
            )
        if len(members) == 1:
            return cls(direct_conv_id(me.dh, members[0].dh), members, None)
        group = envelope.Group.of([me.dh, *unique])
        return cls(group_conv_id(group), members, group)


def group_conv_id(group: envelope.Group) -> str:
    return f"group-{group.group_id.hex()}"


def direct_conv_id(a: bytes, b: bytes) -> str:
    digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        b"".join(sorted([a, b])), digest_size=32, key=DIRECT_CONV_KEY
    )
    return "dm-" + bytes(digest[:16]).hex()


class KnownPeers:
    """Trust on first use, per name; stored sealed in the client store.

    The entries are cached in memory (this process holds the store's lock, so
    nobody else writes them); every message looks its sender up here.
    """

    BLOB: Final = "known_peers"

    def __init__(self, store: ClientStore) -> None:
        self._store = store
        self._cache: dict[str, keys.PublicIdentity] | None = None

    def _all(self) -> dict[str, keys.PublicIdentity]:
        if self._cache is None:
            value = self._store.get_json(self.BLOB)
            lines = dict(value) if isinstance(value, dict) else {}
            self._cache = {
                name: keys.PublicIdentity.from_line(line) for name, line in lines.items()
            }
        return self._cache

    def _put(self, entries: dict[str, keys.PublicIdentity]) -> None:
        self._cache = None  # re-read after the write (a rollback must not leave it stale)
        self._store.put_json(self.BLOB, {n: p.to_line() for n, p in entries.items()})

    def check(self, peer: keys.PublicIdentity) -> None:
        """Record a new name; refuse a known name whose key changed."""
        entries = dict(self._all())
        known = entries.get(peer.name)
        if known is None:
            entries[peer.name] = peer
            self._put(entries)
            return
        if not known.same_keys(peer):
            raise PeerKeyChangedError(
                f"WARNING: the key for {peer.name!r} has CHANGED (was {known.fingerprint}, now "
                f"{peer.fingerprint}). Someone may be impersonating {peer.name}. Refusing to send",
                hint=f"verify the new safety number with {peer.name} out of band (securechat "
                f"safety-number --peer {peer.name}), then run 'securechat trust {peer.name}'",
            )

    def trust(self, peer: keys.PublicIdentity) -> bool:
        """Accept ``peer``'s current key; True if it replaced another."""
        entries = dict(self._all())
        old = entries.get(peer.name)
        entries[peer.name] = peer
        self._put(entries)
        return old is not None and not old.same_keys(peer)

    def trusted_identity(self, identity_dh: bytes) -> keys.PublicIdentity | None:
        """The identity the user trusts for this X25519 key, if any."""
        for peer in self._all().values():
            if peer.dh == identity_dh:
                return peer
        return None

    def name_of(self, sender: keys.PublicIdentity) -> tuple[str, bool]:
        """Display name and whether it is verified (a known peer with these keys).

        A sender not yet known but whose ``NAME.pub`` the user put in the key
        directory is recorded under that name on first sight, as ``talk --peer
        NAME`` would have done.
        """
        entries = self._all()
        for name, known in entries.items():
            if known.same_keys(sender):
                return name, True
        for path in sorted(keystore.home().glob(f"*{keystore.PUBLIC_SUFFIX}")):
            try:
                candidate = keystore.load_public(str(path))
            except SecureChatError:
                continue
            if candidate.same_keys(sender) and candidate.name not in entries:
                self.trust(candidate)
                return candidate.name, True
        return (sender.name or "unknown"), False

    def identities(self) -> list[keys.PublicIdentity]:
        return list(self._all().values())
