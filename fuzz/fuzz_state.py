"""Fuzz the end-to-end layer's byte parsers: stored state and incoming payloads.

Invariant: any bytes give a result or a ``SecureChatError`` (our tree), never
another exception; a rejected payload leaves the state unchanged. The first
input byte picks the target, the rest is the input:

    0  E2EState.deserialize (the client state blob, decrypted from disk)
    1  E2EState.decrypt from a known peer with a live session (envelope + ratchet)
    2  E2EState.decrypt from an unknown sender (initial-message / X3DH path)
    3  envelope.decode_content (padded plaintext record after decryption)
    4  E2EState.load with bob's core row and the input as alice's peer row

Run (needs ``atheris``):  python fuzz/fuzz_state.py fuzz/corpus/state
Without atheris:         python fuzz/fuzz_state.py --replay [N]
                         python fuzz/fuzz_state.py --make-corpus
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

from securechat.core import envelope
from securechat.core.e2e import Content, E2EState, parse_bundle
from securechat.core.keys import Identity, generate_identity
from securechat.errors import SecureChatError

import _harness  # the fuzz/ folder is on sys.path when run as a script

CORPUS = Path(__file__).resolve().parent / "corpus" / "state"


def _rng(label: str) -> Callable[[int], bytes]:
    counter = [0]

    def rng(n: int) -> bytes:
        counter[0] += 1
        return hashlib.shake_256(f"{label}/{counter[0]}".encode()).digest(n)

    return rng


def _identity(name: str) -> Identity:
    return generate_identity(name, hashlib.sha512(f"fuzz {name}".encode()).digest())


ALICE, BOB, EVE = _identity("alice"), _identity("bob"), _identity("eve")


def _conversation() -> tuple[bytes, list[bytes], list[bytes]]:
    """A short deterministic alice<->bob exchange: bob's state, payloads alice sent, bob's."""
    rng = _rng("conv")
    alice, bob = E2EState.new(ALICE), E2EState.new(BOB)
    signed, otks = bob.make_prekeys(rng, 0, one_time=2)
    bundle = parse_bundle(signed, otks[0])
    to_bob, to_alice = [], []
    for i in range(3):
        content = Content(rng(16), i, f"hello bob {i}")
        to_bob.append(alice.encrypt(BOB.public, content, rng, i, bundle if i == 0 else None))
    for p in to_bob[:2]:
        bob.decrypt(ALICE.public.dh, p, 10)
    to_alice.append(bob.encrypt(ALICE.public, Content(rng(16), 11, "hi alice"), rng, 11))
    return bob.serialize(), to_bob, to_alice


_BOB_STATE, _TO_BOB, _TO_ALICE = _conversation()
_BOB_ROWS = E2EState.deserialize(BOB, _BOB_STATE).take_changes()


def _deserialize(body: bytes) -> None:
    state = E2EState.deserialize(BOB, body)
    assert E2EState.deserialize(BOB, state.serialize()).serialize() == state.serialize()


def _load_peer_row(body: bytes) -> None:
    assert _BOB_ROWS.core is not None
    state = E2EState.load(BOB, _BOB_ROWS.core, {ALICE.public.dh: body})
    changes = E2EState.deserialize(BOB, state.serialize()).take_changes()
    assert changes.peers == {ALICE.public.dh: body}, "a peer row is not canonical"


def _decrypt_as(sender: Identity, body: bytes) -> None:
    bob = E2EState.deserialize(BOB, _BOB_STATE)
    try:
        bob.decrypt(sender.public.dh, body, 20)
    except SecureChatError:
        assert bob.serialize() == _BOB_STATE, "a rejected payload changed the state"
        raise


def _content(body: bytes) -> None:
    content = envelope.decode_content(body)
    assert envelope.decode_content(envelope.encode_content(content)) == content


_TARGETS: tuple[Callable[[bytes], None], ...] = (
    _deserialize,
    lambda body: _decrypt_as(ALICE, body),
    lambda body: _decrypt_as(EVE, body),
    _content,
    _load_peer_row,
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    with contextlib.suppress(SecureChatError):
        _TARGETS[data[0] % len(_TARGETS)](data[1:])


def make_corpus() -> int:
    CORPUS.mkdir(parents=True, exist_ok=True)
    seeds = {
        "state_bob": b"\x00" + _BOB_STATE,
        "state_new": b"\x00" + E2EState.new(BOB).serialize(),
        "msg_initial_0": b"\x01" + _TO_BOB[0],
        "msg_initial_2": b"\x01" + _TO_BOB[2],
        "msg_unknown_sender": b"\x02" + _TO_BOB[0],
        "content_plain": b"\x03" + envelope.encode_content(Content(bytes(16), 1, "x")),
        "peer_row_alice": b"\x04" + _BOB_ROWS.peers[ALICE.public.dh],
        "content_group": b"\x03"
        + envelope.encode_content(
            Content(bytes(16), 2, "group hi", envelope.Group.of((ALICE.public.dh, BOB.public.dh)))
        ),
    }
    for name, blob in seeds.items():
        (CORPUS / name).write_bytes(blob)
    print(f"wrote {len(seeds)} seeds to {CORPUS}")
    return 0


def main() -> int:
    return _harness.main(test_one_input, CORPUS, make_corpus, default_rounds=5000)


if __name__ == "__main__":
    sys.exit(main())
