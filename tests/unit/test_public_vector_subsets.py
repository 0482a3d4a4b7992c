"""The public vectors shipped in tests/vectors/public are the published ones.

Where ../shared/vectors holds the full files, every shipped record must equal
its published record (same content, only re-laid out), and the Noise subsets
must hold exactly the vectors our tests select. Without the full files a fresh
clone runs the shipped copies instead (tests/public_vectors.py): that the copies
exist and are non-trivial is checked either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from securechat.core import noise
from securechat.errors import HandshakeError

from public_vectors import BUNDLED, FULL

WYCHEPROOF = ("x25519_test.json", "chacha20_poly1305_test.json")
NOISE = ("cacophony.txt", "snow.txt")
SUPPORTED_PER_FILE = 76


def _supported(vector: dict[str, object]) -> bool:
    if vector.get("init_psks") or vector.get("resp_psks"):
        return False
    try:
        noise.parse_protocol_name(str(vector["protocol_name"]).encode())
    except HandshakeError:
        return False
    return True


def _load(path: Path) -> dict[str, object]:
    return dict(json.loads(path.read_text()))


@pytest.mark.parametrize("name", WYCHEPROOF)
def test_wycheproof_copy_is_the_published_file(name: str) -> None:
    shipped = _load(BUNDLED / "wycheproof" / name)
    assert shipped["numberOfTests"] and shipped["testGroups"]
    full = FULL / "wycheproof" / name
    if not full.exists():
        pytest.skip(f"no full file at {full} to compare with")
    assert shipped == _load(full)


@pytest.mark.parametrize("name", NOISE)
def test_noise_subset_is_exactly_our_protocols_as_published(name: str) -> None:
    shipped = list(_load(BUNDLED / "noise" / name)["vectors"])  # type: ignore[call-overload]
    assert len(shipped) == SUPPORTED_PER_FILE and all(_supported(v) for v in shipped)
    assert any(v["protocol_name"] == "Noise_XX_25519_ChaChaPoly_BLAKE2s" for v in shipped)
    full = FULL / "noise" / name
    if not full.exists():
        pytest.skip(f"no full file at {full} to compare with")
    published = [v for v in _load(full)["vectors"] if _supported(v)]  # type: ignore[attr-defined]
    assert shipped == published


def test_provenance_and_licence_are_shipped() -> None:
    readme = (BUNDLED / "README.md").read_text()
    for word in ("Apache-2.0", "Unlicense", "sha256", "C2SP/wycheproof", "cacophony", "snow"):
        assert word.lower() in readme.lower(), word
    assert "Apache License" in (BUNDLED / "LICENSE-Apache-2.0.txt").read_text()
