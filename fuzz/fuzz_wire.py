"""Fuzz the frame decoder: any bytes give frames, need-more-data, or FrameError only.

With atheris (``pip install .[fuzz]``)::

    python fuzz/fuzz_wire.py fuzz/corpus/wire -max_total_time=60

Without atheris it replays the corpus plus random mutations of it, so CI can run it
anywhere: ``python fuzz/fuzz_wire.py --replay [N]``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from securechat.core import wire
from securechat.errors import FrameError

CORPUS = Path(__file__).resolve().parent / "corpus" / "wire"


def one_input(data: bytes) -> None:
    decoder = wire.FrameDecoder()
    step = (data[0] % 13 + 1) if data else 1
    try:
        for pos in range(0, len(data), step):
            for frame in decoder.feed(data[pos : pos + step]):
                # canonical: what decodes re-encodes to the very same bytes
                encoded = wire.encode(frame)
                assert wire.decode(encoded) == frame
    except FrameError:
        assert decoder.failed


def replay(rounds: int) -> int:
    seeds = [p.read_bytes() for p in sorted(CORPUS.iterdir())]
    rng = random.Random(1)
    for seed in seeds:
        one_input(seed)
    for _ in range(rounds):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if data and rng.random() < 0.7:
                data[rng.randrange(len(data))] = rng.randrange(256)
            else:
                data[rng.randrange(len(data) + 1) :] = rng.choice(seeds)[: rng.randrange(64)]
        one_input(bytes(data))
    print(f"replayed {len(seeds)} seeds and {rounds} mutations: ok")
    return 0


def main() -> int:
    if "--replay" in sys.argv:
        idx = sys.argv.index("--replay")
        rounds = int(sys.argv[idx + 1]) if len(sys.argv) > idx + 1 else 20000
        return replay(rounds)
    import atheris  # type: ignore[import-not-found]

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
