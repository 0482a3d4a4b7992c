"""Text encodings of public keys: typed, versioned, checksummed lines (core).

Why not plain base64: a key pasted into a chat or an e-mail must say what it
is (a typed prefix, as age's ``age1``), survive a version change (the digit in
the prefix), and catch a mistyped character before it becomes a silent trust
decision (a 4-byte BLAKE2b checksum bound to the prefix). Base32 (RFC 4648,
lower case, no padding) keeps the line free of characters that mail clients
or terminals mangle and is easy to read aloud.

Fingerprints and safety numbers are here too because the relay needs the
fingerprint of its own key and must not import anything that touches secrets.
"""

from __future__ import annotations

import base64
import hmac
import re
from typing import Final

import nacl.bindings

from securechat.errors import CorruptKeyError

CHECKSUM_SIZE: Final = 4
_KEY_LABEL: Final = b"securechat/v1/"
_TOKEN_RE: Final = re.compile(r"^([a-z]+[0-9]+):([a-z2-7]+)$")


def _blake2b(data: bytes, *, size: int, label: bytes) -> bytes:
    # Keyed BLAKE2b gives domain separation between every use of the hash;
    # libsodium's minimum digest is 16 bytes, shorter outputs are truncations.
    digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        data, digest_size=max(size, 16), key=_KEY_LABEL + label
    )
    return bytes(digest[:size])


def encode_token(prefix: str, payload: bytes) -> str:
    """Encode ``payload`` as ``prefix:base32(payload || checksum)``."""
    checksum = _blake2b(payload, size=CHECKSUM_SIZE, label=prefix.encode())
    body = base64.b32encode(payload + checksum).decode().rstrip("=").lower()
    return f"{prefix}:{body}"


def decode_token(token: str, prefix: str, size: int) -> bytes:
    """Decode a token made by :func:`encode_token`; raise CorruptKeyError if wrong.

    The message says which of type, encoding or checksum failed, because that is
    what a person fixing a copy-paste needs to know.
    """
    match = _TOKEN_RE.match(token.strip())
    if match is None:
        raise CorruptKeyError("not a securechat key line (expected 'PREFIX:base32...')")
    if match.group(1) != prefix:
        raise CorruptKeyError(f"wrong key type: expected {prefix!r}, found {match.group(1)!r}")
    body = match.group(2).upper()
    try:
        raw = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError as exc:
        raise CorruptKeyError("key line is not valid base32 (truncated or mistyped?)") from exc
    if len(raw) != size + CHECKSUM_SIZE:
        raise CorruptKeyError("key line has the wrong length (truncated or mistyped?)")
    payload, checksum = raw[:size], raw[size:]
    expected = _blake2b(payload, size=CHECKSUM_SIZE, label=prefix.encode())
    if not hmac.compare_digest(checksum, expected):
        raise CorruptKeyError("key line checksum does not match (a character is mistyped)")
    if encode_token(prefix, payload) != token.strip():
        raise CorruptKeyError("key line is not in canonical form")
    return payload


FINGERPRINT_SIZE: Final = 20


def fingerprint(public: bytes, *, label: bytes = b"fingerprint") -> str:
    """A fingerprint people can read aloud: 8 groups of 4 base32 characters.

    160 bits of BLAKE2b over the public key material, e.g.
    ``kq3m-7hxa-2pdz-...``. Base32 avoids 0/O and 1/l confusions.
    """
    digest = _blake2b(public, size=FINGERPRINT_SIZE, label=label)
    text = base64.b32encode(digest).decode().rstrip("=").lower()
    return "-".join(text[i : i + 4] for i in range(0, 32, 4))


SAFETY_NUMBER_DIGITS: Final = 60
_SAFETY_ITERATIONS: Final = 5200


def _safety_half(public: bytes) -> str:
    # Signal's construction: iterate a hash so a second-preimage search costs
    # 5200x more, then print 30 decimal digits (6 chunks of 5, each mod 100000).
    digest = b""
    for _ in range(_SAFETY_ITERATIONS):
        digest = _blake2b(digest + public, size=32, label=b"safety-number")
    digits = []
    for i in range(6):
        chunk = int.from_bytes(digest[i * 5 : i * 5 + 5], "big") % 100000
        digits.append(f"{chunk:05d}")
    return "".join(digits)


def safety_number(public_a: bytes, public_b: bytes) -> str:
    """60 digits for the pair, identical on both sides (halves sorted)."""
    halves = sorted([_safety_half(public_a), _safety_half(public_b)])
    number = halves[0] + halves[1]
    return " ".join(number[i : i + 5] for i in range(0, SAFETY_NUMBER_DIGITS, 5))
