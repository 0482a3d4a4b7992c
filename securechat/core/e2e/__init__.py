"""End-to-end state of one local identity (core): the rules in :mod:`.state`, what is
kept per peer in :mod:`.records`, the saved form in :mod:`.persist`."""

from securechat.core.e2e.records import (
    DAY_MS,
    MAX_CLOCK_SKEW_MS,
    MAX_EPHEMERALS_PER_PEER,
    MAX_SEEN,
    MAX_SESSIONS_PER_PEER,
    MAX_UNPINNED_PEERS,
    REPLAY_WINDOW_MS,
    SPK_GRACE_MS,
    SPK_ROTATION_MS,
    WORK_BURST,
    WORK_PER_SECOND,
)
from securechat.core.e2e.state import E2EState, Received, StateChanges
from securechat.core.envelope import Content, Group
from securechat.core.x3dh import Bundle, parse_bundle

__all__ = [
    "DAY_MS",
    "MAX_CLOCK_SKEW_MS",
    "MAX_EPHEMERALS_PER_PEER",
    "MAX_SEEN",
    "MAX_SESSIONS_PER_PEER",
    "MAX_UNPINNED_PEERS",
    "REPLAY_WINDOW_MS",
    "SPK_GRACE_MS",
    "SPK_ROTATION_MS",
    "WORK_BURST",
    "WORK_PER_SECOND",
    "Bundle",
    "Content",
    "E2EState",
    "Group",
    "Received",
    "StateChanges",
    "parse_bundle",
]
