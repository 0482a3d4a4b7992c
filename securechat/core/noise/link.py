"""The client<->relay link: Noise XX records over a byte stream (core).

Built on the generic, vector-tested objects of ``protocol.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from securechat.core.noise.protocol import (
    MAX_HANDSHAKE_PAYLOAD,
    MAX_HANDSHAKE_RECORD,
    MAX_PLAINTEXT,
    MIN_RECORD,
    PATTERN,
    PROLOGUE,
    PROTOCOL_NAME,
    RECORD_HEADER,
    TAG_SIZE,
    CipherState,
    HandshakeState,
)
from securechat.errors import (
    AuthenticationError,
    HandshakeError,
    ProtocolError,
    UsageError,
)

# --- the securechat link --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer proved it holds ``remote_static``; transport records may flow.

    ``handshake_hash`` binds the whole transcript (channel binding); ``payload``
    is the peer's authenticated handshake payload (message 2 from the relay,
    message 3 from the client).
    """

    remote_static: bytes
    handshake_hash: bytes
    payload: bytes = b""


_INIT_START: Final = "INIT_START"
_INIT_WAIT_2: Final = "INIT_WAIT_2"
_RESP_WAIT_1: Final = "RESP_WAIT_1"
_RESP_WAIT_3: Final = "RESP_WAIT_3"
_TRANSPORT: Final = "TRANSPORT"
_FAILED: Final = "FAILED"


def _record(message: bytes) -> bytes:
    return len(message).to_bytes(RECORD_HEADER, "big") + message


class NoiseConnection:
    """Sans-I/O link: bytes in from the socket, events and plaintext out, records back.

    Used by the relay (responder) and the client (initiator) over
    ``Noise_XX_25519_ChaChaPoly_BLAKE2s`` with :data:`PROLOGUE`. See the module
    docstring for the states and failure rules.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        static_private: bytes,
        rng: Callable[[int], bytes],
        verify_remote: Callable[[bytes], None] | None = None,
        prologue: bytes = PROLOGUE,
        payload: bytes = b"",
    ) -> None:
        if len(payload) > MAX_HANDSHAKE_PAYLOAD:
            raise UsageError("handshake payload too large")
        self._hs: HandshakeState | None = HandshakeState(
            PATTERN,
            initiator,
            protocol_name=PROTOCOL_NAME,
            static_private=static_private,
            prologue=prologue,
            rng=rng,
        )
        self._initiator = initiator
        self._verify_remote = verify_remote
        self._payload = payload
        self._state = _INIT_START if initiator else _RESP_WAIT_1
        self._buf = bytearray()
        self._send_cs: CipherState | None = None
        self._recv_cs: CipherState | None = None
        self._remote_static: bytes | None = None
        self._handshake_hash: bytes | None = None

    # --- public state -----------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._state == _TRANSPORT

    @property
    def failed(self) -> bool:
        return self._state == _FAILED

    @property
    def remote_static(self) -> bytes | None:
        return self._remote_static

    @property
    def handshake_hash(self) -> bytes | None:
        return self._handshake_hash

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete record (for the relay's memory accounting)."""
        return len(self._buf)

    # --- handshake --------------------------------------------------------------------
    def initiate(self) -> bytes:
        """Initiator only: the record carrying handshake message 1 (``-> e``)."""
        if self._state != _INIT_START or self._hs is None:
            raise HandshakeError("initiate() is only for a fresh initiator")
        try:
            message = self._hs.write_message(b"")
        except BaseException:
            self._state = _FAILED
            raise
        self._state = _INIT_WAIT_2
        return _record(message)

    def _handshake_record(self, message: bytes) -> tuple[HandshakeComplete | None, bytes]:
        """Advance the handshake by one peer message; return (event, record to send)."""
        hs = self._hs
        assert hs is not None
        payload = hs.read_message(message)
        if len(payload) > MAX_HANDSHAKE_PAYLOAD:
            raise HandshakeError(
                f"handshake payload of {len(payload)} bytes exceeds {MAX_HANDSHAKE_PAYLOAD}"
            )
        if self._state == _RESP_WAIT_1:
            if payload:
                raise HandshakeError("handshake message 1 must carry no payload")
            self._state = _RESP_WAIT_3
            return None, _record(hs.write_message(self._payload))
        # Message 2 (initiator) or 3 (responder): the peer's static key is now proven.
        remote = hs.remote_static
        assert remote is not None
        if self._verify_remote is not None:
            self._verify_remote(remote)
        reply = _record(hs.write_message(self._payload)) if self._initiator else b""
        i2r, r2i = hs.split()
        self._send_cs, self._recv_cs = (i2r, r2i) if self._initiator else (r2i, i2r)
        self._remote_static = remote
        self._handshake_hash = hs.handshake_hash
        self._hs = None  # drop ephemeral and chaining keys as soon as possible
        self._state = _TRANSPORT
        return HandshakeComplete(remote, self._handshake_hash, payload), reply

    # --- records in -------------------------------------------------------------------
    def receive_data(self, data: bytes) -> tuple[list[HandshakeComplete], bytes, bytes]:
        """Feed bytes from the socket.

        Returns (events, application plaintext from every complete transport
        record, bytes to write back now). Partial records are kept for the
        next call. Raises as the module docstring says, then stays failed.
        """
        if self._state == _FAILED:
            raise ProtocolError("the secure link already failed; reconnect")
        if self._state == _INIT_START:
            self._state = _FAILED
            raise HandshakeError("data received before the handshake was started")
        try:
            return self._receive(data)
        except AuthenticationError:
            self._state = _FAILED
            if self._hs is not None:
                raise HandshakeError("handshake failed authentication") from None
            raise
        except BaseException:
            self._state = _FAILED
            raise

    def _receive(self, data: bytes) -> tuple[list[HandshakeComplete], bytes, bytes]:
        if self._buf:
            self._buf += data
            src: bytes | bytearray = self._buf
        else:
            src = data
        events: list[HandshakeComplete] = []
        plain: list[bytes] = []
        replies: list[bytes] = []
        total = len(src)
        pos = 0
        view = memoryview(src)
        try:
            while self._state != _TRANSPORT and total - pos >= RECORD_HEADER:
                end = self._record_end(src, pos)
                if end > total:
                    break
                event, reply = self._handshake_record(bytes(view[pos + RECORD_HEADER : end]))
                pos = end
                if event is not None:
                    events.append(event)
                if reply:
                    replies.append(reply)
            if self._state == _TRANSPORT:
                pos = self._transport_records(src, view, pos, plain)
        finally:
            view.release()
        if src is self._buf:
            del self._buf[:pos]
        elif pos < total:
            self._buf = bytearray(data[pos:])
        return events, b"".join(plain), b"".join(replies)

    def _record_end(self, src: bytes | bytearray, pos: int) -> int:
        """Check a handshake record's length before buffering it."""
        length = (src[pos] << 8) | src[pos + 1]
        if length < MIN_RECORD or length > MAX_HANDSHAKE_RECORD:
            raise HandshakeError(f"handshake record length {length} out of range")
        return pos + RECORD_HEADER + length

    def _transport_records(
        self, src: bytes | bytearray, view: memoryview, pos: int, plain: list[bytes]
    ) -> int:
        """Decrypt every complete transport record from ``pos``: the relay's hot loop.

        One AEAD call per record; no copy of the ciphertext (memoryview slice).
        """
        cs = self._recv_cs
        assert cs is not None
        decrypt = cs.decrypt_with_ad
        append = plain.append
        total = len(src)
        while total - pos >= RECORD_HEADER:
            length = (src[pos] << 8) | src[pos + 1]
            if length < MIN_RECORD:
                raise AuthenticationError()
            end = pos + RECORD_HEADER + length
            if end > total:
                break
            append(decrypt(b"", view[pos + RECORD_HEADER : end]))
            pos = end
        return pos

    # --- records out ------------------------------------------------------------------
    def send(self, plaintext: bytes) -> bytes:
        """Encrypt application bytes into as few records as possible; return them.

        Empty input gives no record (b"").
        """
        if self._state != _TRANSPORT or self._send_cs is None:
            raise HandshakeError("cannot send before the secure link is established")
        encrypt = self._send_cs.encrypt_with_ad
        size = len(plaintext)
        if size <= MAX_PLAINTEXT:
            if not size:
                return b""
            return _record(encrypt(b"", plaintext))
        view = memoryview(plaintext)
        out: list[bytes] = []
        for start in range(0, size, MAX_PLAINTEXT):
            chunk = view[start : start + MAX_PLAINTEXT]
            out.append((len(chunk) + TAG_SIZE).to_bytes(RECORD_HEADER, "big"))
            out.append(encrypt(b"", chunk))
        return b"".join(out)
