"""Behaviour of the Noise link: both ends in memory, no sockets (h11 ConnectionPair style)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securechat.core import dh, noise
from securechat.core.noise import protocol as noise_protocol
from securechat.errors import (
    AuthenticationError,
    HandshakeError,
    InvalidPublicKeyError,
    ProtocolError,
    RelayKeyChangedError,
    SecureChatError,
)

from public_vectors import SHARED, require

WYCHEPROOF_X25519 = SHARED / "wycheproof" / "x25519_test.json"
LOW_ORDER_POINTS = [
    bytes(32),  # u = 0
    (1).to_bytes(32, "little"),  # u = 1
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),  # order 8
]


def _key(label: str) -> bytes:
    return hashlib.blake2s(label.encode()).digest()


def _counter_rng(label: str) -> Callable[[int], bytes]:
    """Deterministic rng: distinct 32-byte outputs derived from a label and a counter."""
    count = [0]

    def rng(n: int) -> bytes:
        count[0] += 1
        return hashlib.blake2s(f"{label}/{count[0]}".encode(), digest_size=n).digest()

    return rng


CLIENT_KEY = _key("client static")
RELAY_KEY = _key("relay static")
CLIENT_PUB = dh.public_key(CLIENT_KEY)
RELAY_PUB = dh.public_key(RELAY_KEY)


def _pair(
    *,
    client_verify: Callable[[bytes], None] | None = None,
    relay_verify: Callable[[bytes], None] | None = None,
    client_payload: bytes = b"",
    relay_payload: bytes = b"",
    seed: str = "x",
) -> tuple[noise.NoiseConnection, noise.NoiseConnection]:
    client = noise.NoiseConnection(
        initiator=True,
        static_private=CLIENT_KEY,
        rng=_counter_rng("c" + seed),
        verify_remote=client_verify,
        payload=client_payload,
    )
    relay = noise.NoiseConnection(
        initiator=False,
        static_private=RELAY_KEY,
        rng=_counter_rng("r" + seed),
        verify_remote=relay_verify,
        payload=relay_payload,
    )
    return client, relay


def _handshake_records(
    client: noise.NoiseConnection, relay: noise.NoiseConnection
) -> tuple[bytes, bytes, bytes]:
    m1 = client.initiate()
    _, _, m2 = relay.receive_data(m1)
    _, _, m3 = client.receive_data(m2)
    return m1, m2, m3


def _connected() -> tuple[noise.NoiseConnection, noise.NoiseConnection]:
    client, relay = _pair()
    _, _, m3 = _handshake_records(client, relay)
    events, _, _ = relay.receive_data(m3)
    assert events and client.complete and relay.complete
    return client, relay


# --- handshake -----------------------------------------------------------------------


def test_handshake_authenticates_both_static_keys_and_payloads() -> None:
    seen: list[bytes] = []
    client, relay = _pair(
        client_verify=seen.append,
        relay_verify=seen.append,
        client_payload=b"hello from client",
        relay_payload=b"hello from relay",
    )
    m1, m2, m3 = _handshake_records(client, relay)
    assert client.complete and not relay.complete
    assert seen == [RELAY_PUB]
    events, plain, reply = relay.receive_data(m3)
    assert seen == [RELAY_PUB, CLIENT_PUB]
    assert plain == b"" and reply == b""
    assert len(events) == 1
    assert events[0].remote_static == CLIENT_PUB
    assert events[0].payload == b"hello from client"
    assert relay.remote_static == CLIENT_PUB and client.remote_static == RELAY_PUB
    assert client.handshake_hash == relay.handshake_hash == events[0].handshake_hash
    assert len(m1) == noise.RECORD_HEADER + dh.KEY_SIZE  # -> e, empty payload
    assert int.from_bytes(m2[:2], "big") == len(m2) - 2


def test_client_identity_is_encrypted_on_the_wire() -> None:
    client, relay = _pair()
    m1, m2, m3 = _handshake_records(client, relay)
    for record in (m1, m2, m3):
        assert CLIENT_PUB not in record
    assert RELAY_PUB not in m2


def test_transport_both_directions_and_message_3_coalesced_with_data() -> None:
    client, relay = _pair()
    _, _, m3 = _handshake_records(client, relay)
    events, plain, _ = relay.receive_data(m3 + client.send(b"first") + client.send(b"second"))
    assert len(events) == 1 and plain == b"firstsecond"
    _, back, _ = client.receive_data(relay.send(b"answer"))
    assert back == b"answer"


def test_whole_conversation_fed_one_byte_at_a_time() -> None:
    client, relay = _pair(client_payload=b"cp", relay_payload=b"rp")
    m1 = client.initiate()
    out = b""
    for i in range(len(m1)):
        events, plain, reply = relay.receive_data(m1[i : i + 1])
        assert not events and not plain
        out += reply
        assert (reply != b"") == (i == len(m1) - 1)
    m3 = b""
    client_events: list[noise.HandshakeComplete] = []
    for i in range(len(out)):
        events, _, reply = client.receive_data(out[i : i + 1])
        client_events += events
        m3 += reply
    assert [e.payload for e in client_events] == [b"rp"]
    stream = m3 + client.send(b"a" * 100) + client.send(b"b")
    got = b""
    relay_events: list[noise.HandshakeComplete] = []
    for i in range(len(stream)):
        events, plain, _ = relay.receive_data(stream[i : i + 1])
        relay_events += events
        got += plain
    assert [e.payload for e in relay_events] == [b"cp"]
    assert got == b"a" * 100 + b"b"


def test_large_send_is_split_at_max_plaintext_and_reassembled() -> None:
    client, relay = _connected()
    data = bytes(range(256)) * 1000  # 256000 bytes -> 4 records
    wire = client.send(data)
    records = 0
    pos = 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos : pos + 2], "big")
        assert noise.MIN_RECORD <= length <= noise.MAX_MESSAGE
        pos += 2 + length
        records += 1
    assert pos == len(wire)
    assert records == -(-len(data) // noise.MAX_PLAINTEXT)
    got = b"".join(relay.receive_data(wire[i : i + 65536])[1] for i in range(0, len(wire), 65536))
    assert got == data
    assert client.send(b"") == b""


def test_send_before_handshake_and_misuse_raise() -> None:
    client, relay = _pair()
    with pytest.raises(HandshakeError):
        client.send(b"x")
    with pytest.raises(HandshakeError):
        relay.initiate()
    client.initiate()
    with pytest.raises(HandshakeError):
        client.initiate()
    fresh, _ = _pair()
    with pytest.raises(HandshakeError):
        fresh.receive_data(b"\x00\x20" + bytes(32))
    assert fresh.failed


# --- refusing keys and tampering -----------------------------------------------------------


def test_client_refuses_relay_key_before_revealing_identity() -> None:
    def pin(key: bytes) -> None:
        raise RelayKeyChangedError("relay key differs from the pinned one")

    client, relay = _pair(client_verify=pin)
    _, _, m2 = relay.receive_data(client.initiate())
    with pytest.raises(RelayKeyChangedError):
        client.receive_data(m2)
    assert client.failed and not client.complete
    with pytest.raises(ProtocolError):
        client.receive_data(b"")
    with pytest.raises(HandshakeError):
        client.send(b"x")


def test_relay_refusing_client_key_fails_without_event() -> None:
    def refuse(key: bytes) -> None:
        raise HandshakeError("unknown client")

    client, relay = _pair(relay_verify=refuse)
    _, _, m3 = _handshake_records(client, relay)
    with pytest.raises(HandshakeError):
        relay.receive_data(m3)
    assert relay.failed and relay.remote_static is None


def test_wrong_responder_static_key_is_handshake_error() -> None:
    """With a pre-known relay key (XK), a relay holding another key fails the handshake."""
    wrong = _key("not the relay")
    init = noise.HandshakeState(
        "XK",
        True,
        static_private=CLIENT_KEY,
        remote_static=dh.public_key(wrong),
        rng=_counter_rng("i"),
    )
    resp = noise.HandshakeState("XK", False, static_private=RELAY_KEY, rng=_counter_rng("r"))
    with pytest.raises(HandshakeError):
        resp.read_message(init.write_message(b""))
    with pytest.raises(HandshakeError):
        resp.write_message(b"")  # the failed state is terminal


def test_message_2_from_another_session_is_handshake_error() -> None:
    client, _ = _pair(seed="a")
    other_client, other_relay = _pair(seed="b")
    client.initiate()
    _, _, m2_other = other_relay.receive_data(other_client.initiate())
    with pytest.raises(HandshakeError):
        client.receive_data(m2_other)
    assert client.failed


@pytest.mark.parametrize("which", [2, 3])
def test_every_tampered_handshake_byte_is_handshake_error(which: int) -> None:
    client0, relay0 = _pair()
    _, m2, m3 = _handshake_records(client0, relay0)
    record = m2 if which == 2 else m3
    for i in range(noise.RECORD_HEADER, len(record)):
        client, relay = _pair()
        if which == 2:
            client.initiate()
            target = client
        else:
            _handshake_records(client, relay)
            target = relay
        bad = bytearray(record)
        bad[i] ^= 0x01
        with pytest.raises(HandshakeError):
            target.receive_data(bytes(bad))
        assert target.failed


def test_message_1_with_payload_is_refused() -> None:
    _, relay = _pair()
    with pytest.raises(HandshakeError):
        relay.receive_data(b"\x00\x21" + _key("e") + b"!")


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
def test_low_order_ephemeral_rejected(point: bytes) -> None:
    _, relay = _pair()
    with pytest.raises(HandshakeError) as info:
        relay.receive_data(b"\x00\x20" + point)
    assert isinstance(info.value.__cause__, InvalidPublicKeyError)
    assert relay.failed
    client, relay2 = _pair()
    client.initiate()
    _, _, m2 = relay2.receive_data(_pair(seed="z")[0].initiate())
    forged = m2[:2] + point + m2[2 + 32 :]  # relay ephemeral replaced by a low-order point
    with pytest.raises(HandshakeError):
        client.receive_data(forged)


@pytest.mark.parametrize("header", [b"\x00\x00", b"\x00\x0f", b"\xff\xff", b"\x10\x00"])
def test_handshake_record_length_checked_before_buffering(header: bytes) -> None:
    _, relay = _pair()
    with pytest.raises(HandshakeError):
        relay.receive_data(header)  # only the header: no body needed to refuse it
    assert relay.failed


@pytest.mark.parametrize("header", [b"\x00\x00", b"\x00\x0f"])
def test_transport_record_length_checked_before_buffering(header: bytes) -> None:
    _, relay = _connected()
    with pytest.raises(AuthenticationError):
        relay.receive_data(header)
    assert relay.failed


def test_max_length_transport_record_is_buffered_until_complete() -> None:
    client, relay = _connected()
    wire = client.send(b"z" * noise.MAX_PLAINTEXT)
    assert wire[:2] == b"\xff\xff"
    assert relay.receive_data(wire[:-1]) == ([], b"", b"")
    assert relay.receive_data(wire[-1:])[1] == b"z" * noise.MAX_PLAINTEXT


def test_every_flipped_byte_of_a_transport_record_is_authentication_error() -> None:
    client, _ = _connected()
    record = client.send(b"attack at dawn")
    for i in range(len(record)):
        _, relay = _connected()  # same keys: same record would decrypt if untouched
        bad = bytearray(record)
        bad[i] ^= 0x80
        if i < noise.RECORD_HEADER:
            # A longer length only waits for more bytes; a shorter one must fail.
            try:
                _, plain, _ = relay.receive_data(bytes(bad))
            except AuthenticationError:
                assert relay.failed
            else:
                assert plain == b"" and not relay.failed
            continue
        with pytest.raises(AuthenticationError):
            relay.receive_data(bytes(bad))
        assert relay.failed
        with pytest.raises(ProtocolError):
            relay.receive_data(record)
    _, relay = _connected()
    assert relay.receive_data(record)[1] == b"attack at dawn"


def test_replayed_and_reordered_records_are_authentication_errors() -> None:
    client, relay = _connected()
    r1, r2 = client.send(b"one"), client.send(b"two")
    assert relay.receive_data(r1)[1] == b"one"
    with pytest.raises(AuthenticationError):
        relay.receive_data(r1)
    client, relay = _connected()
    r1, r2 = client.send(b"one"), client.send(b"two")
    with pytest.raises(AuthenticationError):
        relay.receive_data(r2)


def test_reflected_record_is_refused() -> None:
    """A record sent back to its sender fails: each direction has its own key."""
    client, _ = _connected()
    with pytest.raises(AuthenticationError):
        client.receive_data(client.send(b"echo"))


# --- cipher state ---------------------------------------------------------------------


def test_nonce_exhaustion_raises_instead_of_wrapping() -> None:
    enc, dec = noise.CipherState(_key("k")), noise.CipherState(_key("k"))
    enc.set_nonce(noise.MAX_NONCE - 1)
    dec.set_nonce(noise.MAX_NONCE - 1)
    assert dec.decrypt_with_ad(b"", enc.encrypt_with_ad(b"", b"last")) == b"last"
    with pytest.raises(ProtocolError):
        enc.encrypt_with_ad(b"", b"one too many")
    with pytest.raises(AuthenticationError):
        dec.decrypt_with_ad(b"", bytes(32))


def test_rekey_changes_key_and_both_ends_agree() -> None:
    enc, dec = noise.CipherState(_key("k")), noise.CipherState(_key("k"))
    before = enc.encrypt_with_ad(b"ad", b"msg")
    enc.set_nonce(0)
    enc.rekey()
    after = enc.encrypt_with_ad(b"ad", b"msg")
    assert after != before
    dec.rekey()
    assert dec.decrypt_with_ad(b"ad", after) == b"msg"


def test_empty_cipher_state_is_identity_and_cannot_rekey() -> None:
    cs = noise.CipherState()
    assert not cs.has_key()
    assert cs.encrypt_with_ad(b"", b"clear") == b"clear"
    with pytest.raises(HandshakeError):
        cs.rekey()


def test_unsupported_protocol_names_are_refused() -> None:
    for name in [
        b"Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s",
        b"Noise_XX_448_ChaChaPoly_BLAKE2s",
        b"Noise_XX_25519_AESGCM_SHA256",
        b"Noise_XX_25519_ChaChaPoly_SHA512",
        b"\xff",
    ]:
        with pytest.raises(HandshakeError):
            noise.parse_protocol_name(name)


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), data=st.binary(max_size=200))
def test_inlined_hmac_equals_stdlib(key: bytes, data: bytes) -> None:
    for name, fn in (("BLAKE2s", hashlib.blake2s), ("SHA256", hashlib.sha256)):
        state = noise_protocol._SymmetricState(b"Noise_NN_25519_ChaChaPoly_" + name.encode(), name)
        assert state._hmac(key, data) == hmac.new(key, data, fn).digest()


def test_keypair_dh_agrees_with_dh_module_on_wycheproof() -> None:
    data = json.loads(require(WYCHEPROOF_X25519).read_text())
    cases = data["testGroups"][0]["tests"]
    assert len(cases) > 500
    refused = 0
    for case in cases:
        private, public = bytes.fromhex(case["private"]), bytes.fromhex(case["public"])
        try:
            expected: bytes | None = dh.x25519(private, public)
        except InvalidPublicKeyError:
            expected = None
        try:
            got: bytes | None = noise_protocol._KeyPair(private).dh(public)
        except InvalidPublicKeyError:
            got = None
        assert got == expected, case["tcId"]
        if expected is None:
            refused += 1
        else:
            assert got == bytes.fromhex(case["shared"])
    assert refused >= 31


# --- never another exception ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=4))
def test_any_bytes_to_a_fresh_responder_give_only_our_errors(chunks: list[bytes]) -> None:
    _, relay = _pair()
    for chunk in chunks:
        try:
            events, plain, _ = relay.receive_data(chunk)
        except SecureChatError:
            assert relay.failed
            return
        assert not events and plain == b""


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), prefix_valid=st.booleans())
def test_any_bytes_mid_handshake_or_in_transport_give_only_our_errors(
    data: bytes, prefix_valid: bool
) -> None:
    """Garbage to a client awaiting message 2, a relay awaiting message 3, a live link."""
    client, relay = _pair()
    _, _, m2 = relay.receive_data(client.initiate())
    live_client, live_relay = _connected()
    # With a valid length prefix the garbage reaches the AEAD/DH code, not just the length check.
    body = (len(data).to_bytes(2, "big") + data) if prefix_valid else data
    for target in (client, relay, live_client, live_relay):
        try:
            events, plain, _ = target.receive_data(body)
        except SecureChatError:
            assert target.failed
        else:
            assert not events and plain == b""
    assert m2


# --- handshake size limits (issue 13.2: the spec said 1,104; the product took 1,056-byte
# message-3 payloads) -----------------------------------------------------------------------


def _raw_message_3(payload: bytes) -> tuple[noise.NoiseConnection, bytes]:
    """A responder at message 3, and a client's message 3 carrying ``payload`` (written
    with the bare handshake state, which does not enforce the link's payload bound)."""
    hs = noise.HandshakeState(
        "XX",
        True,
        protocol_name=noise.PROTOCOL_NAME,
        static_private=CLIENT_KEY,
        prologue=noise.PROLOGUE,
        rng=_counter_rng("raw"),
    )
    _, relay = _pair()
    m1 = hs.write_message(b"")
    _, _, m2 = relay.receive_data(len(m1).to_bytes(2, "big") + m1)
    hs.read_message(m2[2:])
    m3 = hs.write_message(payload)
    return relay, len(m3).to_bytes(2, "big") + m3


def test_handshake_limits_are_the_specified_numbers() -> None:
    assert noise.MAX_HANDSHAKE_PAYLOAD == 1024
    assert noise.MAX_HANDSHAKE_RECORD == 1120 == 32 + 48 + 1024 + 16


@pytest.mark.parametrize("size", [0, 32, 1024])
def test_message_3_payload_up_to_1024_accepted(size: int) -> None:
    relay, m3 = _raw_message_3(bytes(size))
    events, _, _ = relay.receive_data(m3)
    assert len(events[0].payload) == size


@pytest.mark.parametrize("size", [1025, 1056])
def test_message_3_payload_over_1024_refused(size: int) -> None:
    relay, m3 = _raw_message_3(bytes(size))
    assert len(m3) - noise.RECORD_HEADER <= noise.MAX_HANDSHAKE_RECORD  # the record fits
    with pytest.raises(HandshakeError, match="payload"):
        relay.receive_data(m3)
    assert relay.failed


def test_message_3_record_over_1120_refused_before_buffering() -> None:
    relay, m3 = _raw_message_3(bytes(1057))
    assert len(m3) - noise.RECORD_HEADER == 1121
    with pytest.raises(HandshakeError, match="length 1121"):
        relay.receive_data(m3[:2])  # the two length bytes are enough


def test_message_2_of_exactly_1120_bytes_accepted() -> None:
    client, relay = _pair(relay_payload=bytes(1024))
    _, _, m2 = relay.receive_data(client.initiate())
    assert len(m2) - noise.RECORD_HEADER == 1120
    events, _, m3 = client.receive_data(m2)
    assert events[0].payload == bytes(1024) and m3
