"""Identities, their public-key line and their private-key file format (core).

An identity is two key pairs generated together and stored in one file:

* an X25519 pair: the Noise static key of the client<->relay link (so the
  relay knows whose mailbox a connection may read) and the identity key of
  X3DH and the Double Ratchet;
* an Ed25519 pair that signs the published prekeys. We chose a separate
  Ed25519 key over XEdDSA because XEdDSA needs curve arithmetic that neither
  PyNaCl nor ``cryptography`` exposes, and we build on their primitives only.
  Both public halves travel together in the ``.pub`` line, so a peer who has
  the line has both, and the fingerprint covers both.

Formats (both versioned, both typed):

``NAME.pub``: one line ``scid1:<base32(x25519 || ed25519 || checksum)> NAME``.

``NAME.key``: text, first line :data:`PRIVATE_HEADER`, then ``field: value``
lines in a fixed order. The 64 secret bytes are sealed with
XChaCha20-Poly1305 under a key from Argon2id(passphrase); every header line
is the AEAD's associated data, so the KDF cost, the name or the public key
cannot be swapped without the passphrase check failing.

This module is pure: callers pass the randomness and do the file I/O
(see :mod:`securechat.client.keystore`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass, field
from typing import Final

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from securechat.core import dh, encoding
from securechat.errors import AuthenticationError, CorruptKeyError, WrongPassphraseError

PUBLIC_PREFIX: Final = "scid1"
PRIVATE_HEADER: Final = "SECURECHAT PRIVATE KEY v1"
DH_SIZE: Final = 32
SIGN_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
SEED_SIZE: Final = DH_SIZE + SIGN_SIZE  # randomness that makes one identity
MAX_NAME: Final = 64

CIPHER_NONE: Final = "none"
CIPHER_ARGON2ID: Final = "argon2id-xchacha20poly1305"
SALT_SIZE: Final = nacl.bindings.crypto_pwhash_SALTBYTES
NONCE_SIZE: Final = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
# libsodium's "moderate" Argon2id cost for new key files: 3 passes over 256 MiB,
# measured at 0.43 s per unlock on the project's 2-core machine ("interactive",
# 2 passes over 64 MiB, took 0.07 s: about six times cheaper to guess against).
# Stored in the file, so older keys keep their cost and a later version can raise it.
DEFAULT_OPSLIMIT: Final = nacl.bindings.crypto_pwhash_argon2id_OPSLIMIT_MODERATE
DEFAULT_MEMLIMIT: Final = nacl.bindings.crypto_pwhash_argon2id_MEMLIMIT_MODERATE
# Bounds on what a key file may ask of us, so a hostile file cannot make us
# burn minutes or gigabytes before the passphrase check. The lower bounds are
# libsodium's own minimums for Argon2id (1 pass, 8 KiB).
MIN_OPSLIMIT: Final = nacl.bindings.crypto_pwhash_argon2id_OPSLIMIT_MIN
MAX_OPSLIMIT: Final = 16
MIN_MEMLIMIT: Final = nacl.bindings.crypto_pwhash_argon2id_MEMLIMIT_MIN
MAX_MEMLIMIT: Final = 1024 * 1024 * 1024

_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
_STORAGE_LABEL: Final = b"securechat/v1/storage/"


def check_name(name: str) -> str:
    """Return ``name`` if it is usable as a key name and file stem, else raise."""
    if not name or len(name) > MAX_NAME or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise CorruptKeyError(
            f"invalid name {name!r}: use 1-{MAX_NAME} letters, digits, '_', '-' or '.'"
        )
    return name


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """What a peer needs to know of us: both public keys and a display name."""

    dh: bytes
    sign: bytes
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.dh) != DH_SIZE or len(self.sign) != SIGN_SIZE:
            raise CorruptKeyError("public identity keys have the wrong size")

    @property
    def key_bytes(self) -> bytes:
        """The 64 bytes that identify this identity (the name is only a comment)."""
        return self.dh + self.sign

    @property
    def fingerprint(self) -> str:
        return encoding.fingerprint(self.key_bytes)

    def same_keys(self, other: PublicIdentity) -> bool:
        return hmac.compare_digest(self.key_bytes, other.key_bytes)

    def to_line(self) -> str:
        token = encoding.encode_token(PUBLIC_PREFIX, self.key_bytes)
        return f"{token} {self.name}" if self.name else token

    @classmethod
    def from_line(cls, text: str, *, default_name: str = "") -> PublicIdentity:
        """Parse a ``.pub`` line: ``TOKEN`` or ``TOKEN SP NAME``, then at most one
        line end (``LF`` or ``CR LF``). One canonical form, so two files for the
        same identity are byte-equal and a stray character is never ignored."""
        line = text.removesuffix("\n").removesuffix("\r")
        if "\n" in line or "\r" in line:
            raise CorruptKeyError("a public key file holds exactly one line")
        token, sep, name = line.partition(" ")
        raw = encoding.decode_token(token, PUBLIC_PREFIX, DH_SIZE + SIGN_SIZE)
        if sep:
            if name != name.strip() or not name:
                raise CorruptKeyError(
                    "a public key line is the key, one space, then the name (no other spaces)"
                )
            check_name(name)
        return cls(dh=raw[:DH_SIZE], sign=raw[DH_SIZE:], name=name or default_name)


@dataclass(frozen=True, slots=True)
class Identity:
    """Our own identity: the public half plus the two private keys."""

    public: PublicIdentity
    dh_private: bytes = field(repr=False)
    sign_seed: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return self.public.name

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature (64 bytes) over ``message``."""
        return Ed25519PrivateKey.from_private_bytes(self.sign_seed).sign(message)

    def storage_key(self, purpose: str) -> bytes:
        """A 32-byte key for encrypting local state at rest, one per purpose.

        Derived from the X25519 private key with keyed BLAKE2b, so state files
        are unreadable without the (passphrase-protected) identity, and the
        history key differs from the session-state key.
        """
        digest = nacl.bindings.crypto_generichash_blake2b_salt_personal(
            _STORAGE_LABEL + purpose.encode(), digest_size=32, key=self.dh_private
        )
        return bytes(digest)


def generate_identity(name: str, seed: bytes) -> Identity:
    """Make an identity from 64 random bytes (the caller supplies ``os.urandom(64)``)."""
    if len(seed) != SEED_SIZE:
        raise ValueError("generate_identity needs 64 random bytes")
    return identity_from_secrets(check_name(name), seed[:DH_SIZE], seed[DH_SIZE:])


def identity_from_secrets(name: str, dh_private: bytes, sign_seed: bytes) -> Identity:
    sign_public = Ed25519PrivateKey.from_private_bytes(sign_seed).public_key()
    public = PublicIdentity(
        dh=dh.public_key(dh_private),
        sign=sign_public.public_bytes(Encoding.Raw, PublicFormat.Raw),
        name=name,
    )
    return Identity(public=public, dh_private=dh_private, sign_seed=sign_seed)


def verify_signature(sign_public: bytes, message: bytes, signature: bytes) -> None:
    """Raise :class:`AuthenticationError` unless ``signature`` is valid."""
    if len(sign_public) != SIGN_SIZE or len(signature) != SIGNATURE_SIZE:
        raise AuthenticationError("signature verification failed")
    try:
        Ed25519PublicKey.from_public_bytes(sign_public).verify(signature, message)
    except (InvalidSignature, ValueError) as exc:
        raise AuthenticationError("signature verification failed") from exc


def safety_number(a: PublicIdentity, b: PublicIdentity) -> str:
    """The 60-digit number both sides of a conversation see identically."""
    return encoding.safety_number(a.key_bytes, b.key_bytes)


# --- the private key file ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KdfParams:
    """Argon2id parameters and per-file randomness for an encrypted key file."""

    salt: bytes
    nonce: bytes
    opslimit: int = DEFAULT_OPSLIMIT
    memlimit: int = DEFAULT_MEMLIMIT


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CorruptKeyError(f"private key file: {what} is not valid base64") from exc
    if len(raw) != size:
        raise CorruptKeyError(f"private key file: {what} has the wrong length")
    return raw


def _derive_file_key(passphrase: bytes, params: KdfParams) -> bytes:
    return bytes(
        nacl.bindings.crypto_pwhash_alg(
            32,
            passphrase,
            params.salt,
            params.opslimit,
            params.memlimit,
            nacl.bindings.crypto_pwhash_ALG_ARGON2ID13,
        )
    )


def encode_private_key(
    identity: Identity, passphrase: bytes | None, params: KdfParams | None
) -> str:
    """Serialise ``identity``; encrypted when a passphrase and params are given."""
    secret = identity.dh_private + identity.sign_seed
    header = [PRIVATE_HEADER, f"name: {identity.name}", f"public: {identity.public.to_line()}"]
    if passphrase is None or params is None:
        header.append(f"cipher: {CIPHER_NONE}")
        return "\n".join([*header, f"secret: {_b64(secret)}"]) + "\n"
    header += [
        f"cipher: {CIPHER_ARGON2ID}",
        f"kdf: opslimit={params.opslimit} memlimit={params.memlimit} salt={_b64(params.salt)}",
        f"nonce: {_b64(params.nonce)}",
    ]
    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        secret, "\n".join(header).encode(), params.nonce, _derive_file_key(passphrase, params)
    )
    return "\n".join([*header, f"secret: {_b64(sealed)}"]) + "\n"


@dataclass(frozen=True, slots=True)
class PrivateKeyFile:
    """A parsed but not yet decrypted key file."""

    name: str
    public: PublicIdentity
    cipher: str
    kdf: KdfParams | None
    header_text: str
    secret: bytes

    @property
    def encrypted(self) -> bool:
        return self.cipher == CIPHER_ARGON2ID


def _fields(lines: list[str], names: list[str]) -> dict[str, str]:
    if len(lines) != len(names):
        raise CorruptKeyError("private key file is truncated or has extra lines")
    values = {}
    for line, name in zip(lines, names, strict=True):
        key, sep, value = line.partition(": ")
        if key != name or not sep:
            raise CorruptKeyError(f"private key file: expected field {name!r}")
        values[name] = value
    return values


def _parse_kdf(text: str) -> tuple[int, int, str]:
    parts = dict(item.partition("=")[::2] for item in text.split(" "))
    try:
        ops, mem, salt = int(parts["opslimit"]), int(parts["memlimit"]), parts["salt"]
    except (KeyError, ValueError) as exc:
        raise CorruptKeyError("private key file: malformed kdf line") from exc
    if not (MIN_OPSLIMIT <= ops <= MAX_OPSLIMIT and MIN_MEMLIMIT <= mem <= MAX_MEMLIMIT):
        raise CorruptKeyError("private key file: kdf parameters out of range")
    return ops, mem, salt


def parse_private_key(text: str) -> PrivateKeyFile:
    """Parse a key file's text strictly; raise CorruptKeyError on any deviation."""
    if not text.strip():
        raise CorruptKeyError("private key file is empty (truncated?)")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != PRIVATE_HEADER:
        if lines and lines[0].startswith(PUBLIC_PREFIX + ":"):
            raise CorruptKeyError("this is a public key (.pub), not a private key file")
        raise CorruptKeyError(f"not a securechat private key file (expected {PRIVATE_HEADER!r})")
    if len(lines) < 4 or not lines[3].startswith("cipher: "):
        raise CorruptKeyError("private key file is truncated")
    cipher = lines[3].removeprefix("cipher: ")
    if cipher == CIPHER_NONE:
        f = _fields(lines[1:], ["name", "public", "cipher", "secret"])
        secret, kdf = _unb64(f["secret"], SEED_SIZE, "secret"), None
    elif cipher == CIPHER_ARGON2ID:
        f = _fields(lines[1:], ["name", "public", "cipher", "kdf", "nonce", "secret"])
        ops, mem, salt = _parse_kdf(f["kdf"])
        kdf = KdfParams(
            salt=_unb64(salt, SALT_SIZE, "salt"),
            nonce=_unb64(f["nonce"], NONCE_SIZE, "nonce"),
            opslimit=ops,
            memlimit=mem,
        )
        secret = _unb64(f["secret"], SEED_SIZE + 16, "secret")
    else:
        raise CorruptKeyError(f"private key file: unknown cipher {cipher!r}")
    public = PublicIdentity.from_line(f["public"])
    name = check_name(f["name"])
    header_text = "\n".join(lines[:-1])
    return PrivateKeyFile(name, public, cipher, kdf, header_text, secret)


def decrypt_private_key(parsed: PrivateKeyFile, passphrase: bytes | None) -> Identity:
    """Open a parsed key file; check that the secrets match the stated public key."""
    if parsed.encrypted:
        if passphrase is None or parsed.kdf is None:
            raise WrongPassphraseError("this private key is encrypted: a passphrase is needed")
        try:
            secret = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                parsed.secret,
                parsed.header_text.encode(),
                parsed.kdf.nonce,
                _derive_file_key(passphrase, parsed.kdf),
            )
        except nacl.exceptions.CryptoError as exc:
            raise WrongPassphraseError("wrong passphrase (or the key file was modified)") from exc
    else:
        secret = parsed.secret
    identity = identity_from_secrets(parsed.name, secret[:DH_SIZE], secret[DH_SIZE:])
    if not identity.public.same_keys(parsed.public):
        raise CorruptKeyError("private key file is corrupted: secret and public key disagree")
    return identity
