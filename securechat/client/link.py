"""One authenticated connection from a client to the relay (shell).

A small pump around the sans-I/O cores: socket bytes go into
:class:`~securechat.core.noise.NoiseConnection`, the plaintext it yields goes into
:class:`~securechat.core.wire.FrameDecoder`, and frames to send are encoded,
coalesced and encrypted in one call. ``OSError`` becomes our transport errors
here and nowhere else.

The relay's key is pinned like an SSH host key: the first connection to a
``host:port`` records the key in ``known_relays`` under the key directory, a
later different key is refused *before* our identity is revealed (XX
message 3), and ``--relay-key FILE`` pins explicitly (recorded once the relay
has proven it holds that key). Addresses and pins are
:mod:`securechat.client.relays`.

A failed connection says why, because "it did not work" after a long silence
is what a newcomer cannot act on: refused (nothing listens on that port),
unreachable (no route, no answer), or something that is not a securechat relay
(it answers the handshake with other bytes, e.g. an HTTP server, or not at
all within :data:`HANDSHAKE_TIMEOUT`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterable
from typing import Final, TypeVar

from securechat.client.oserrors import ExceptionMapping, map_exceptions
from securechat.client.relays import KnownRelays, canonical_address, parse_address
from securechat.core import encoding, noise, wire
from securechat.errors import (
    ConnectionClosedError,
    NotARelayError,
    ProtocolError,
    RelayKeyChangedError,
    RelayUnreachableError,
    SecureChatError,
)

E = TypeVar("E", bound=SecureChatError)
_LOST: Final[ExceptionMapping] = {OSError: ConnectionClosedError}  # a socket error on an open link

READ_SIZE: Final = 256 * 1024
# Chosen: TCP connect. A host that exists answers a SYN in one round trip; longer than
# this is a host that is down or a firewall that drops, and the messenger retries anyway.
CONNECT_TIMEOUT: Final = 5.0
# Chosen: from message 1 to the relay's message 2. A relay answers with one DH and one
# write, so a live relay is far under this even on a busy machine over a slow path; a
# peer silent for this long is not a securechat relay (an HTTP server waits for a
# request line that never comes) or is overloaded, and the messenger retries.
HANDSHAKE_TIMEOUT: Final = 2.0
_PREVIEW: Final = 40  # bytes of a non-relay's answer kept to show the user


# --- the link ------------------------------------------------------------------------------


class RelayLink:
    """A connected, authenticated link; thread-safe for one reader and many writers."""

    def __init__(self, sock: socket.socket, conn: noise.NoiseConnection, address: str) -> None:
        self._sock = sock
        self._conn = conn
        self._decoder = wire.FrameDecoder()
        self._write_lock = threading.Lock()
        self.address = address
        self.relay_key = conn.remote_static or b""

    @classmethod
    def connect(
        cls,
        address: str,
        static_private: bytes,
        known: KnownRelays,
        *,
        pinned_key: bytes | None = None,
        timeout: float = CONNECT_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        sign_public: bytes = b"",
    ) -> RelayLink:
        """Connect and run the Noise XX handshake; check the relay key against the pin.

        ``pinned_key`` (``--relay-key``) wins over ``known_relays`` and, once the
        relay has proven it holds it, is recorded there, as the docs promise.
        ``sign_public``: our 32-byte Ed25519 public key, sent as the message-3 payload
        (encrypted, after the relay proved its key) so the relay's logs show the
        identity fingerprint users see (protocol 2); empty sends nothing, as before.
        """
        host, port = parse_address(address)
        recorded = known.lookup(address)
        expected = pinned_key if pinned_key is not None else recorded

        def verify(remote: bytes) -> None:
            if expected is not None and remote != expected:
                raise _key_mismatch(address, remote, expected, known, explicit=pinned_key)

        conn = noise.NoiseConnection(
            initiator=True,
            static_private=static_private,
            rng=os.urandom,
            verify_remote=verify,
            payload=sign_public,
        )
        sock = _open_socket(address, host, port, timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(handshake_timeout)
            _handshake(sock, conn, address, handshake_timeout)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        remote = conn.remote_static
        if remote is not None and remote != recorded:
            source = (
                "from --relay-key"
                if pinned_key is not None
                else (f"first use; checked on every later connection, see {known.path}")
            )
            known.pin(address, remote, source=source)
        return cls(sock, conn, address)

    def send(self, frames: Iterable[wire.Frame]) -> None:
        """Encode, coalesce, encrypt and write frames (one syscall for the batch)."""
        plaintext = b"".join(wire.encode(frame) for frame in frames)
        if not plaintext:
            return
        with self._write_lock, map_exceptions(_LOST, "lost the connection to the relay"):
            self._sock.sendall(self._conn.send(plaintext))

    def receive(self, timeout: float | None) -> list[wire.Frame]:
        """Frames available within ``timeout`` (``[]`` on timeout); raise when closed."""
        with map_exceptions(_LOST, "lost the connection to the relay"):
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(READ_SIZE)
            except TimeoutError:
                return []  # nothing within the timeout: not an error
        if not data:
            raise ConnectionClosedError("the relay closed the connection")
        _events, plaintext, _reply = self._conn.receive_data(data)
        return self._decoder.feed(plaintext) if plaintext else []

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


# --- connecting, and saying why it failed ----------------------------------------------------


def _failure(cls: type[E], message: str, *, brief: str, hint: str) -> E:
    """``cls(message)`` with its few-word form for a status line and what to do."""
    return cls(message, brief=brief, hint=hint)


_CHECK_ADDRESS: Final = "check --relay HOST:PORT (or $SECURECHAT_RELAY)"


def _open_socket(address: str, host: str, port: int, timeout: float) -> socket.socket:
    """TCP connect; each failure becomes a RelayUnreachableError that names its cause."""
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as exc:
        message = (
            f"the relay at {address} refused the connection: nothing listens on port {port} there"
        )
        hint = f"is the relay running, and is the port right? {_CHECK_ADDRESS}"
        raise _failure(
            RelayUnreachableError, message, brief="connection refused", hint=hint
        ) from exc
    except socket.gaierror as exc:
        message = f"cannot find the relay's host {host!r}: {exc.strerror or exc}"
        hint = f"check the host name: {_CHECK_ADDRESS}"
        raise _failure(RelayUnreachableError, message, brief="unknown host", hint=hint) from exc
    except TimeoutError as exc:
        message = f"no answer from {address} within {timeout:g}s"
        hint = "is the host up? a firewall may drop the connection"
        raise _failure(RelayUnreachableError, message, brief="no answer", hint=hint) from exc
    except OSError as exc:
        message = f"cannot reach the relay at {address}: {exc.strerror or exc}"
        brief = (exc.strerror or "unreachable").lower()
        hint = f"check your network, and {_CHECK_ADDRESS}"
        raise _failure(RelayUnreachableError, message, brief=brief, hint=hint) from exc


def _handshake(
    sock: socket.socket, conn: noise.NoiseConnection, address: str, timeout: float
) -> None:
    """Send message 1, read until message 2 is processed (message 3 goes back at once)."""
    first = b""
    try:
        sock.sendall(conn.initiate())
        while not conn.complete:
            data = sock.recv(READ_SIZE)
            if not data:
                message = f"{address} closed the connection during the handshake"
                hint = (
                    "it is not a securechat relay, or a relay at its connection limit: "
                    f"{_CHECK_ADDRESS}, or try again later"
                )
                raise _failure(
                    RelayUnreachableError, message, brief="closed in the handshake", hint=hint
                )
            first = first or data[:_PREVIEW]
            try:
                _events, _plain, reply = conn.receive_data(data)
            except ProtocolError as exc:  # a changed key (TrustError) propagates as it is
                message = _not_a_relay(address, first)
                raise _failure(
                    NotARelayError, message, brief="not a securechat relay", hint=_CHECK_ADDRESS
                ) from exc
            if reply:
                sock.sendall(reply)
    except TimeoutError as exc:
        message = (
            f"{address} accepted the connection but gave no securechat handshake answer "
            f"within {timeout:g}s"
        )
        hint = f"is a securechat relay listening there (or is it overloaded)? {_CHECK_ADDRESS}"
        raise _failure(
            NotARelayError, message, brief="no securechat handshake answer", hint=hint
        ) from exc
    except OSError as exc:
        message = f"the connection to {address} failed during the handshake: {exc.strerror or exc}"
        raise _failure(
            RelayUnreachableError, message, brief="failed in the handshake", hint="try again"
        ) from exc


def _not_a_relay(address: str, first: bytes) -> str:
    """Say what answered instead when it is text (``HTTP/1.1 400 Bad Request``)."""
    text = first.split(b"\n", 1)[0].rstrip(b"\r")
    if text and all(32 <= b < 127 for b in text):
        return f"{address} is not a securechat relay: it answered {text.decode('ascii')!r}"
    return (
        f"{address} is not a securechat relay (or runs an incompatible version): its "
        "answer is not a securechat handshake"
    )


def _key_mismatch(
    address: str, remote: bytes, expected: bytes, known: KnownRelays, *, explicit: bytes | None
) -> RelayKeyChangedError:
    where = canonical_address(address)
    got, want = encoding.fingerprint(remote), encoding.fingerprint(expected)
    if explicit is not None:
        message = (
            f"the relay at {where} presented key {got}, not {want} from --relay-key: "
            "this may be an attack (or the wrong relay.pub)"
        )
        hint = "check with the relay's operator that this relay.pub is the current one"
        return _failure(RelayKeyChangedError, message, brief="WRONG RELAY KEY", hint=hint)
    message = (
        f"the relay at {where} presented key {got} but {want} is pinned (in "
        f"{known.path}); this may be an attack"
    )
    hint = (
        "if the relay's key really changed, get its new relay.pub from the operator and run: "
        f"securechat trust --relay {where} --relay-key relay.pub"
    )
    return _failure(RelayKeyChangedError, message, brief="RELAY KEY CHANGED", hint=hint)
