"""Every Wycheproof X25519 vector through ``securechat.core.dh.x25519``.

Valid and "acceptable" vectors whose expected shared secret is not all zero
must give exactly that secret (twist points and non-canonical encodings are
computed per RFC 7748, as libsodium and OpenSSL do). Vectors whose expected
secret is all zero (low-order public keys) must raise InvalidPublicKeyError:
that is the check X3DH and the ratchet rely on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from securechat.core import dh
from securechat.errors import InvalidPublicKeyError

from public_vectors import SHARED, require

DEFAULT = SHARED / "wycheproof" / "x25519_test.json"
PATH = Path(os.environ.get("SECURECHAT_WYCHEPROOF_X25519", DEFAULT))
EXPECTED_TESTS = 518
EXPECTED_ZERO_SHARED = 31  # flagged ZeroSharedSecret (LowOrderPublic) in the pinned file


def _vectors() -> list[dict[str, object]]:
    data = json.loads(require(PATH).read_text())
    return [t for g in data["testGroups"] for t in g["tests"]]


def test_vector_count_matches_header() -> None:
    data = json.loads(require(PATH).read_text())
    assert len(_vectors()) == data["numberOfTests"] == EXPECTED_TESTS


def test_every_vector() -> None:
    ok = rejected = 0
    for t in _vectors():
        private, public = bytes.fromhex(t["private"]), bytes.fromhex(t["public"])  # type: ignore[arg-type]
        shared = bytes.fromhex(t["shared"])  # type: ignore[arg-type]
        assert t["result"] in ("valid", "acceptable"), t["tcId"]
        if shared == bytes(32):
            assert "ZeroSharedSecret" in t["flags"], t["tcId"]  # type: ignore[operator]
            with pytest.raises(InvalidPublicKeyError):
                dh.x25519(private, public)
            rejected += 1
        else:
            assert dh.x25519(private, public) == shared, t["tcId"]
            ok += 1
    assert rejected == EXPECTED_ZERO_SHARED
    assert ok + rejected == EXPECTED_TESTS


def test_wrong_sizes_rejected() -> None:
    with pytest.raises(InvalidPublicKeyError):
        dh.x25519(bytes(32), bytes(31))
    with pytest.raises(InvalidPublicKeyError):
        dh.x25519(bytes(33), bytes(32))
