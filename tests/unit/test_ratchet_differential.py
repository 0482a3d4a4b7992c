"""Differential check against the independent ``doubleratchet`` package (Syndace, PyPI).

That package implements Signal's Double Ratchet (root chain = HKDF with the root
key as salt; message chains = HMAC with separate constants). We configure it with
our labels and X25519 and feed both implementations the same ratchet private
keys. For every message of a random conversation (speaker changes, drops, late
deliveries) the header fields must be equal and our ciphertext must equal the
AEAD of *their* message key: a byte-level comparison of the whole key schedule.
Our AEAD (ChaCha20-Poly1305 keyed with mk, random nonce) is not theirs (AES-CBC +
HMAC), so only the key schedule and headers are compared, not their ciphertexts.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securechat.core import dh, ratchet

doubleratchet = pytest.importorskip("doubleratchet")
from doubleratchet import DiffieHellmanRatchet, Header  # noqa: E402
from doubleratchet.recommended import HashFunction, kdf_hkdf, kdf_separate_hmacs  # noqa: E402

AD = b"differential-ad"


class RootKDF(kdf_hkdf.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return ratchet.ROOT_INFO


class ChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


def _dhr_class(keys: deque[bytes]) -> type[Any]:
    class DHR(DiffieHellmanRatchet):  # type: ignore[misc]
        @staticmethod
        def _generate_priv() -> bytes:
            return keys.popleft()

        @staticmethod
        def _derive_pub(priv: bytes) -> bytes:
            return dh.public_key(priv)

        @staticmethod
        def _perform_diffie_hellman(own_priv: bytes, other_pub: bytes) -> bytes:
            return dh.x25519(own_priv, other_pub)

    return DHR


async def _create(cls: type[Any], own: bytes | None, other: bytes, sk: bytes) -> Any:
    # chain constant b"\x02\x01": first output (new chain key) = HMAC(ck, 0x02),
    # second (message key) = HMAC(ck, 0x01), as ratchet.kdf_ck
    return await cls.create(own, other, RootKDF, sk, ChainKDF, b"\x02\x01", ratchet.MAX_SKIP)


class Party:
    def __init__(self, seed: int) -> None:
        r = random.Random(seed)
        self.keys = [r.randbytes(32) for _ in range(200)]
        self.ours_rng = deque(self.keys)
        self.theirs_cls = _dhr_class(deque(self.keys))
        self.ours: ratchet.RatchetState | None = None
        self.theirs: Any = None
        self.skipped: dict[tuple[bytes, int], bytes] = {}


async def _conversation(schedule: list[tuple[int, int]], seed: int) -> int:
    r = random.Random(seed)
    sk, spk_priv = r.randbytes(32), r.randbytes(32)
    alice, bob = Party(seed + 1), Party(seed + 2)
    alice.ours = ratchet.init_initiator(
        sk, dh.public_key(spk_priv), lambda n: alice.ours_rng.popleft() if n == 32 else bytes(n)
    )
    alice.theirs = await _create(alice.theirs_cls, None, dh.public_key(spk_priv), sk)
    bob.ours = ratchet.init_responder(sk, spk_priv, dh.public_key(spk_priv))
    parties = (alice, bob)
    pending: list[tuple[int, bytes, bytes, Header]] = []  # receiver, plaintext, message, header
    compared = 0
    for speaker, deliver_mask in schedule:
        sender = parties[speaker]
        if sender.ours is None or (sender is bob and bob.theirs is None):
            speaker, sender = 0, alice  # bob cannot speak before hearing from alice
        assert sender.ours is not None
        pt = r.randbytes(r.randrange(1, 40))
        msg = ratchet.encrypt(
            sender.ours,
            pt,
            AD,
            lambda n, s=sender: s.ours_rng.popleft() if n == 32 else r.randbytes(n),
        )
        mk, header = await sender.theirs.next_encryption_key()
        ours_header = ratchet.Header.decode(msg[: ratchet.HEADER_SIZE])
        assert (ours_header.ratchet_key, ours_header.previous_count, ours_header.number) == tuple(
            header
        )
        nonce = msg[ratchet.HEADER_SIZE : ratchet.HEADER_SIZE + ratchet.NONCE_SIZE]
        body = msg[ratchet.HEADER_SIZE + ratchet.NONCE_SIZE :]
        assert body == ratchet.seal(mk, nonce, pt, AD + msg[: ratchet.HEADER_SIZE])
        compared += 1
        pending.append((1 - speaker, pt, msg, header))
        # deliver a pseudo-random subset now (bit i of the mask), the rest stays in flight
        keep = []
        for i, item in enumerate(pending):
            if deliver_mask >> (i % 8) & 1 or (item[0] == 1 and bob.theirs is None):
                await _deliver(parties[item[0]], item, sk, spk_priv)
            else:
                keep.append(item)
        pending = keep
    for item in pending:
        await _deliver(parties[item[0]], item, sk, spk_priv)
    return compared


async def _deliver(
    receiver: Party, item: tuple[int, bytes, bytes, Header], sk: bytes, spk_priv: bytes
) -> None:
    _, pt, msg, header = item
    assert receiver.ours is not None
    got, update = ratchet.decrypt(receiver.ours, msg, AD)
    ratchet.apply(receiver.ours, update)
    assert got == pt
    slot = (header.ratchet_pub, header.sending_chain_length)
    if receiver.theirs is None:  # bob's first message: their ratchet starts from it
        receiver.theirs = await _create(receiver.theirs_cls, spk_priv, header.ratchet_pub, sk)
    if slot in receiver.skipped:
        mk = receiver.skipped.pop(slot)
    else:
        mk, skipped = await receiver.theirs.next_decryption_key(header)
        receiver.skipped.update(skipped)
    nonce = msg[ratchet.HEADER_SIZE : ratchet.HEADER_SIZE + ratchet.NONCE_SIZE]
    body = msg[ratchet.HEADER_SIZE + ratchet.NONCE_SIZE :]
    assert ratchet.open_sealed(mk, nonce, body, AD + msg[: ratchet.HEADER_SIZE]) == pt


@given(
    schedule=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 255)), min_size=1, max_size=40),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=30, deadline=None)
def test_key_schedule_matches_doubleratchet_package(
    schedule: list[tuple[int, int]], seed: int
) -> None:
    assert asyncio.run(_conversation(schedule, seed)) == len(schedule)


def test_long_ping_pong_matches() -> None:
    schedule = [(i % 2, 255) for i in range(60)] + [(0, 0)] * 5 + [(1, 255)]
    assert asyncio.run(_conversation(schedule, 7)) == len(schedule)
