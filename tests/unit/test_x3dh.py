"""X3DH: both sides agree, signatures are checked, bad keys and bundles are refused."""

from __future__ import annotations

import random

import pytest
from securechat.core import dh, x3dh
from securechat.core.keys import Identity, generate_identity
from securechat.errors import AuthenticationError, InvalidPublicKeyError, SessionError


def rng_from(seed: int):  # type: ignore[no-untyped-def]
    return random.Random(seed).randbytes


def ident(name: str, seed: int) -> Identity:
    return generate_identity(name, random.Random(seed).randbytes(64))


ALICE, BOB = ident("alice", 1), ident("bob", 2)


def _agree(with_opk: bool, fallback: bool = False) -> tuple[x3dh.Agreement, x3dh.Agreement]:
    rng = rng_from(3)
    spk = x3dh.generate_signed_prekey(BOB, 7, rng, 1_000)
    opk = x3dh.generate_one_time_prekey(8, rng)
    bundle = None
    if not fallback:
        bundle = x3dh.parse_bundle(spk.signed.encode(), opk.prekey.encode() if with_opk else b"")
    header, alice = x3dh.initiate(ALICE, BOB.public, bundle, rng)
    bob = x3dh.respond(BOB, header, spk.private, opk.private if header.one_time_prekey_id else None)
    return alice, bob


@pytest.mark.parametrize(("with_opk", "fallback"), [(True, False), (False, False), (False, True)])
def test_both_sides_derive_the_same_secret(with_opk: bool, fallback: bool) -> None:
    alice, bob = _agree(with_opk, fallback)
    assert alice.shared_key == bob.shared_key
    assert len(alice.shared_key) == 32
    assert (
        alice.associated_data
        == bob.associated_data
        == ALICE.public.key_bytes + BOB.public.key_bytes
    )
    assert alice.responder_ratchet_key == bob.responder_ratchet_key


def test_modes_give_different_secrets() -> None:
    keys = {
        _agree(True)[0].shared_key,
        _agree(False)[0].shared_key,
        _agree(False, True)[0].shared_key,
    }
    assert len(keys) == 3


def test_fallback_uses_identity_key_as_first_ratchet_key() -> None:
    alice, _ = _agree(False, fallback=True)
    assert alice.responder_ratchet_key == BOB.public.dh


def test_forged_signed_prekey_is_rejected() -> None:
    rng = rng_from(4)
    spk = x3dh.generate_signed_prekey(BOB, 1, rng, 5)
    blob = bytearray(spk.signed.encode())
    for i in range(len(blob)):
        if i == 0:
            continue  # version byte: a parse error, tested below
        forged = bytearray(blob)
        forged[i] ^= 0x01
        with pytest.raises(AuthenticationError):
            x3dh.initiate(ALICE, BOB.public, x3dh.parse_bundle(bytes(forged), b""), rng)


def test_prekey_signed_by_someone_else_is_rejected() -> None:
    rng = rng_from(5)
    mallory = ident("mallory", 9)
    spk = x3dh.generate_signed_prekey(mallory, 1, rng, 5)
    with pytest.raises(AuthenticationError):
        x3dh.initiate(ALICE, BOB.public, x3dh.parse_bundle(spk.signed.encode(), b""), rng)


@pytest.mark.parametrize(
    ("spk", "opk"),
    [(b"\x00" * 10, b""), (b"\x02" + bytes(108), b""), (b"", bytes(36)), (None, bytes(35))],
)
def test_malformed_bundles(spk: bytes | None, opk: bytes) -> None:
    if spk is None:
        spk = x3dh.generate_signed_prekey(BOB, 1, rng_from(1), 1).signed.encode()
    with pytest.raises(SessionError):
        x3dh.parse_bundle(spk, opk)


def test_low_order_keys_are_rejected() -> None:
    rng = rng_from(6)
    spk = x3dh.generate_signed_prekey(BOB, 1, rng, 1)
    header, _ = x3dh.initiate(ALICE, BOB.public, x3dh.parse_bundle(spk.signed.encode(), b""), rng)
    for low in (bytes(32), (1).to_bytes(32, "little")):
        bad = x3dh.InitialHeader(header.sender, low, False, 1, None)
        with pytest.raises(InvalidPublicKeyError):
            x3dh.respond(BOB, bad, spk.private, None)


def test_signed_prekey_roundtrip_and_size() -> None:
    spk = x3dh.generate_signed_prekey(BOB, 42, rng_from(7), 123456789)
    blob = spk.signed.encode()
    assert len(blob) == x3dh.SIGNED_PREKEY_SIZE <= 1024
    assert x3dh.SignedPrekey.decode(blob) == spk.signed
    assert spk.signed.public == dh.public_key(spk.private)
    spk.signed.verify(BOB.public)
    with pytest.raises(SessionError):
        x3dh.generate_signed_prekey(BOB, 0, rng_from(7), 1)
