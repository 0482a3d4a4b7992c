"""Fuzz every parser of key files read from disk: client private keys, ``.pub`` lines,
the relay's key file, the known-relays file.

Invariant: any bytes give a parsed key or a ``SecureChatError`` (our tree), never
another exception. The first input byte picks the parser; the rest is the file:

    0  keys.parse_private_key (+ decrypt_private_key when unencrypted)
    1  keys.PublicIdentity.from_line
    2  relay/keyfile._parse (the relay's ``relay.key``)
    3  encoding.decode_token of a relay public key (``relay.pub``, known relays)

A file that is not UTF-8 is refused by the shells before parsing (tested in
``tests/reliability``), so non-UTF-8 inputs are decoded with replacement characters
to still reach the parser with odd characters.

Run (needs ``atheris``):  python fuzz/fuzz_keyfile.py fuzz/corpus/keyfile
Without atheris:         python fuzz/fuzz_keyfile.py --replay [N]   (corpus + mutations)
                         python fuzz/fuzz_keyfile.py --make-corpus  (regenerate seeds)
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

from securechat.core import encoding, keys
from securechat.errors import SecureChatError
from securechat.relay import keyfile

import _harness  # the fuzz/ folder is on sys.path when run as a script

CORPUS = Path(__file__).resolve().parent / "corpus" / "keyfile"
_PATH = Path("relay.key")


def _parse_private(text: str) -> None:
    parsed = keys.parse_private_key(text)
    if not parsed.encrypted:
        identity = keys.decrypt_private_key(parsed, None)
        assert identity.public.same_keys(parsed.public)


def _parse_public(text: str) -> None:
    ident = keys.PublicIdentity.from_line(text)
    # canonical: a parsed line re-encodes to the same key
    again = keys.PublicIdentity.from_line(ident.to_line())
    assert again.same_keys(ident)


def _parse_relay_key(text: str) -> None:
    private = keyfile._parse(text, _PATH)
    assert len(private) == 32


def _parse_relay_pub(text: str) -> None:
    raw = encoding.decode_token(text.strip(), keyfile.PUBLIC_PREFIX, 32)
    assert len(raw) == 32


_PARSERS = (_parse_private, _parse_public, _parse_relay_key, _parse_relay_pub)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    text = data[1:].decode("utf-8", errors="replace")
    with contextlib.suppress(SecureChatError):
        _PARSERS[data[0] % len(_PARSERS)](text)


def make_corpus() -> int:
    """Seeds: real files of every kind, written by the real encoders."""
    CORPUS.mkdir(parents=True, exist_ok=True)
    ident = keys.generate_identity("alice", hashlib.sha512(b"fuzz alice").digest())
    seeds = {
        "private_plain": b"\x00" + keys.encode_private_key(ident, None, None).encode(),
        "public_line": b"\x01" + ident.public.to_line().encode(),
        "public_noname": b"\x01" + ident.public.to_line().split(" ")[0].encode(),
    }
    relay_priv = hashlib.blake2s(b"fuzz relay").digest()
    from securechat.core import dh

    pub = encoding.encode_token(keyfile.PUBLIC_PREFIX, dh.public_key(relay_priv))
    seeds["relay_key"] = (
        b"\x02"
        + (
            f"{keyfile.HEADER}\nsecret {encoding.encode_token(keyfile.SECRET_PREFIX, relay_priv)}\n"
            f"public {pub}\n"
        ).encode()
    )
    seeds["relay_pub"] = b"\x03" + pub.encode() + b"\n"
    for name, blob in seeds.items():
        (CORPUS / name).write_bytes(blob)
    print(f"wrote {len(seeds)} seeds to {CORPUS}")
    return 0


def main() -> int:
    return _harness.main(test_one_input, CORPUS, make_corpus, default_rounds=20000)


if __name__ == "__main__":
    sys.exit(main())
