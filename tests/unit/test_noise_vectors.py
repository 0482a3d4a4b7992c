"""Known-answer tests: our Noise against cacophony and snow, and our own link vector.

The public files live outside the repository (../shared/vectors/noise/). If they
are missing, the tests are skipped, or fail when SECURECHAT_REQUIRE_VECTORS=1 (as
.ci/run sets; see tests/public_vectors.py); SECURECHAT_NOISE_VECTORS names another
file, or, set to an empty string, skips them on purpose. Every vector whose protocol we implement
(25519, ChaChaPoly, BLAKE2s or SHA256, no PSK) runs: all handshake messages, the
transport messages that follow, and the handshake hash where given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from securechat.core import noise
from securechat.errors import HandshakeError

from paths import REPO
from public_vectors import SHARED, missing, require

_ENV = os.environ.get("SECURECHAT_NOISE_VECTORS")
DEFAULT = SHARED / "noise" / "cacophony.txt"
LINK_VECTORS = REPO / "tests" / "vectors" / "noise_link.json"

# Supported vectors in the published files: 76 each (38 patterns x 2 hashes);
# a parsing bug that skips most of them must fail.
MIN_SUPPORTED = {"cacophony.txt": 76, "snow.txt": 76}


def _vector_files() -> list[Path]:
    if _ENV == "":
        return []
    first = Path(_ENV) if _ENV else DEFAULT
    files = [first]
    snow = first.parent / "snow.txt"
    if snow.exists() and snow != first:
        files.append(snow)
    return files


def _supported(vector: dict[str, Any]) -> bool:
    if vector.get("init_psks") or vector.get("resp_psks"):
        return False
    try:
        noise.parse_protocol_name(vector["protocol_name"].encode())
    except HandshakeError:
        return False
    return True


def _load() -> tuple[list[Any], dict[str, int]]:
    params: list[Any] = []
    counts: dict[str, int] = {}
    for path in _vector_files():
        if not path.exists():
            # One test stands for the missing file: it fails in CI, skips elsewhere.
            params.append(pytest.param(path, None, id=f"missing-{path.name}"))
            continue
        vectors = json.loads(path.read_text())["vectors"]
        supported = [v for v in vectors if _supported(v)]
        counts[path.name] = len(supported)
        for i, v in enumerate(supported):
            params.append(pytest.param(path, v, id=f"{path.name}-{i}-{v['protocol_name']}"))
    return params, counts


PARAMS, COUNTS = _load()


def _hex(vector: dict[str, Any], key: str) -> bytes | None:
    value = vector.get(key)
    return bytes.fromhex(value) if value is not None else None


def _states(v: dict[str, Any]) -> tuple[noise.HandshakeState, noise.HandshakeState]:
    name = v["protocol_name"].encode()
    pattern, _ = noise.parse_protocol_name(name)

    def side(prefix: str, initiator: bool) -> noise.HandshakeState:
        return noise.HandshakeState(
            pattern,
            initiator,
            protocol_name=name,
            static_private=_hex(v, f"{prefix}_static"),
            remote_static=_hex(v, f"{prefix}_remote_static"),
            prologue=_hex(v, f"{prefix}_prologue") or b"",
            ephemeral_private=_hex(v, f"{prefix}_ephemeral"),
        )

    return side("init", True), side("resp", False)


def test_vector_files_present_and_counted() -> None:
    if _ENV == "":
        pytest.skip("SECURECHAT_NOISE_VECTORS explicitly set to empty")
    for path in _vector_files():
        require(path)
        minimum = MIN_SUPPORTED.get(path.name, 1)
        assert COUNTS[path.name] >= minimum, (path, COUNTS[path.name])
    xx = [
        p
        for p in PARAMS
        if p.values[1] and p.values[1]["protocol_name"] == "Noise_XX_25519_ChaChaPoly_BLAKE2s"
    ]
    assert len(xx) >= 2


@pytest.mark.parametrize(("path", "vector"), PARAMS)
def test_public_vector(path: Path, vector: dict[str, Any] | None) -> None:
    if vector is None:
        missing(path)
        return
    init, resp = _states(vector)
    one_way = noise.parse_protocol_name(vector["protocol_name"].encode())[0] in (
        noise.ONE_WAY_PATTERNS
    )
    messages = vector["messages"]
    i = 0
    while not init.complete:
        writer, reader = (init, resp) if (i % 2 == 0 or one_way) else (resp, init)
        payload = bytes.fromhex(messages[i]["payload"])
        sent = writer.write_message(payload)
        assert sent.hex() == messages[i]["ciphertext"], f"handshake message {i}"
        assert reader.read_message(sent) == payload
        i += 1
    assert resp.complete
    assert init.handshake_hash == resp.handshake_hash
    if "handshake_hash" in vector:
        assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert i >= 1
    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    transports = 0
    for j in range(i, len(messages)):
        from_init = one_way or j % 2 == 0
        enc, dec = (i_send, r_recv) if from_init else (r_send, i_recv)
        payload = bytes.fromhex(messages[j]["payload"])
        ct = enc.encrypt_with_ad(b"", payload)
        assert ct.hex() == messages[j]["ciphertext"], f"transport message {j}"
        assert dec.decrypt_with_ad(b"", ct) == payload
        transports += 1
    assert transports >= 1


# --- our own published vector for the securechat link ------------------------------


def _link_vectors() -> list[dict[str, Any]]:
    data = json.loads(LINK_VECTORS.read_text())
    assert data["description"] and data["provenance"]
    return list(data["vectors"])


def test_link_vector_file_has_cases() -> None:
    assert len(_link_vectors()) >= 1


@pytest.mark.parametrize("index", range(len(_link_vectors()) if LINK_VECTORS.exists() else 1))
def test_link_vector(index: int) -> None:
    """Replay the link vector through NoiseConnection pairs, checking every byte."""
    v = _link_vectors()[index]
    assert v["protocol_name"] == noise.PROTOCOL_NAME.decode()
    assert bytes.fromhex(v["prologue"]) == noise.PROLOGUE

    def rng_of(hexkey: str) -> Any:
        keys = [bytes.fromhex(hexkey)]
        return lambda n: keys.pop()

    client = noise.NoiseConnection(
        initiator=True,
        static_private=bytes.fromhex(v["client_static"]),
        rng=rng_of(v["client_ephemeral"]),
        payload=bytes.fromhex(v["client_payload"]),
    )
    relay = noise.NoiseConnection(
        initiator=False,
        static_private=bytes.fromhex(v["relay_static"]),
        rng=rng_of(v["relay_ephemeral"]),
        payload=bytes.fromhex(v["relay_payload"]),
    )
    records = v["records"]
    msg1 = client.initiate()
    assert msg1.hex() == records[0]
    _, _, msg2 = relay.receive_data(msg1)
    assert msg2.hex() == records[1]
    events, _, msg3 = client.receive_data(msg2)
    assert msg3.hex() == records[2]
    assert events[0].payload.hex() == v["relay_payload"]
    events2, _, _ = relay.receive_data(msg3)
    assert events2[0].payload.hex() == v["client_payload"]
    assert client.handshake_hash is not None
    assert client.handshake_hash.hex() == v["handshake_hash"] == events2[0].handshake_hash.hex()
    for rec in v["transport"]:
        sender, receiver = (client, relay) if rec["from"] == "client" else (relay, client)
        wire = sender.send(bytes.fromhex(rec["plaintext"]))
        assert wire.hex() == rec["record"]
        assert receiver.receive_data(wire)[1].hex() == rec["plaintext"]
