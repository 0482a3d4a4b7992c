"""The ``securechat`` command line: parsing, dispatch, and the one place errors are printed.

Every command function returns an exit code or raises a
:class:`~securechat.errors.SecureChatError`; :func:`main` turns those into
``securechat: <message>`` on stderr and the error family's exit code. A
traceback is printed only for a real bug (an exception outside our tree).
Heavy modules (the relay, the chat UI) are imported only by the commands that
need them, so ``securechat keygen`` starts fast.

Exit codes (one table, documented in docs/operations.md): 0 success, 1 an
unexpected failure (also: our output was closed), 2 usage, 3 key file, 4 trust,
5 protocol, 6 authentication, 7 transport (relay refused, unreachable, not a
relay), 8 relay refusal, 9 storage, 10 timeout, 11 internal error, 130
interrupted. Each class of :mod:`securechat.errors` carries its code.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from securechat import __version__, files
from securechat.client import keystore
from securechat.core import keys
from securechat.errors import KeyExistsError, SecureChatError, UsageError

if TYPE_CHECKING:  # imported by the commands that use it (spake2 takes 30 ms to load)
    from securechat.core import invite

Handler = Callable[[argparse.Namespace], int]
EXIT_INTERRUPTED: Final = 130
EXIT_OTHER: Final = 1  # our output was closed (e.g. piped into `head`)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns exit codes."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


# --- identity commands -------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    name = keys.check_name(args.name)
    identity = keys.generate_identity(name, os.urandom(keys.SEED_SIZE))
    directory = keystore.ensure_home()
    private_path = directory / f"{name}{keystore.PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{keystore.PUBLIC_SUFFIX}"
    replacing = private_path.exists()
    for path in (private_path, public_path):
        if path.exists() and not args.force:
            raise KeyExistsError(f"{path} already exists; use --force to overwrite it")
    text = _private_key_text(identity, private_path, encrypt=not args.no_passphrase)
    # The old state is sealed under the old key: the new key could never open it.
    # Hold the identity's lock (no client may be running) while the key is replaced
    # and the state moved aside, so nothing opens the old state with the new key.
    has_state = (directory / f"{name}{keystore.STATE_SUFFIX}").exists()
    with keystore.identity_lock(name) if has_state else contextlib.nullcontext():
        files.write_new_file(private_path, text.encode(), mode=0o600, force=args.force)
        line = identity.public.to_line() + "\n"
        files.write_new_file(public_path, line.encode(), mode=0o644, force=args.force)
        archived = keystore.archive_state(name) if has_state else None
    print(f"wrote {private_path} (private, keep it secret) and {public_path} (share this)")
    print(f"fingerprint {identity.public.fingerprint}")
    if archived is not None:
        print(
            f"moved the old identity's state (sessions, history, known peers) to {archived}; "
            "it opens only with the old key"
        )
    if replacing:
        print(
            f"this is a NEW key for {name}: peers will see that {name}'s key changed. Send them "
            f"the new {public_path}; they check it (securechat safety-number) and accept it "
            f"with 'securechat trust {name}'"
        )
    return 0


def _private_key_text(identity: keys.Identity, path: Path, *, encrypt: bool) -> str:
    if not encrypt:
        print(
            f"securechat: warning: {path} is NOT encrypted; anyone who can read it "
            "can read your messages",
            file=sys.stderr,
        )
        return keys.encode_private_key(identity, None, None)
    passphrase = keystore.passphrase_from_env_or_tty(f"Passphrase for {path}: ", confirm=True)
    params = keys.KdfParams(salt=os.urandom(keys.SALT_SIZE), nonce=os.urandom(keys.NONCE_SIZE))
    return keys.encode_private_key(identity, passphrase, params)


def cmd_fingerprint(args: argparse.Namespace) -> int:
    public = keystore.load_public(args.key)
    print(f"{public.fingerprint}  {public.name}".rstrip())
    return 0


def cmd_safety_number(args: argparse.Namespace) -> int:
    ours = _own_public(args.key)
    peer = keystore.load_public(args.peer, peer=True)
    print(f"safety number for {ours.name} and {peer.name}:")
    print(keys.safety_number(ours, peer))
    return 0


def _own_public(arg: str | None) -> keys.PublicIdentity:
    """Our public identity without asking for the passphrase (it is in the key file)."""
    if arg:
        path = keystore.resolve(arg, keystore.PRIVATE_SUFFIX)
    else:
        path = keystore.default_private_path()
    return keystore.load_public(str(path))


# --- invites: exchanging keys with a one-time code ----------------------------------------


def cmd_invite(args: argparse.Namespace) -> int:
    return _run_invite(args, None)


def cmd_accept(args: argparse.Namespace) -> int:
    from securechat.core.invite import parse_code

    return _run_invite(args, parse_code(args.code))  # a typo is caught here, costing nothing


def _run_invite(args: argparse.Namespace, code: invite.Code | None) -> int:
    """Open (``code`` None) or accept an invite; record the verified peer; say how to talk."""
    from securechat.client import app
    from securechat.client import invite as client_invite
    from securechat.client.link import read_relay_key_file
    from securechat.core import invite

    if not args.timeout > 0:
        raise UsageError("--timeout must be a positive number of seconds")
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
        known = app.known_relays(lambda text: _note(text))
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
        raise UsageError(f"--as: {exc}") from exc


def _show_invite_event(event: invite.Event, args: argparse.Namespace, address: str) -> None:
    from securechat.core import invite

    if isinstance(event, invite.CodeReady):
        minutes = f"{args.timeout / 60:g} minute{'s' if args.timeout != 60 else ''}"
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
    from securechat.client.app import DEFAULT_RELAY
    from securechat.client.link import canonical_address

    same = canonical_address(address) == canonical_address(DEFAULT_RELAY)
    return "" if same else f" --relay {address}"


def _key_flag(args: argparse.Namespace) -> str:
    return f" --key {args.key}" if args.key else ""


def _note(text: str) -> None:
    print(f"securechat: {text}", file=sys.stderr, flush=True)


# --- the parser ----------------------------------------------------------------------------


def _add_identity_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "keygen",
        help="create an identity NAME.key / NAME.pub in the key directory",
        description=(
            "Create an identity (X25519 + Ed25519 key pairs) as NAME.key (private, 0600, "
            "encrypted with a passphrase: prompted twice on a terminal, or taken from "
            "$SECURECHAT_PASSPHRASE) and NAME.pub (one line to share). The key directory is "
            "$SECURECHAT_HOME, default ./keys. Prints the fingerprint."
        ),
    )
    p.add_argument("name", metavar="NAME", help="identity name (letters, digits, _ - .)")
    p.add_argument("--no-passphrase", action="store_true", help="store the key unencrypted")
    p.add_argument("--force", action="store_true", help="overwrite an existing key of that name")
    p.set_defaults(handler=cmd_keygen)

    p = sub.add_parser(
        "fingerprint",
        help="print a key's fingerprint",
        description="Print the fingerprint of a .pub or .key file, or of NAME in the key dir.",
    )
    p.add_argument("key", metavar="FILE|NAME")
    p.set_defaults(handler=cmd_fingerprint)

    p = sub.add_parser(
        "safety-number",
        help="print the 60-digit safety number of you and a peer",
        description=(
            "Print the 60-digit safety number for your identity and a peer's: the same on both "
            "sides. Compare it out of band (in person, by phone) to rule out a swapped key."
        ),
    )
    p.add_argument("--peer", required=True, metavar="FILE|NAME", help="the peer's .pub or name")
    p.add_argument("--key", metavar="FILE|NAME", help="your identity (default: the only key)")
    p.set_defaults(handler=cmd_safety_number)


def _add_relay_command(sub: argparse._SubParsersAction[_Parser]) -> None:
    from securechat.relay.server import add_arguments, run_relay

    p = sub.add_parser(
        "relay",
        help="run the relay that routes encrypted frames between clients",
        description=(
            "Run the relay: a TCP server that authenticates clients (Noise XX), routes opaque "
            "end-to-end encrypted frames, and stores them for offline recipients until they "
            "acknowledge. It holds no key that can read a message."
        ),
    )
    add_arguments(p)
    p.set_defaults(handler=run_relay)


def _add_client_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    from securechat.cli import demo
    from securechat.ui import script, talk

    p = sub.add_parser(
        "talk",
        help="chat with peers (interactive on a terminal, line by line on a pipe)",
        description=(
            "Open a conversation with --peer (several --peer: a group). On a terminal: an "
            "interactive chat (/help lists commands). On a pipe: each input line is sent, "
            "received messages are printed as 'NAME: text' (or JSON lines), and at end of "
            "input it waits until the relay accepted everything."
        ),
    )
    talk.add_arguments(p)
    p.set_defaults(handler=talk.run)
    script.register(sub)  # type: ignore[arg-type]
    _add_invite_commands(sub, script.add_client_arguments)
    demo.register(sub)  # type: ignore[arg-type]


def _add_invite_commands(
    sub: argparse._SubParsersAction[_Parser], client_arguments: Callable[..., None]
) -> None:
    from securechat.client.invite import DEFAULT_TIMEOUT

    p = sub.add_parser(
        "invite",
        help="exchange keys with someone: print a one-time code for 'securechat accept'",
        description=(
            "Print a short one-time code (e.g. 7-tiger-universe) and wait for the other person "
            "to run 'securechat accept CODE' against the same relay. The two clients run "
            "SPAKE2 under the code through the relay and exchange their public keys, verified: "
            "each records the other as a trusted peer (and NAME.pub in the key directory), so "
            "'securechat talk --peer NAME' works at once. The relay learns neither the code nor "
            "the keys. A wrong code fails on both sides and uses the invite up."
        ),
    )
    _invite_arguments(p, client_arguments, DEFAULT_TIMEOUT)
    p.set_defaults(handler=cmd_invite)

    p = sub.add_parser(
        "accept",
        help="accept an invite: exchange keys with whoever gave you CODE",
        description=(
            "Join the invite CODE (from 'securechat invite') and exchange public keys with its "
            "inviter, verified by the code: each records the other as a trusted peer. The code "
            "works once; a wrong or mistyped one fails clearly (a mistyped word before "
            "connecting)."
        ),
    )
    p.add_argument("code", metavar="CODE", help="the invite code, e.g. 7-tiger-universe")
    _invite_arguments(p, client_arguments, DEFAULT_TIMEOUT)
    p.set_defaults(handler=cmd_accept)


def _invite_arguments(
    p: argparse.ArgumentParser, client_arguments: Callable[..., None], timeout: float
) -> None:
    client_arguments(p, peers=False)
    p.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=f"how long to wait for the other side (default {timeout:g})",
    )
    p.add_argument(
        "--as",
        dest="as_name",
        metavar="NAME",
        help="record the other side under NAME instead of the name it gives",
    )


def build_parser() -> _Parser:
    parser = _Parser(
        prog="securechat",
        description=(
            "End-to-end encrypted chat for the terminal, through a relay you do not have to trust."
        ),
    )
    parser.add_argument("--version", action="version", version=f"securechat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _add_identity_commands(sub)
    _add_relay_command(sub)
    _add_client_commands(sub)
    return parser


def disable_core_dumps() -> None:
    """No core file may hold our keys: a crash must not write them to disk (soft and hard 0)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform, or already lower: nothing to give up


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code. The only place errors are printed."""
    disable_core_dumps()
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        return handler(args)
    except SecureChatError as exc:
        print(f"securechat: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("securechat: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OTHER


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
