"""Double Ratchet unit behaviour: order, skips, bounds, failures leave state intact."""

from __future__ import annotations

import random

import pytest
from securechat.core import dh, ratchet
from securechat.errors import AuthenticationError, SessionError

AD = b"associated-data"


def make_pair(seed: int = 1) -> tuple[ratchet.RatchetState, ratchet.RatchetState, object]:
    rng = random.Random(seed).randbytes
    sk = rng(32)
    bob_priv = rng(32)
    bob = ratchet.init_responder(sk, bob_priv, dh.public_key(bob_priv))
    alice = ratchet.init_initiator(sk, dh.public_key(bob_priv), rng)
    return alice, bob, rng


def receive(state: ratchet.RatchetState, message: bytes) -> bytes:
    plaintext, update = ratchet.decrypt(state, message, AD)
    ratchet.apply(state, update)
    return plaintext


def test_ping_pong_and_dh_steps() -> None:
    alice, bob, rng = make_pair()
    keys_seen = set()
    for i in range(6):
        sender, receiver = (alice, bob) if i % 2 == 0 else (bob, alice)
        msg = ratchet.encrypt(sender, f"m{i}".encode(), AD, rng)  # type: ignore[arg-type]
        keys_seen.add(msg[1:33])
        assert receive(receiver, msg) == f"m{i}".encode()
    assert len(keys_seen) == 6  # a new ratchet key on every change of speaker


def test_out_of_order_uses_skipped_keys_once() -> None:
    alice, bob, rng = make_pair()
    msgs = [ratchet.encrypt(alice, bytes([i]), AD, rng) for i in range(5)]  # type: ignore[arg-type]
    assert receive(bob, msgs[4]) == b"\x04"
    assert len(bob.skipped) == 4
    for i in (2, 0, 3, 1):
        assert receive(bob, msgs[i]) == bytes([i])
    assert bob.skipped == {}
    with pytest.raises(AuthenticationError):
        ratchet.decrypt(bob, msgs[2], AD)  # key used and deleted


def test_previous_chain_messages_open_after_dh_step() -> None:
    alice, bob, rng = make_pair()
    early = [ratchet.encrypt(alice, b"early%d" % i, AD, rng) for i in range(3)]  # type: ignore[arg-type]
    receive(bob, early[0])
    receive(alice, ratchet.encrypt(bob, b"reply", AD, rng))  # type: ignore[arg-type]
    late = ratchet.encrypt(alice, b"late", AD, rng)  # type: ignore[arg-type]
    assert receive(bob, late) == b"late"  # PN=3 makes bob store keys 1 and 2
    assert receive(bob, early[2]) == b"early2"
    assert receive(bob, early[1]) == b"early1"


def test_max_skip_enforced_without_state_change() -> None:
    alice, bob, rng = make_pair()
    msgs = [ratchet.encrypt(alice, b"m", AD, rng) for _ in range(ratchet.MAX_SKIP + 2)]  # type: ignore[arg-type]
    before = ratchet.serialize(bob)
    with pytest.raises(AuthenticationError):
        ratchet.decrypt(bob, msgs[-1], AD)  # would need MAX_SKIP + 1 skipped keys
    assert ratchet.serialize(bob) == before
    assert receive(bob, msgs[-2]) == b"m"  # exactly MAX_SKIP skipped is allowed
    assert len(bob.skipped) == ratchet.MAX_SKIP
    assert receive(bob, msgs[-1]) == b"m"


def test_skipped_store_is_bounded_oldest_evicted() -> None:
    alice, bob, rng = make_pair()
    msgs = [ratchet.encrypt(alice, b"x", AD, rng) for _ in range(ratchet.MAX_SKIP + 1)]  # type: ignore[arg-type]
    receive(bob, msgs[-1])
    receive(alice, ratchet.encrypt(bob, b"y", AD, rng))  # type: ignore[arg-type]
    more = [ratchet.encrypt(alice, b"z", AD, rng) for _ in range(ratchet.MAX_SKIP + 1)]  # type: ignore[arg-type]
    receive(bob, more[-1])
    receive(alice, ratchet.encrypt(bob, b"y", AD, rng))  # type: ignore[arg-type]
    last = [ratchet.encrypt(alice, b"w", AD, rng) for _ in range(ratchet.MAX_SKIP + 1)]  # type: ignore[arg-type]
    receive(bob, last[-1])
    assert len(bob.skipped) == ratchet.MAX_SKIPPED_KEYS
    with pytest.raises(AuthenticationError):
        ratchet.decrypt(bob, msgs[0], AD)  # evicted: the oldest went first
    assert receive(bob, last[0]) == b"w"


def test_every_byte_flip_is_rejected_and_state_kept() -> None:
    alice, bob, rng = make_pair()
    msg = ratchet.encrypt(alice, b"hello world", AD, rng)  # type: ignore[arg-type]
    before = ratchet.serialize(bob)
    for i in range(len(msg)):
        forged = bytearray(msg)
        forged[i] ^= 0x40
        with pytest.raises(AuthenticationError):
            ratchet.decrypt(bob, bytes(forged), AD)
    for cut in (0, 10, ratchet.HEADER_SIZE, len(msg) - 1):
        with pytest.raises(AuthenticationError):
            ratchet.decrypt(bob, msg[:cut], AD)
    with pytest.raises(AuthenticationError):
        ratchet.decrypt(bob, msg, AD + b"x")
    assert ratchet.serialize(bob) == before
    assert receive(bob, msg) == b"hello world"


def test_low_order_ratchet_key_is_an_authentication_error() -> None:
    alice, bob, rng = make_pair()
    msg = bytearray(ratchet.encrypt(alice, b"x", AD, rng))  # type: ignore[arg-type]
    msg[1:33] = bytes(32)
    with pytest.raises(AuthenticationError):
        ratchet.decrypt(bob, bytes(msg), AD)


def test_responder_cannot_send_first() -> None:
    _, bob, rng = make_pair()
    with pytest.raises(SessionError):
        ratchet.encrypt(bob, b"x", AD, rng)  # type: ignore[arg-type]


def test_serialize_roundtrip_continues() -> None:
    alice, bob, rng = make_pair()
    pending = [ratchet.encrypt(alice, bytes([i]), AD, rng) for i in range(3)]  # type: ignore[arg-type]
    receive(bob, pending[2])
    bob2 = ratchet.deserialize(ratchet.serialize(bob))
    assert ratchet.serialize(bob2) == ratchet.serialize(bob)
    assert receive(bob2, pending[0]) == b"\x00"
    assert receive(alice, ratchet.encrypt(bob2, b"r", AD, rng)) == b"r"  # type: ignore[arg-type]
    assert "root" not in repr(bob2) and repr(bob2.root_key) not in repr(bob2)


@pytest.mark.parametrize("cut", [0, 1, 50, -1])
def test_deserialize_rejects_corruption(cut: int) -> None:
    _, bob, _ = make_pair()
    data = ratchet.serialize(bob)
    with pytest.raises(SessionError):
        ratchet.deserialize(data[:cut] if cut >= 0 else data + b"\x00")
    with pytest.raises(SessionError):
        ratchet.deserialize(b"\x02" + data[1:])


def test_kdf_chain_constants_per_spec() -> None:
    import hashlib
    import hmac

    ck = bytes(range(32))
    next_ck, mk = ratchet.kdf_ck(ck)
    assert mk == hmac.new(ck, b"\x01", hashlib.sha256).digest()
    assert next_ck == hmac.new(ck, b"\x02", hashlib.sha256).digest()


def test_version_1_messages_are_refused_without_state_change() -> None:
    """A message in the old format (version 1: XChaCha20-Poly1305, 24-byte nonce) never opens."""
    import nacl.bindings

    alice, bob, rng = make_pair()
    msg = ratchet.encrypt(alice, b"v2", AD, rng)  # type: ignore[arg-type]
    # Bob's key for message 0 of Alice's first chain (KDF_RK on his side, then KDF_CK)
    _, chain = ratchet.kdf_rk(bob.root_key, dh.x25519(bob.dhs_private, msg[1:33]))
    _, mk = ratchet.kdf_ck(chain)
    header = msg[: ratchet.HEADER_SIZE]
    body = msg[ratchet.HEADER_SIZE + ratchet.NONCE_SIZE :]
    assert ratchet.open_sealed(mk, msg[ratchet.HEADER_SIZE :][:12], body, AD + header) == b"v2"
    header_v1, nonce24 = b"\x01" + header[1:], bytes(24)
    old = (
        header_v1
        + nonce24
        + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            b"v1", AD + header_v1, nonce24, mk
        )
    )
    before = ratchet.serialize(bob)
    with pytest.raises(AuthenticationError):
        ratchet.decrypt(bob, old, AD)
    assert ratchet.serialize(bob) == before
    assert receive(bob, msg) == b"v2"


def test_message_layout_and_fresh_nonce_per_message() -> None:
    """header(41) || nonce(12) || ct || tag(16); a restored (rolled-back) sender reuses mk
    but draws a new nonce, so two different plaintexts never share (key, nonce)."""
    alice, bob, rng = make_pair()
    saved = ratchet.serialize(alice)
    first = ratchet.encrypt(alice, b"same key, first", AD, rng)  # type: ignore[arg-type]
    rolled_back = ratchet.deserialize(saved)
    second = ratchet.encrypt(rolled_back, b"same key, other", AD, rng)  # type: ignore[arg-type]
    assert len(first) == ratchet.OVERHEAD + len(b"same key, first")
    assert first[: ratchet.HEADER_SIZE] == second[: ratchet.HEADER_SIZE]  # same N, same mk
    assert first[0] == ratchet.RATCHET_VERSION == 2
    nonce = slice(ratchet.HEADER_SIZE, ratchet.HEADER_SIZE + ratchet.NONCE_SIZE)
    assert first[nonce] != second[nonce]
    assert receive(bob, first) == b"same key, first"


def test_kdf_ck_matches_fresh_hmacs_on_a_chain() -> None:
    """The copied-HMAC KDF_CK equals two independent HMACs, step after step."""
    import hashlib
    import hmac

    ck = bytes(32)
    for _ in range(50):
        next_ck, mk = ratchet.kdf_ck(ck)
        assert mk == hmac.new(ck, b"\x01", hashlib.sha256).digest()
        assert next_ck == hmac.new(ck, b"\x02", hashlib.sha256).digest()
        ck = next_ck
