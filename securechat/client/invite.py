"""Running an invite over the relay, and recording the peer it verified (shell).

A small pump around :class:`securechat.core.invite.InviteSession`: connect, send what
the session returns, feed it the relay's invite frames, ping while waiting so the
relay's idle timeout does not end a long wait, stop at the deadline. Printing is
the caller's (``cli``, the demo): it gets the session's events as they happen.

Why the link uses a throwaway key, not the user's identity: the relay then
learns only that two connections met, not which two identities exchanged keys
(the identity lines travel sealed under the SPAKE2 keys); and an invite never
takes over the identity's mailbox (a running ``talk`` is not replaced, no stored
message is delivered to a connection that cannot decrypt it). The relay's key
is pinned and checked exactly as for every other command.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from securechat import files
from securechat.client import keystore
from securechat.client.link import RelayLink
from securechat.client.peers import KnownPeers
from securechat.client.relays import KnownRelays
from securechat.client.store import ClientStore
from securechat.core import dh, keys, wire
from securechat.core.invite import Event, InviteSession, PeerVerified, Role, State
from securechat.errors import (
    DeliveryTimeoutError,
    InviteFailedError,
    KeyFileError,
    PeerKeyChangedError,
    RelayError,
    UsageError,
)

# Chosen: the relay keeps an invite 10 minutes (--invite-ttl); waiting longer is pointless.
DEFAULT_TIMEOUT: Final = 600.0
PING_INTERVAL: Final = 20.0  # as the messenger: well inside the relay's idle timeout (300 s)
_INVITE_FRAMES: Final = (wire.InviteOpened, wire.InviteData, wire.InviteClosed)
Tap = Callable[[str, wire.Frame], None]  # ("sent" | "received", frame): the demo's view


def exchange(
    session: InviteSession,
    link: RelayLink,
    *,
    timeout: float,
    on_event: Callable[[Event], None],
    tap: Tap | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> keys.PublicIdentity:
    """Run ``session`` over ``link`` until the peer is verified; raise why it was not."""
    deadline = clock() + timeout
    next_ping = clock() + PING_INTERVAL
    _send(link, session.start(), tap)
    while True:
        now = clock()
        if now >= deadline:
            raise _timed_out(session, timeout)
        if now >= next_ping:
            link.send([wire.Ping(int(now))])
            next_ping = now + PING_INTERVAL
        for frame in link.receive(min(deadline, next_ping) - now):
            if isinstance(frame, wire.Error):
                raise _relay_error(frame)
            if not isinstance(frame, _INVITE_FRAMES):
                continue  # Synced, PrekeyCount, Pong: nothing to do with an invite
            if tap is not None:
                tap("received", frame)
            try:
                events, out = session.receive(frame)
            except InviteFailedError as exc:
                raise InviteFailedError(f"{exc}; {_failed_note(session)}") from exc
            _send(link, out, tap)
            for event in events:
                on_event(event)
                if isinstance(event, PeerVerified):
                    return event.peer


def _relay_error(frame: wire.Error) -> RelayError:
    if frame.code == wire.BAD_FRAME:  # a relay older than protocol 1.1 knows no invites
        return RelayError(
            f"the relay does not support invites (an older securechat relay?): {frame.reason}",
            hint="ask its operator to upgrade, or exchange NAME.pub files by hand",
        )
    return RelayError(
        f"the relay ended the invite: {frame.reason or wire.ERROR_NAMES[frame.code]}",
        hint="ask for a new code, or open a new invite with 'securechat invite'",
    )


def _send(link: RelayLink, frames: list[wire.Frame], tap: Tap | None) -> None:
    if tap is not None:
        for frame in frames:
            tap("sent", frame)
    link.send(frames)


def _failed_note(session: InviteSession) -> str:
    if session.role is Role.OPENER:
        return (
            "the invite is used up and nothing was recorded. Run 'securechat invite' again; "
            "if the other person did not mistype the code, someone may have tried to "
            "intercept it"
        )
    return "nothing was recorded: check the code with whoever gave it, and ask for a new one"


_NEW_CODE: Final = "ask for a new code"
_ANOTHER_NAME: Final = f"{_NEW_CODE} and run again with --as ANOTHER_NAME"


def _timed_out(session: InviteSession, timeout: float) -> DeliveryTimeoutError:
    if session.role is Role.OPENER and session.state is State.KEYED:
        return DeliveryTimeoutError(
            f"someone joined invite {session.code} but never proved the code within "
            f"{timeout:g}s; nothing was recorded",
            hint="run 'securechat invite' again for a new code; if your friend did not join, "
            "someone may have tried to intercept it",
        )
    if session.role is Role.OPENER:
        return DeliveryTimeoutError(
            f"nobody accepted invite {session.code} within {timeout:g}s; it is closed now",
            hint="run 'securechat invite' again for a new code",
        )
    return DeliveryTimeoutError(
        f"the inviter did not answer on invite {session.code} within {timeout:g}s (did they "
        "stop waiting?)",
        hint=_NEW_CODE,
    )


def connect(address: str, known: KnownRelays, pinned_key: bytes | None) -> RelayLink:
    """A link under a fresh throwaway key (see the module doc), the relay's pin checked."""
    return RelayLink.connect(address, os.urandom(dh.KEY_SIZE), known, pinned_key=pinned_key)


# --- recording the verified peer ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recorded:
    peer: keys.PublicIdentity  # under the name it was recorded as
    pub_path: Path
    new: bool  # False: this key was already trusted under this name


def record_peer(
    store: ClientStore, me: keys.PublicIdentity, peer: keys.PublicIdentity, *, name: str | None
) -> Recorded:
    """Trust ``peer`` (verified by the invite) in known peers and write ``NAME.pub``.

    Nothing is written if the name is taken by another key (in known peers or as
    ``NAME.pub`` in the key directory, which is what ``--peer NAME`` reads): the
    user picks another name with ``--as``.
    """
    chosen = name or peer.name
    if not chosen:
        raise UsageError(
            "the other side's key carries no name", hint=f"{_NEW_CODE} and run again with --as NAME"
        )
    peer = dataclasses.replace(peer, name=keys.check_name(chosen))
    if peer.same_keys(me):
        raise UsageError(
            "that was your own invite (the other side has your key); nothing was recorded"
        )
    pub_path = keystore.home() / f"{peer.name}{keystore.PUBLIC_SUFFIX}"
    known = KnownPeers(store)
    recorded = next((p for p in known.identities() if p.name == peer.name), None)
    on_disk = _public_in(pub_path)
    for other, where in ((recorded, "your known peers"), (on_disk, str(pub_path))):
        if other is not None and not other.same_keys(peer):
            raise PeerKeyChangedError(
                f"the other side calls itself {peer.name!r}, but {where} already has another "
                f"key under that name ({other.fingerprint}); nothing was recorded. Its verified "
                f"key is {peer.fingerprint}",
                hint=_ANOTHER_NAME,
            )
    if recorded is None:
        with store.transaction():
            known.trust(peer)
    if on_disk is None:
        files.write_new_file(pub_path, (peer.to_line() + "\n").encode(), mode=0o644)
    return Recorded(peer, pub_path, new=recorded is None)


def _public_in(path: Path) -> keys.PublicIdentity | None:
    """The key in ``path``, if there is a file; one that is not a key is not overwritten."""
    if not path.exists():
        return None
    try:
        return keystore.load_public(str(path))
    except KeyFileError as exc:
        raise UsageError(
            f"{path} exists but is not a usable key ({exc}); nothing was recorded",
            hint=_ANOTHER_NAME,
        ) from exc
