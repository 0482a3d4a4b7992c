"""Shared command line of the fuzz targets that carry their own seed corpus.

``python fuzz/fuzz_X.py CORPUS_DIR`` fuzzes with atheris (coverage-guided);
``--replay [N]`` runs the corpus and N random mutations of it without atheris
(what CI can afford); ``--make-corpus`` regenerates the seeds.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from pathlib import Path


def replay(one_input: Callable[[bytes], None], corpus: Path, rounds: int, seed: int = 1) -> int:
    """Every seed, then ``rounds`` seeds with a few random flips, cuts and insertions."""
    seeds = [p.read_bytes() for p in sorted(corpus.iterdir())]
    rng = random.Random(seed)
    for blob in seeds:
        one_input(blob)
    for _ in range(rounds):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(1, max(len(data), 2))
            op = rng.random()
            if op < 0.6 and pos < len(data):
                data[pos] ^= 1 << rng.randrange(8)
            elif op < 0.8:
                del data[pos : pos + rng.randrange(1, 64)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
        one_input(bytes(data))
    print(f"replayed {len(seeds)} seeds and {rounds} mutations: ok")
    return 0


def main(
    one_input: Callable[[bytes], None],
    corpus: Path,
    make_corpus: Callable[[], int],
    default_rounds: int = 5000,
) -> int:
    if "--make-corpus" in sys.argv:
        return make_corpus()
    if "--replay" in sys.argv:
        idx = sys.argv.index("--replay")
        rounds = int(sys.argv[idx + 1]) if len(sys.argv) > idx + 1 else default_rounds
        return replay(one_input, corpus, rounds)
    import atheris  # type: ignore[import-untyped]

    atheris.instrument_all()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
    return 0
