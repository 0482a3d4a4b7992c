"""Hypothesis strategies shared by the unit tests and the stateful fuzz tests."""

from __future__ import annotations

from hypothesis import strategies as st
from securechat.core import wire

ids = st.binary(min_size=16, max_size=16)
keys = st.binary(min_size=32, max_size=32)
payloads = st.binary(min_size=1, max_size=300)
u64 = st.integers(0, 2**64 - 1)

frames_st: st.SearchStrategy[wire.Frame] = st.one_of(
    st.builds(wire.Send, ids, keys, payloads),
    st.builds(
        wire.SendMulti,
        ids,
        st.dictionaries(keys, payloads, min_size=1, max_size=5).map(lambda d: tuple(d.items())),
    ),
    st.builds(wire.Accepted, ids, st.sampled_from([1, 2])),
    st.builds(wire.Delivered, ids, keys),
    st.builds(wire.Deliver, ids, keys, u64, payloads),
    st.builds(wire.Ack, st.lists(st.tuples(keys, ids), min_size=1, max_size=5).map(tuple)),
    st.just(wire.Synced()),
    st.builds(
        wire.PublishPrekeys,
        st.binary(max_size=1024),
        st.lists(st.binary(min_size=36, max_size=36), max_size=4).map(tuple),
    ),
    st.builds(wire.FetchPrekeys, keys),
    st.builds(
        wire.Prekeys,
        keys,
        st.binary(max_size=200),
        st.none() | st.binary(min_size=36, max_size=36),
    ),
    st.builds(wire.PrekeyCount, st.integers(0, 2**32 - 1)),
    st.builds(
        wire.Error,
        st.sampled_from(sorted(wire.ERROR_CODES)),
        ids,
        st.text(max_size=100),
    ),
    st.builds(wire.Ping, u64),
    st.builds(wire.Pong, u64),
    st.builds(wire.PresenceSubscribe, st.lists(keys, max_size=4).map(tuple)),
    st.builds(wire.Presence, keys, st.booleans()),
)
