"""Noise (core), re-exported: ``protocol`` (the generic objects, checked against the public
vectors) and ``link`` (the client<->relay link).
"""

from securechat.core.noise.link import HandshakeComplete, NoiseConnection
from securechat.core.noise.protocol import (
    DHLEN,
    HASHLEN,
    KEY_SIZE,
    MAX_HANDSHAKE_PAYLOAD,
    MAX_HANDSHAKE_RECORD,
    MAX_MESSAGE,
    MAX_NONCE,
    MAX_PLAINTEXT,
    MIN_RECORD,
    ONE_WAY_PATTERNS,
    PATTERN,
    PATTERNS,
    PROLOGUE,
    PROTOCOL_NAME,
    RECORD_HEADER,
    TAG_SIZE,
    CipherState,
    HandshakeState,
    parse_protocol_name,
)

__all__ = [
    "DHLEN",
    "HASHLEN",
    "KEY_SIZE",
    "MAX_HANDSHAKE_PAYLOAD",
    "MAX_HANDSHAKE_RECORD",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "MAX_PLAINTEXT",
    "MIN_RECORD",
    "ONE_WAY_PATTERNS",
    "PATTERN",
    "PATTERNS",
    "PROLOGUE",
    "PROTOCOL_NAME",
    "RECORD_HEADER",
    "TAG_SIZE",
    "CipherState",
    "HandshakeComplete",
    "HandshakeState",
    "NoiseConnection",
    "parse_protocol_name",
]
