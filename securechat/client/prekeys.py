"""Prekey bundles of peers we have no session with: asked for, verified, never skipped silently.

Part of the client session (no I/O: frames out, frames and ``now_ms`` in). A
session with a new peer starts from its bundle; the no-prekey start is allowed
only for a peer the relay says never published one *and* that this client never
saw with one (docs/protocol.md, section 5): otherwise a relay could downgrade
every new session by answering "none".

Each peer we need a bundle for is in one state::

    (absent) --ask: FetchPrekeys--> WAITING
    WAITING  --Prekeys with a bundle signed by the peer--> READY(bundle)
    WAITING  --Prekeys "none", peer never seen with one--> READY(None: no-prekey start)
    WAITING  --"none" for a peer seen before | a bad signature | FETCH_TIMEOUT--> FAILED(why)
    READY    --taken by the message that needed it--> (absent)
    FAILED   --retry (every HELD_RETRY, on Synced)--> (absent), asked again
    WAITING  --connection lost--> (absent): the answer cannot come any more

A ``Prekeys`` nobody asked for is ignored, so the relay cannot push bundles on
us. At most :data:`MAX_IN_FLIGHT` questions are open at once (a whole group's,
within the relay's fetch burst), and the table keeps only peers some held
message is waiting for (:meth:`PrekeyFetches.keep_only`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from securechat.client.store import ClientStore
from securechat.core import keys, wire, x3dh
from securechat.errors import SecureChatError

FETCH_TIMEOUT: Final = 5.0  # seconds the relay has to answer a FetchPrekeys
MAX_IN_FLIGHT: Final = 64  # a 64-member group asks for 63 bundles at once (relay burst: 100)
PREKEY_PEERS: Final = "prekey_peers"  # meta blob: peers once seen with a bundle


class FetchState(Enum):
    WAITING = "waiting"
    READY = "ready"
    FAILED = "failed"


@dataclass(slots=True)
class _Fetch:
    peer: keys.PublicIdentity
    state: FetchState
    deadline_ms: int = 0
    bundle: x3dh.Bundle | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why a message cannot be sealed yet: ``reason`` for the user, or "" while we wait."""

    reason: str
    ask: tuple[keys.PublicIdentity, ...]  # peers to ask for a bundle now


class PrekeyFetches:
    """See the module docstring."""

    def __init__(self, store: ClientStore) -> None:
        self._store = store
        self._seen: set[str] = set(store.get_json(PREKEY_PEERS) or ())
        self._fetches: dict[bytes, _Fetch] = {}

    def blocked(self, missing: Iterable[keys.PublicIdentity]) -> Blocked | None:
        """None when every peer in ``missing`` (no session yet) has its bundle in hand."""
        ask: list[keys.PublicIdentity] = []
        waiting = False
        for peer in missing:
            fetch = self._fetches.get(peer.dh)
            if fetch is None:
                ask.append(peer)
            elif fetch.state is FetchState.FAILED:
                return Blocked(fetch.reason, ())
            elif fetch.state is FetchState.WAITING:
                waiting = True
        return Blocked("", tuple(ask)) if ask or waiting else None

    def ask(self, peers: Iterable[keys.PublicIdentity], now_ms: int) -> list[wire.Frame]:
        """FetchPrekeys for ``peers``, as many as may be open at once."""
        frames: list[wire.Frame] = []
        deadline = now_ms + int(FETCH_TIMEOUT * 1000)
        for peer in peers:
            if self.in_flight() >= MAX_IN_FLIGHT:
                break
            self._fetches[peer.dh] = _Fetch(peer, FetchState.WAITING, deadline)
            frames.append(wire.FetchPrekeys(peer.dh))
        return frames

    def in_flight(self) -> int:
        return sum(f.state is FetchState.WAITING for f in self._fetches.values())

    def answer(self, frame: wire.Prekeys) -> bool:
        """Take the relay's answer; False if nobody asked (ignored)."""
        fetch = self._fetches.get(frame.identity_key)
        if fetch is None or fetch.state is not FetchState.WAITING:
            return False
        peer = fetch.peer
        if not frame.signed_prekey:
            if peer.dh.hex() in self._seen:
                self._fail(
                    fetch,
                    f"the relay says {peer.name} has no prekeys, but {peer.name} published some "
                    "before: holding the message rather than starting without them (the relay "
                    "may be interfering)",
                )
            else:  # never published any: the documented no-prekey start
                fetch.state = FetchState.READY
            return True
        try:
            bundle = x3dh.parse_bundle(frame.signed_prekey, frame.one_time_prekey)
            assert bundle.signed_prekey is not None
            bundle.signed_prekey.verify(peer)
        except SecureChatError:
            self._fail(
                fetch,
                f"the relay handed out prekeys for {peer.name} that {peer.name} did not sign "
                "(the relay may be interfering); holding the message",
            )
            return True
        fetch.state, fetch.bundle = FetchState.READY, bundle
        self._saw_prekeys(peer)
        return True

    def expire(self, now_ms: int) -> bool:
        """Questions past their deadline fail; True if any did."""
        late = [
            f
            for f in self._fetches.values()
            if f.state is FetchState.WAITING and now_ms >= f.deadline_ms
        ]
        for fetch in late:
            self._fail(fetch, f"the relay did not answer for {fetch.peer.name}'s prekeys")
        return bool(late)

    def take(self, peer: keys.PublicIdentity) -> x3dh.Bundle | None:
        """The bundle for ``peer`` (None: the no-prekey start), used once."""
        fetch = self._fetches.pop(peer.dh)
        assert fetch.state is FetchState.READY
        return fetch.bundle

    def retry(self) -> None:
        """Forget failures, so the next pass asks again."""
        self._drop(FetchState.FAILED)

    def connection_lost(self) -> None:
        self._drop(FetchState.WAITING)

    def keep_only(self, wanted: set[bytes]) -> None:
        """Forget bundles and answers no held message waits for any more."""
        for dh in [dh for dh in self._fetches if dh not in wanted]:
            del self._fetches[dh]

    def _drop(self, state: FetchState) -> None:
        for dh in [dh for dh, f in self._fetches.items() if f.state is state]:
            del self._fetches[dh]

    @staticmethod
    def _fail(fetch: _Fetch, reason: str) -> None:
        fetch.state, fetch.reason = FetchState.FAILED, reason

    def _saw_prekeys(self, peer: keys.PublicIdentity) -> None:
        key = peer.dh.hex()
        if key in self._seen:
            return
        with self._store.transaction():
            self._store.put_json(PREKEY_PEERS, sorted({*self._seen, key}))
        self._seen.add(key)
