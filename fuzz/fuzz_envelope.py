"""Fuzz the E2E receive path: any bytes must give a result or our errors only.

With atheris (``pip install atheris``)::

    python fuzz/fuzz_envelope.py fuzz/corpus/envelope -max_total_time=60

Without atheris it replays the corpus plus random mutations of it (a smoke run
for CI): ``python fuzz/fuzz_envelope.py --smoke fuzz/corpus/envelope``.

Each input is fed to ``envelope.decode_envelope``, ``envelope.decode_content``
and a receiving ``E2EState.decrypt`` that has a live session with the sender,
so mutations of real messages reach the ratchet and the content parser. The
only exceptions allowed are AuthenticationError and SessionError, and a failed
decrypt must not change the receiver's state.
"""

from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

from securechat.core import envelope
from securechat.core.e2e import Content, E2EState, parse_bundle
from securechat.core.keys import generate_identity
from securechat.errors import AuthenticationError, SessionError

CORPUS = Path(__file__).resolve().parent / "corpus" / "envelope"


def _pair() -> tuple[E2EState, E2EState, bytes]:
    rng = random.Random(1234).randbytes
    alice = E2EState.new(generate_identity("alice", random.Random(1).randbytes(64)))
    bob = E2EState.new(generate_identity("bob", random.Random(2).randbytes(64)))
    spk, opks = bob.make_prekeys(rng, 0, one_time=1)
    first = alice.encrypt(
        bob.identity.public, Content(bytes(16), 1, "seed"), rng, 0, parse_bundle(spk, opks[0])
    )
    bob.decrypt(alice.identity.public.dh, first, 0)
    return alice, bob, alice.identity.public.dh


ALICE, BOB, SENDER = _pair()


def one_input(data: bytes) -> None:
    for parse in (envelope.decode_envelope, envelope.decode_content):
        with contextlib.suppress(AuthenticationError, SessionError):
            parse(data)
    before = BOB.serialize()
    try:
        BOB.decrypt(SENDER, data, 0)
    except (AuthenticationError, SessionError):
        if BOB.serialize() != before:
            raise AssertionError("a rejected input changed the session state") from None


def write_corpus() -> None:
    """Seed files: real initial/normal messages and a padded content record."""
    rng = random.Random(5).randbytes
    alice, bob, _ = _pair()
    CORPUS.mkdir(parents=True, exist_ok=True)
    seeds = {
        "normal.bin": alice.encrypt(bob.identity.public, Content(bytes([1]) * 16, 2, "hi"), rng, 0),
        "content.bin": envelope.encode_content(Content(bytes(16), 3, "text")),
    }
    carol = E2EState.new(generate_identity("carol", random.Random(3).randbytes(64)))
    seeds["initial_fallback.bin"] = carol.encrypt(
        bob.identity.public, Content(bytes(16), 4, "x"), rng, 0
    )
    for name, data in seeds.items():
        (CORPUS / name).write_bytes(data)


def smoke(corpus: Path, rounds: int = 2000) -> None:
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir())] or [b""]
    r = random.Random(0)
    for i in range(rounds):
        data = bytearray(r.choice(seeds))
        for _ in range(r.randint(1, 4)):
            op = r.randrange(3)
            if op == 0 and data:
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            elif op == 1 and data:
                del data[r.randrange(len(data)) :]
            else:
                data += r.randbytes(r.randint(1, 8))
        one_input(bytes(data) if i else seeds[0])
    print(f"smoke: {rounds} inputs, no unexpected exception")


def main() -> None:
    if "--write-corpus" in sys.argv:
        write_corpus()
        return
    if "--smoke" in sys.argv:
        smoke(Path(sys.argv[-1]) if len(sys.argv) > 2 else CORPUS)
        return
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
