"""The invite rendezvous: where two clients with one code meet (protocol section 7).

The relay only pairs connections and forwards a few opaque messages: the code's
words never reach it, and what the clients exchange is SPAKE2 and AEAD output it
cannot use. Rules, in the order they apply:

* ``InviteOpen``: allocate the smallest free nameplate (>= 1) and bind it to the
  connection, unless the opener's identity, its prefix or the relay already has
  as many open invites as allowed (then ``InviteClosed(0, TOO_MANY)``).
* ``InviteJoin(n)``: charged to the joiner's identity and prefix (a budget that
  survives reconnects: every join is a guess at someone's code). An open, not yet
  joined ``n`` is consumed by this join, right code or not; otherwise
  ``InviteClosed(n, NO_SUCH | USED)``.
* ``InviteData(n, payload)`` from a party of a joined ``n`` is forwarded to the
  other party; from anyone else, or before the join, it is ignored. A party's
  third message closes the invite for both (``VIOLATION``). Once each party has
  sent its two, the exchange is complete and the invite is forgotten.
* A party disconnecting closes its invites (the other party gets ``PEER_LEFT``);
  an invite older than its time to live is closed (``EXPIRED``) by the relay's
  existing once-a-second tick: no timer per invite.

Channels live in memory only (no store writes) and are bounded per identity, per
prefix and in all. :class:`Rendezvous` holds the rules and no I/O (tested in
memory): it returns the frames to queue on which connection; ``services.py``
feeds it the invite frames and queues what it returns.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

from securechat.core import wire
from securechat.relay.limits import INVITE_MESSAGES_PER_PARTY, RelayConfig

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True, eq=False)
class Channel(Generic[K]):
    """One open invite: its opener, and its joiner once someone joined."""

    nameplate: int
    opener: K
    identity: bytes
    prefix: str
    expires: float
    joiner: K | None = None
    sent: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})  # by is-opener


Action: TypeAlias = tuple[K, wire.Frame]  # queue this frame on that connection


class Rendezvous(Generic[K]):
    """Open invites by nameplate; thread-safe (one lock), no I/O, no clock of its own."""

    def __init__(self, config: RelayConfig) -> None:
        self._ttl = config.invite_ttl
        self._max_open = config.invite_max_open
        self._max_per_prefix = config.invite_max_open_per_prefix
        self._max_per_identity = config.invite_max_open_per_identity
        self._lock = threading.Lock()
        self._channels: OrderedDict[int, Channel[K]] = OrderedDict()  # oldest (expiring) first
        self._free: list[int] = []  # freed nameplates below _next (a min-heap)
        self._next = 1
        self._per_identity: dict[bytes, int] = {}
        self._per_prefix: dict[str, int] = {}
        self._by_conn: dict[K, set[int]] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def open(self, conn: K, identity: bytes, prefix: str, now: float) -> list[Action[K]]:
        with self._lock:
            if (
                len(self._channels) >= self._max_open
                or self._per_prefix.get(prefix, 0) >= self._max_per_prefix
                or self._per_identity.get(identity, 0) >= self._max_per_identity
            ):
                return [(conn, wire.InviteClosed(0, wire.INVITE_TOO_MANY))]
            plate = heapq.heappop(self._free) if self._free else self._allocate_next()
            self._channels[plate] = Channel(plate, conn, identity, prefix, now + self._ttl)
            self._per_identity[identity] = self._per_identity.get(identity, 0) + 1
            self._per_prefix[prefix] = self._per_prefix.get(prefix, 0) + 1
            self._by_conn.setdefault(conn, set()).add(plate)
            return [(conn, wire.InviteOpened(plate))]

    def _allocate_next(self) -> int:
        plate = self._next
        self._next += 1
        return plate

    def join(self, conn: K, nameplate: int) -> list[Action[K]]:
        with self._lock:
            channel = self._channels.get(nameplate)
            if channel is None or channel.opener == conn:
                return [(conn, wire.InviteClosed(nameplate, wire.INVITE_NO_SUCH))]
            if channel.joiner is not None:
                return [(conn, wire.InviteClosed(nameplate, wire.INVITE_USED))]
            channel.joiner = conn  # consumed, whatever the joiner's code
            self._by_conn.setdefault(conn, set()).add(nameplate)
            return []

    def data(self, conn: K, nameplate: int, payload: bytes) -> list[Action[K]]:
        with self._lock:
            channel = self._channels.get(nameplate)
            if channel is None or channel.joiner is None:
                return []  # not paired (yet, or any more): nobody to forward to
            if conn == channel.opener:
                other, side = channel.joiner, True
            elif conn == channel.joiner:
                other, side = channel.opener, False
            else:
                return []  # not a party: ignored
            channel.sent[side] += 1
            if channel.sent[side] > INVITE_MESSAGES_PER_PARTY:
                return self._end(channel, wire.INVITE_VIOLATION)
            actions: list[Action[K]] = [(other, wire.InviteData(nameplate, payload))]
            if all(n == INVITE_MESSAGES_PER_PARTY for n in channel.sent.values()):
                self._end(channel, None)  # complete: forget it quietly
            return actions

    def dropped(self, conn: K) -> list[Action[K]]:
        """``conn`` closed: its invites end; the other parties are told."""
        with self._lock:
            actions: list[Action[K]] = []
            for plate in sorted(self._by_conn.get(conn, ())):
                channel = self._channels.get(plate)
                if channel is not None:
                    actions += self._end(channel, wire.INVITE_PEER_LEFT, skip=conn)
            self._by_conn.pop(conn, None)
            return actions

    def expire(self, now: float) -> list[Action[K]]:
        """Close every invite past its time to live (oldest first: one look when none is)."""
        with self._lock:
            actions: list[Action[K]] = []
            while self._channels:
                channel = next(iter(self._channels.values()))
                if channel.expires > now:
                    break
                actions += self._end(channel, wire.INVITE_EXPIRED)
            return actions

    def _end(
        self, channel: Channel[K], reason: int | None, skip: K | None = None
    ) -> list[Action[K]]:
        """Forget ``channel`` (lock held); tell its parties why, unless ``reason`` is None."""
        plate = channel.nameplate
        del self._channels[plate]
        heapq.heappush(self._free, plate)
        _decrement(self._per_identity, channel.identity)
        _decrement(self._per_prefix, channel.prefix)
        parties = [channel.opener] if channel.joiner is None else [channel.opener, channel.joiner]
        actions: list[Action[K]] = []
        for party in parties:
            plates = self._by_conn.get(party)
            if plates is not None:
                plates.discard(plate)
                if not plates:
                    del self._by_conn[party]
            if reason is not None and party != skip:
                actions.append((party, wire.InviteClosed(plate, reason)))
        return actions


def _decrement(counts: dict[K, int], key: K) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
