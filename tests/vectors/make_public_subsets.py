"""Regenerate tests/vectors/public/ from the full public files in ../shared/vectors/.

Run from the repository root: ``python tests/vectors/make_public_subsets.py``.

What is kept (so a clone on its own checks what the tests check):

* ``wycheproof/x25519_test.json``: every test (all are X25519, all are used);
* ``wycheproof/chacha20_poly1305_test.json``: every test (all are ChaCha20-Poly1305);
* ``noise/cacophony.txt``, ``noise/snow.txt``: the vectors whose protocol we
  implement (25519, ChaChaPoly, BLAKE2s or SHA256, no PSK), the rule of
  ``tests/test_noise_vectors.py``; every field of each vector as published.

The content is unchanged; only the layout is compact (one test or vector per line)
and the Noise files hold fewer vectors. ``tests/test_public_vector_subsets.py``
checks, where ../shared/vectors exists, that each kept record equals the published
one. README.md beside them gives sources, licences and the SHA-256 of each source.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from securechat.core import noise
from securechat.errors import HandshakeError

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "vectors"
OUT = REPO / "tests" / "vectors" / "public"
WYCHEPROOF = ("x25519_test.json", "chacha20_poly1305_test.json")
NOISE = ("cacophony.txt", "snow.txt")


def supported_noise(vector: dict[str, Any]) -> bool:
    """A vector for a protocol name our Noise implements (the test's own rule)."""
    if vector.get("init_psks") or vector.get("resp_psks"):
        return False
    try:
        noise.parse_protocol_name(vector["protocol_name"].encode())
    except HandshakeError:
        return False
    return True


def _dump_wycheproof(data: dict[str, Any]) -> str:
    """The Wycheproof object, with each test on its own line."""
    head = {k: v for k, v in data.items() if k != "testGroups"}
    lines = [
        "{",
        *(f"{json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()),
        '"testGroups": [',
    ]
    for g, group in enumerate(data["testGroups"]):
        meta = {k: v for k, v in group.items() if k != "tests"}
        lines.append(json.dumps(meta)[:-1] + ', "tests": [')
        tests = group["tests"]
        lines += [json.dumps(t) + ("," if i < len(tests) - 1 else "") for i, t in enumerate(tests)]
        lines.append("]}" + ("," if g < len(data["testGroups"]) - 1 else ""))
    lines += ["]", "}"]
    return "\n".join(lines) + "\n"


def _dump_noise(vectors: list[dict[str, Any]]) -> str:
    body = ",\n".join(json.dumps(v) for v in vectors)
    return '{"vectors": [\n' + body + "\n]}\n"


def main() -> None:
    sums = {}
    for name in WYCHEPROOF:
        source = SHARED / "wycheproof" / name
        sums[f"wycheproof/{name}"] = hashlib.sha256(source.read_bytes()).hexdigest()
        text = _dump_wycheproof(json.loads(source.read_text()))
        assert json.loads(text) == json.loads(source.read_text())
        target = OUT / "wycheproof" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for name in NOISE:
        source = SHARED / "noise" / name
        sums[f"noise/{name}"] = hashlib.sha256(source.read_bytes()).hexdigest()
        vectors = [v for v in json.loads(source.read_text())["vectors"] if supported_noise(v)]
        target = OUT / "noise" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_dump_noise(vectors))
        print(f"{target}: {len(vectors)} vectors")
    for path, digest in sums.items():
        print(f"sha256 {digest}  {path}")


if __name__ == "__main__":
    main()
