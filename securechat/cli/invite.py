"""``securechat invite`` and ``accept``: exchanging keys with a one-time code (shell).

The exchange itself is :mod:`securechat.client.invite` (a pump around the
sans-I/O :class:`~securechat.core.invite.InviteSession`); this module parses the
options, prints the code and what happened, and records the verified peer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from securechat.cli.options import add_client_arguments, add_timeout, positive_timeout
from securechat.client import app, keystore
from securechat.client import invite as client_invite
from securechat.client.relays import canonical_address, read_relay_key_file
from securechat.core import invite, keys
from securechat.errors import SecureChatError, UsageError


def configure(command: str, p: argparse.ArgumentParser) -> None:
    if command == "invite":
        p.description = (
            "Print a short one-time code (e.g. 7-tiger-universe) and wait for the other person "
            "to run 'securechat accept CODE' against the same relay. The two clients run "
            "SPAKE2 under the code through the relay and exchange their public keys, verified: "
            "each records the other as a trusted peer (and NAME.pub in the key directory), so "
            "'securechat talk --peer NAME' works at once. The relay learns neither the code nor "
            "the keys. A wrong code fails on both sides and uses the invite up."
        )
        p.set_defaults(handler=cmd_invite)
    else:
        assert command == "accept"
        p.description = (
            "Join the invite CODE (from 'securechat invite') and exchange public keys with its "
            "inviter, verified by the code: each records the other as a trusted peer. The code "
            "works once; a wrong or mistyped one fails clearly (a mistyped word before "
            "connecting)."
        )
        p.add_argument("code", metavar="CODE", help="the invite code, e.g. 7-tiger-universe")
        p.set_defaults(handler=cmd_accept)
    add_client_arguments(p, peers=None)
    timeout = client_invite.DEFAULT_TIMEOUT
    add_timeout(p, timeout, f"how long to wait for the other side (default {timeout:g})")
    p.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="record the other side under NAME instead of the name it gives",
    )


def cmd_invite(args: argparse.Namespace) -> int:
    return _run_invite(args, None)


def cmd_accept(args: argparse.Namespace) -> int:
    return _run_invite(args, invite.parse_code(args.code))  # a typo is caught here, at no cost


def _run_invite(args: argparse.Namespace, code: invite.Code | None) -> int:
    """Open (``code`` None) or accept an invite; record the verified peer; say how to talk."""
    positive_timeout(args.timeout)
    as_name = _as_name(args.as_name)
    address = app.relay_address(args.relay)
    pinned = read_relay_key_file(Path(args.relay_key)) if args.relay_key else None
    identity = keystore.load_identity(args.key)  # the passphrase now, not after the exchange
    store = app.open_store(identity)  # and the identity's lock: fails now if talk runs
    try:
        own = identity.public
        session = (
            invite.InviteSession.opener(own, os.urandom)
            if code is None
            else invite.InviteSession.joiner(code, own, os.urandom)
        )
        known = app.known_relays(_note)
        link = client_invite.connect(address, known, pinned)
        try:
            peer = client_invite.exchange(
                session,
                link,
                timeout=args.timeout,
                on_event=lambda event: _show_invite_event(event, args, address),
            )
        finally:
            link.close()
        recorded = client_invite.record_peer(store, own, peer, name=as_name)
    finally:
        store.close()
    who = recorded.peer
    state = "is now a trusted peer" if recorded.new else "was already trusted with this key"
    print(
        f"verified: {who.name} (fingerprint {who.fingerprint}) {state}; "
        f"its key is in {recorded.pub_path}"
    )
    print(f"talk with: securechat talk{_key_flag(args)}{_relay_flag(address)} --peer {who.name}")
    return 0


def _as_name(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return keys.check_name(value)
    except SecureChatError as exc:
        raise UsageError(f"--as: {exc}", hint="letters, digits, '_', '-' and '.' only") from exc


def _duration(seconds: float) -> str:
    """'10 minutes', '1 minute', '90 seconds': whole minutes as minutes, else seconds."""
    if seconds >= 60 and seconds % 60 == 0:
        count = int(seconds // 60)
        return f"{count} minute{'s' if count != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


def _show_invite_event(event: invite.Event, args: argparse.Namespace, address: str) -> None:
    if isinstance(event, invite.CodeReady):
        minutes = _duration(args.timeout)
        print(
            f"invite code: {event.code}  (the other person runs: securechat accept "
            f"{event.code}{_relay_flag(address)})",
            flush=True,
        )
        _note(f"waiting up to {minutes} for them to accept; the code works once (Ctrl-C cancels)")
    elif isinstance(event, invite.PeerJoined):
        _note("someone joined the invite; checking that they have the right code...")


def _relay_flag(address: str) -> str:
    """``--relay ADDR`` unless it is the default relay (the other side must use the same)."""
    same = canonical_address(address) == canonical_address(app.DEFAULT_RELAY)
    return "" if same else f" --relay {address}"


def _key_flag(args: argparse.Namespace) -> str:
    return f" --key {args.key}" if args.key else ""


def _note(text: str) -> None:
    print(f"securechat: {text}", file=sys.stderr, flush=True)
