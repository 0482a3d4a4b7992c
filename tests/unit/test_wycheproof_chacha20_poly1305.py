"""Every Wycheproof ChaCha20-Poly1305 vector through the AEAD calls securechat makes.

The end-to-end layer seals each message with ``ratchet.seal`` / ``open_sealed``
(ChaCha20-Poly1305, 96-bit nonce); the relay link with Noise's ``CipherState``
(nonce = 4 zero bytes || 64-bit little-endian counter). Valid vectors must give
exactly the published ciphertext and tag and decrypt back; every modified tag must
be the one opaque AuthenticationError; nonces of another size are refused. The
vectors come from ../shared/vectors, or the shipped copy (tests/public_vectors.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from securechat.core import noise, ratchet
from securechat.errors import AuthenticationError

from public_vectors import SHARED, require

PATH = SHARED / "wycheproof" / "chacha20_poly1305_test.json"
EXPECTED_TESTS = 325
EXPECTED_MODIFIED_TAGS = 60
NONCE_BITS = 96


def _tests() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    data = json.loads(require(PATH).read_text())
    tests = [(g, t) for g in data["testGroups"] for t in g["tests"]]
    assert len(tests) == data["numberOfTests"] == EXPECTED_TESTS
    return tests


def test_every_vector_through_the_e2e_aead() -> None:
    valid = refused = bad_nonce = 0
    for group, t in _tests():
        key, iv, aad, msg = (bytes.fromhex(t[k]) for k in ("key", "iv", "aad", "msg"))
        sealed = bytes.fromhex(t["ct"]) + bytes.fromhex(t["tag"])
        if group["ivSize"] != NONCE_BITS:
            assert t["result"] == "invalid" and "InvalidNonceSize" in t["flags"], t["tcId"]
            with pytest.raises(ValueError):
                ratchet.seal(key, iv, msg, aad)
            bad_nonce += 1
        elif t["result"] == "valid":
            assert ratchet.seal(key, iv, msg, aad) == sealed, t["tcId"]
            assert ratchet.open_sealed(key, iv, sealed, aad) == msg, t["tcId"]
            valid += 1
        else:
            assert "ModifiedTag" in t["flags"], t["tcId"]
            with pytest.raises(AuthenticationError):
                ratchet.open_sealed(key, iv, sealed, aad)
            refused += 1
    assert refused == EXPECTED_MODIFIED_TAGS and bad_nonce == 9
    assert valid + refused + bad_nonce == EXPECTED_TESTS


def test_noise_cipher_state_on_the_counter_nonce_vectors() -> None:
    """Vectors whose nonce has Noise's shape (4 zero bytes, then a counter)."""
    checked = 0
    for group, t in _tests():
        iv = bytes.fromhex(t["iv"])
        if group["ivSize"] != NONCE_BITS or iv[:4] != bytes(4):
            continue
        key, aad, msg = (bytes.fromhex(t[k]) for k in ("key", "aad", "msg"))
        sealed = bytes.fromhex(t["ct"]) + bytes.fromhex(t["tag"])
        counter = int.from_bytes(iv[4:], "little")
        sender, receiver = noise.CipherState(key), noise.CipherState(key)
        sender.set_nonce(counter)
        receiver.set_nonce(counter)
        if t["result"] == "valid":
            assert sender.encrypt_with_ad(aad, msg) == sealed, t["tcId"]
            assert receiver.decrypt_with_ad(aad, sealed) == msg, t["tcId"]
            assert sender.n == receiver.n == counter + 1
        else:
            with pytest.raises(AuthenticationError):
                receiver.decrypt_with_ad(aad, sealed)
            assert receiver.n == counter  # a refused record does not advance the nonce
        checked += 1
    assert checked >= 10
