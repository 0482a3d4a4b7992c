"""Identity keys, key lines and key files: round trips, vectors, hostile input."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securechat.core import encoding, keys
from securechat.errors import AuthenticationError, CorruptKeyError, WrongPassphraseError

from paths import VECTORS as _VECTORS

VECTORS = _VECTORS / "keys.json"
FAST = keys.KdfParams(salt=bytes(16), nonce=bytes(24), opslimit=1, memlimit=8192 * 1024)


def _ident(name: str = "alice") -> keys.Identity:
    return keys.generate_identity(name, os.urandom(keys.SEED_SIZE))


def test_vectors_recompute_exactly() -> None:
    doc = json.loads(VECTORS.read_text())
    assert len(doc["identities"]) == 2
    made = {}
    for rec in doc["identities"]:
        seed = bytes.fromhex(rec["seed"])
        ident = keys.generate_identity(rec["name"], seed)
        made[rec["name"]] = ident
        assert ident.public.to_line() == rec["public_line"]
        assert ident.public.fingerprint == rec["fingerprint"]
        assert keys.encode_private_key(ident, None, None) == rec["private_file_plain"]
        kdf = rec["kdf"]
        params = keys.KdfParams(
            salt=bytes.fromhex(kdf["salt"]),
            nonce=bytes.fromhex(kdf["nonce"]),
            opslimit=kdf["opslimit"],
            memlimit=kdf["memlimit"],
        )
        encrypted = keys.encode_private_key(ident, rec["passphrase"].encode(), params)
        assert encrypted == rec["private_file_encrypted"]
        file_key = keys._derive_file_key(rec["passphrase"].encode(), params)
        assert file_key.hex() == kdf["file_key"]
        assert kdf["argon2"]["memory_kib"] * 1024 == kdf["memlimit"]
        parsed = keys.parse_private_key(rec["private_file_encrypted"])
        assert keys.decrypt_private_key(parsed, rec["passphrase"].encode()) == ident
    sn = doc["safety_number"]
    assert keys.safety_number(made[sn["a"]].public, made[sn["b"]].public) == sn["number"]


def test_public_line_round_trip_and_name_comment() -> None:
    ident = _ident("carol")
    line = ident.public.to_line()
    assert line.startswith("scid1:") and line.endswith(" carol") and "\n" not in line
    assert keys.PublicIdentity.from_line(line) == ident.public


@given(st.integers(min_value=6, max_value=100), st.sampled_from("abcdefghijklmnopqrstuvwxyz234567"))
@settings(max_examples=60, deadline=None)
def test_single_typo_in_public_line_is_caught(position: int, char: str) -> None:
    line = keys.generate_identity("x", bytes(64)).public.to_line()
    token = line.split(" ")[0]
    pos = min(position, len(token) - 1)
    if token[pos] == char:
        return
    typo = token[:pos] + char + token[pos + 1 :]
    with pytest.raises(CorruptKeyError):
        keys.PublicIdentity.from_line(typo)


@pytest.mark.parametrize(
    "text",
    ["", "hello", "scid1:", "scid2:aaaa", "scid1:AAAA", "a\nb", "screlay1:" + "a" * 60],
)
def test_malformed_public_lines_rejected(text: str) -> None:
    with pytest.raises(CorruptKeyError):
        keys.PublicIdentity.from_line(text)


def test_a_public_line_has_one_canonical_form() -> None:
    line = _ident("carol").public.to_line()
    token = line.split(" ")[0]
    for ok in (line, line + "\n", line + "\r\n", token, token + "\n"):
        keys.PublicIdentity.from_line(ok)
    bad = [
        token + "  carol",  # two spaces
        token + " carol ",  # trailing space
        token + " ",  # a separator and no name
        token + " carol smith",  # a name with a space
        token + " .hidden",  # not a valid name
        line + "\n\n",  # a second (empty) line
        "\n" + line,  # a leading empty line
        " " + line,  # a leading space
    ]
    for text in bad:
        with pytest.raises(CorruptKeyError):
            keys.PublicIdentity.from_line(text)


def test_new_key_files_use_the_moderate_argon2id_cost() -> None:
    params = keys.KdfParams(salt=bytes(16), nonce=bytes(24))
    assert (params.opslimit, params.memlimit) == (3, 256 * 1024 * 1024)
    assert keys.MIN_OPSLIMIT <= params.opslimit <= keys.MAX_OPSLIMIT
    assert keys.MIN_MEMLIMIT <= params.memlimit <= keys.MAX_MEMLIMIT


def test_truncated_public_line_rejected() -> None:
    token = _ident().public.to_line().split(" ")[0]
    for cut in (1, 5, 20):
        with pytest.raises(CorruptKeyError):
            keys.PublicIdentity.from_line(token[:-cut])


def test_private_file_round_trip_plain_and_encrypted() -> None:
    ident = _ident()
    plain = keys.encode_private_key(ident, None, None)
    assert keys.decrypt_private_key(keys.parse_private_key(plain), None) == ident
    enc = keys.encode_private_key(ident, b"pw", FAST)
    parsed = keys.parse_private_key(enc)
    assert parsed.encrypted
    assert keys.decrypt_private_key(parsed, b"pw") == ident
    assert ident.dh_private.hex() not in enc


def test_wrong_passphrase() -> None:
    enc = keys.encode_private_key(_ident(), b"pw", FAST)
    with pytest.raises(WrongPassphraseError):
        keys.decrypt_private_key(keys.parse_private_key(enc), b"pW")
    with pytest.raises(WrongPassphraseError):
        keys.decrypt_private_key(keys.parse_private_key(enc), None)


def test_header_is_authenticated() -> None:
    """Swapping the name or weakening the KDF in the header breaks decryption."""
    enc = keys.encode_private_key(_ident("alice"), b"pw", FAST)
    tampered = enc.replace("name: alice", "name: mallory")
    with pytest.raises(WrongPassphraseError):
        keys.decrypt_private_key(keys.parse_private_key(tampered), b"pw")


def test_secret_public_mismatch_detected() -> None:
    a, b = _ident("a"), _ident("a")
    text = keys.encode_private_key(a, None, None)
    other_public = b.public.to_line()
    swapped = text.replace(a.public.to_line(), other_public)
    with pytest.raises(CorruptKeyError):
        keys.decrypt_private_key(keys.parse_private_key(swapped), None)


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_corruption_gives_our_error(data: st.DataObject) -> None:
    text = keys.encode_private_key(keys.generate_identity("z", bytes(range(64))), None, None)
    mode = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    pos = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    if mode == "truncate":
        bad = text[:pos]
    elif mode == "flip":
        bad = text[:pos] + chr((ord(text[pos]) + 1) % 128) + text[pos + 1 :]
    else:
        bad = text[:pos] + data.draw(st.text(min_size=1, max_size=4)) + text[pos:]
    # Either it still parses to the same identity (harmless change) or our error.
    with contextlib.suppress(CorruptKeyError, WrongPassphraseError):
        keys.decrypt_private_key(keys.parse_private_key(bad), None)


def test_public_file_is_not_a_private_key() -> None:
    with pytest.raises(CorruptKeyError, match="public key"):
        keys.parse_private_key(_ident().public.to_line())


def test_hostile_kdf_parameters_refused() -> None:
    enc = keys.encode_private_key(_ident(), b"pw", FAST)
    for ops, mem in ((1, 99999999999), (17, 8388608), (0, 8388608), (1, 8191)):
        hostile = enc.replace("opslimit=1 memlimit=8388608", f"opslimit={ops} memlimit={mem}")
        with pytest.raises(CorruptKeyError, match="out of range"):
            keys.parse_private_key(hostile)


def test_signatures_verify_and_forgeries_raise() -> None:
    ident = _ident()
    sig = ident.sign(b"prekey")
    keys.verify_signature(ident.public.sign, b"prekey", sig)
    with pytest.raises(AuthenticationError):
        keys.verify_signature(ident.public.sign, b"prekeY", sig)
    with pytest.raises(AuthenticationError):
        keys.verify_signature(_ident().public.sign, b"prekey", sig)
    with pytest.raises(AuthenticationError):
        keys.verify_signature(ident.public.sign, b"prekey", sig[:-1])


def test_safety_number_symmetric_and_distinct() -> None:
    a, b, c = _ident("a").public, _ident("b").public, _ident("c").public
    ab = keys.safety_number(a, b)
    assert ab == keys.safety_number(b, a)
    assert ab != keys.safety_number(a, c)
    assert len(ab.replace(" ", "")) == 60 and ab.replace(" ", "").isdigit()


def test_fingerprint_readable_and_stable() -> None:
    pub = _ident().public
    fp = pub.fingerprint
    assert fp == encoding.fingerprint(pub.key_bytes)
    groups = fp.split("-")
    assert len(groups) == 8 and all(len(g) == 4 for g in groups)


def test_storage_keys_differ_per_purpose_and_identity() -> None:
    a, b = _ident(), _ident()
    assert a.storage_key("state") != a.storage_key("history")
    assert a.storage_key("state") != b.storage_key("state")
    assert a.storage_key("state") == a.storage_key("state")


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "x" * 65, "spa ce", "ü"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(CorruptKeyError):
        keys.check_name(name)
