"""The one exception tree of securechat.

Every error a user can cause or meet derives from :class:`SecureChatError`.
``cli.main`` is the only place that turns them into a one-line message on
stderr and an exit code, so each class carries the code for its family.
Messages are written for people: they say what went wrong and what to do.

This module imports nothing else of ours so that every layer (core and shells)
can depend on it without creating cycles.
"""

from __future__ import annotations


class SecureChatError(Exception):
    """Base of every error securechat raises on purpose.

    The message says what went wrong; ``hint`` (optional, per instance) says what
    to do about it, and ``cli`` prints it on a line of its own
    (``securechat: hint: ...``), as age does. ``brief`` is an optional few-word
    form of the message for a status line (``connection refused``); the message
    itself stays the full sentence.
    """

    exit_code: int = 1
    brief: str | None = None
    hint: str | None = None

    def __init__(self, *args: object, hint: str | None = None, brief: str | None = None) -> None:
        super().__init__(*args)
        if hint is not None:
            self.hint = hint
        if brief is not None:
            self.brief = brief

    def with_note(self, note: str) -> SecureChatError:
        """The same class (so the same exit code), hint and brief, with ``note`` appended."""
        try:
            extended = type(self)(f"{self}; {note}")
        except TypeError:  # a subclass whose constructor takes other arguments
            return self
        extended.hint, extended.brief = self.hint, self.brief
        extended.__cause__ = self
        return extended

    def full_text(self) -> str:
        """Message and hint in one line, for where only one line fits (a talk screen notice)."""
        return f"{self} ({self.hint})" if self.hint else str(self)


class UsageError(SecureChatError):
    """The command line or the environment asks for something impossible."""

    exit_code = 2


# --- key files and identities -------------------------------------------------


class KeyFileError(SecureChatError):
    """A key file is missing, unreadable, malformed, or refused."""

    exit_code = 3


class KeyNotFoundError(KeyFileError):
    """No key file matches the given path or name."""


class KeyExistsError(KeyFileError):
    """Refusing to overwrite an existing key (use --force)."""


class KeyPermissionError(KeyFileError):
    """A private key file is readable by group or others (as OpenSSH refuses)."""


class CorruptKeyError(KeyFileError):
    """A key file or public-key line is truncated, corrupted or of the wrong type."""


class WrongPassphraseError(KeyFileError):
    """The passphrase does not decrypt the private key."""


class PassphraseRequiredError(KeyFileError):
    """A passphrase is needed but none can be asked for (no TTY, no env var)."""


# --- trust ----------------------------------------------------------------------


class TrustError(SecureChatError):
    """A key differs from the one recorded earlier (known peers / known relays)."""

    exit_code = 4


class PeerKeyChangedError(TrustError):
    """A peer's identity key changed since it was first recorded."""


class RelayKeyChangedError(TrustError):
    """The relay presented a key different from the pinned one."""


# --- protocol (bytes from the network or disk that break the rules) ----------------


class ProtocolError(SecureChatError):
    """Bytes received break the protocol: malformed, oversized, unexpected."""

    exit_code = 5


class FrameError(ProtocolError):
    """A client<->relay frame is malformed, oversized or of an unknown type."""


class FrameTooLargeError(FrameError):
    """A frame or payload exceeds its size limit (the relay answers TOO_LARGE)."""


class HandshakeError(ProtocolError):
    """The Noise handshake failed (bad message, wrong key, wrong state)."""


class InvalidPublicKeyError(ProtocolError):
    """A peer's X25519 key is malformed or low-order, or a DH output is all zero."""


class SessionError(ProtocolError):
    """An end-to-end session cannot process a message (bounds, state, format)."""


class AuthenticationError(ProtocolError):
    """One opaque error for every failure to authenticate or decrypt.

    Deliberately carries no detail about *why* (tag, header, key), so that it
    cannot serve as an oracle.
    """

    exit_code = 6

    def __init__(self, message: str = "message failed authentication") -> None:
        super().__init__(message)


class InviteFailedError(AuthenticationError):
    """An invite exchange did not authenticate: a wrong code, or someone tampered.

    One message for every cause (a wrong word, a flipped byte, a message out of
    order), as for any other authentication failure.
    """

    def __init__(self, message: str = "wrong code, or someone tampered with the exchange") -> None:
        super().__init__(message)


class ReplayError(AuthenticationError):
    """A ciphertext was seen before (replay of an old message)."""

    def __init__(self, message: str = "replayed message rejected") -> None:
        super().__init__(message)


# --- transport, relay, local storage -------------------------------------------------


class TransportError(SecureChatError):
    """The connection to the relay failed or was closed."""

    exit_code = 7


class RelayUnreachableError(TransportError):
    """The relay cannot be reached at the given address."""


class NotARelayError(RelayUnreachableError):
    """Something answers at the address, but not the securechat handshake (e.g. HTTP)."""


class ConnectionClosedError(TransportError):
    """The peer closed the connection."""


class RelayError(SecureChatError):
    """The relay answered with an explicit error (quota, rate, refused)."""

    exit_code = 8


class InviteClosedError(RelayError):
    """The relay ended or refused an invite: unknown, expired or used code, peer gone."""


class StorageError(SecureChatError):
    """Local or relay storage failed: disk full, read-only, corrupt file."""

    exit_code = 9


class InUseError(SecureChatError):
    """A port or a data folder is held by another process (another relay?)."""

    exit_code = 12


class DeliveryTimeoutError(SecureChatError):
    """Something did not happen in time (acknowledgement, handshake)."""

    exit_code = 10


class InternalError(SecureChatError):
    """A bug: an unexpected exception where only our errors were expected.

    Raised in place of a thread dying silently, so the command still ends with a
    clear message and a non-zero exit code.
    """

    exit_code = 11
