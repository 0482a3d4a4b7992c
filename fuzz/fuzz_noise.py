"""Fuzz target: arbitrary bytes to a fresh relay-side NoiseConnection.

Invariant: ``receive_data`` returns or raises a ``SecureChatError`` (our tree),
never another exception; after an error the connection says ``failed``.

Run:  python fuzz/fuzz_noise.py fuzz/corpus/noise  (needs ``atheris``; the module
imports without it so that tests and linters can load it).
The first input byte picks a scenario: 0 = responder awaiting message 1,
1 = responder awaiting message 3 (after a valid message 1), 2 = established link;
the rest is split into up to 4 chunks to exercise buffering.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable

from securechat.core import noise
from securechat.errors import SecureChatError

_RELAY_KEY = hashlib.blake2s(b"fuzz relay static").digest()
_CLIENT_KEY = hashlib.blake2s(b"fuzz client static").digest()


def _rng(label: bytes) -> Callable[[int], bytes]:
    return lambda n: hashlib.blake2s(label, digest_size=n).digest()


def _responder(scenario: int) -> noise.NoiseConnection:
    relay = noise.NoiseConnection(initiator=False, static_private=_RELAY_KEY, rng=_rng(b"r"))
    if scenario == 0:
        return relay
    client = noise.NoiseConnection(initiator=True, static_private=_CLIENT_KEY, rng=_rng(b"c"))
    _, _, m2 = relay.receive_data(client.initiate())
    if scenario == 1:
        return relay
    _, _, m3 = client.receive_data(m2)
    relay.receive_data(m3)
    return relay


def test_one_input(data: bytes) -> None:
    if not data:
        return
    relay = _responder(data[0] % 3)
    body = data[1:]
    cuts = sorted({len(body) * k // 4 for k in range(1, 4)})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for piece in pieces:
        try:
            events, plain, reply = relay.receive_data(piece)
        except SecureChatError:
            assert relay.failed
            return
        assert isinstance(plain, bytes) and isinstance(reply, bytes)
        for event in events:
            assert len(event.remote_static) == noise.DHLEN


def main() -> None:
    import atheris  # type: ignore[import-untyped]  # only needed to fuzz

    atheris.instrument_all()  # coverage for every module already imported (ours included)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
