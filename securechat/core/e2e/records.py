"""What the end-to-end state keeps per peer and per session (core).

Shared by the rules (:mod:`securechat.core.e2e.state`) and the saved-state format
(:mod:`securechat.core.e2e.persist`), so neither imports the other's internals.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from securechat.core import ratchet
from securechat.core.envelope import Content
from securechat.core.keys import PublicIdentity

# --- bounds and periods we chose ------------------------------------------------------------
DAY_MS: Final = 24 * 3600 * 1000
SPK_ROTATION_MS: Final = 7 * DAY_MS  # a new signed prekey after a week
SPK_GRACE_MS: Final = 30 * DAY_MS  # old ones still open initial messages for a month
MAX_OLD_SIGNED_PREKEYS: Final = 4
MAX_ONE_TIME_PREKEYS: Final = 1000  # private halves kept; the oldest are dropped beyond
MAX_SESSIONS_PER_PEER: Final = 4
MAX_SEEN: Final = 4096  # msg ids and payload digests remembered per peer
# A session-opening message must be sent within this window of our clock: no
# older than the oldest signed prekey we still keep (rotation + grace: older
# initial messages cannot open anyway), no further ahead than the clock skew.
REPLAY_WINDOW_MS: Final = SPK_ROTATION_MS + SPK_GRACE_MS
MAX_CLOCK_SKEW_MS: Final = 3600 * 1000
# Accepted X3DH ephemeral keys remembered per peer (within the window). One peer
# filling its own list can only raise its own floor, never another peer's.
MAX_EPHEMERALS_PER_PEER: Final = 64
# Peers we neither sent to nor were told to trust are evicted, least recently
# active first, beyond this many, so unknown senders cannot grow the state
# without bound (each costs up to a few hundred KiB at worst).
MAX_UNPINNED_PEERS: Final = 1000
MAX_PEERS: Final = 100_000  # sanity bound when loading state
# Derivation work (KDF_CK steps; a DH counts ratchet.DH_STEP_COST) a peer's
# messages may cost us: a token bucket per peer, so forged headers with new
# ratchet keys and large counters cannot burn our CPU.
WORK_PER_SECOND: Final = 4096
WORK_BURST: Final = 16384
X3DH_COST: Final = 4 * ratchet.DH_STEP_COST
MAX_WORK_BUCKETS: Final = 4096  # senders whose budget is tracked (memory bound)


@dataclass(slots=True)
class Session:
    peer: PublicIdentity
    ad: bytes  # X3DH associated data
    ephemeral: bytes  # the X3DH ephemeral key that created the session
    initial: bytes | None  # envelope prefix repeated until the peer replies
    state: ratchet.RatchetState


@dataclass(slots=True)
class Peer:
    # OrderedDicts: evicting the oldest entry is O(1); popping a plain dict's
    # first key over and over makes every later lookup of the first key slower.
    identity: PublicIdentity
    sessions: list[Session] = field(default_factory=list)
    seen_ids: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    seen_payloads: OrderedDict[bytes, tuple[bytes, int]] = field(default_factory=OrderedDict)
    # accepted X3DH ephemeral key -> its message's sent_ms, oldest first
    ephemerals: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    floor_ms: int = -1  # new sessions sent at or before this are replays (evicted keys)
    pinned: bool = False  # we sent to it, or the user trusts it: never evicted

    def remember(self, digest: bytes, content: Content) -> None:
        msg_id, ids, payloads = content.msg_id, self.seen_ids, self.seen_payloads
        ids[msg_id] = None
        payloads[digest] = (msg_id, content.sent_ms)
        while len(ids) > MAX_SEEN:
            ids.popitem(last=False)
        while len(payloads) > MAX_SEEN:
            payloads.popitem(last=False)

    def remember_ephemeral(self, ephemeral: bytes, sent_ms: int, now_ms: int) -> None:
        """Remember an accepted session-opening key; forget what the window rejects anyway."""
        ephemerals = self.ephemerals
        ephemerals[ephemeral] = sent_ms
        oldest_allowed = now_ms - REPLAY_WINDOW_MS
        for key, sent in list(ephemerals.items()):
            if sent < oldest_allowed:
                del ephemerals[key]
        while len(ephemerals) > MAX_EPHEMERALS_PER_PEER:
            _, sent = ephemerals.popitem(last=False)
            self.floor_ms = max(self.floor_ms, sent)
