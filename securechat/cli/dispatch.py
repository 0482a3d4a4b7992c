"""The ``securechat`` command line: one table of commands, and the one place errors are printed.

Every command function returns an exit code or raises a
:class:`~securechat.errors.SecureChatError`; :func:`main` turns those into
``securechat: <what went wrong>`` on stderr, then ``securechat: hint: <what to
do>`` when the error carries a hint (as age does), and returns the error
family's exit code. A traceback is printed only for a real bug (an exception
outside our tree).

Start-up is paid by every command, so this module imports almost nothing: the
table below names each command's module and one-line help, and only the module
of the command being run is imported (to add its arguments and run it).
``securechat --help`` and ``securechat keygen`` never load the relay, SQLite,
the messenger or the chat screen.

Why "dispatch" and not "main": the package exports the function ``main``, and a
submodule of the same name would be shadowed by it.

Exit codes (one table, documented in docs/operations.md): 0 success, 1 an
unexpected failure (also: our output was closed), 2 usage, 3 key file, 4 trust,
5 protocol, 6 authentication, 7 transport (relay refused, unreachable, not a
relay), 8 relay refusal, 9 storage, 10 timeout, 11 internal error, 12 in use,
130 interrupted. Each class of :mod:`securechat.errors` carries its code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from securechat import __version__
from securechat.errors import SecureChatError, UsageError

Handler = Callable[[argparse.Namespace], int]
EXIT_INTERRUPTED: Final = 130
EXIT_OTHER: Final = 1  # our output was closed (e.g. piped into `head`)
PROG: Final = "securechat"


@dataclass(frozen=True, slots=True)
class Command:
    """A command's module under ``securechat.cli`` (imported when it runs) and its help line."""

    module: str
    help: str


# The order is the order of ``securechat --help``.
COMMANDS: Final = {
    "keygen": Command("identity", "create an identity NAME.key / NAME.pub in the key directory"),
    "fingerprint": Command("identity", "print a key's fingerprint"),
    "safety-number": Command("identity", "print the 60-digit safety number of you and a peer"),
    "relay": Command("relay", "run the relay that routes encrypted frames between clients"),
    "talk": Command("chat", "chat with peers (interactive on a terminal, line by line on a pipe)"),
    "send": Command("scripts", "send messages and exit once the relay accepted them"),
    "receive": Command("scripts", "print waiting and new messages, then exit"),
    "history": Command("scripts", "print the local history of a conversation"),
    "trust": Command("scripts", "accept a peer's (changed) key, or pin a relay's key"),
    "invite": Command(
        "invite", "exchange keys with someone: print a one-time code for 'securechat accept'"
    ),
    "accept": Command("invite", "accept an invite: exchange keys with whoever gave you CODE"),
    "daemon": Command("daemon", "run one long-lived client for an identity, serving JSON-RPC"),
    "web": Command("web", "open the chat in a browser (127.0.0.1, a token in the URL)"),
    "demo": Command("demo", "run a short conversation on an embedded relay"),
}


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns exit codes."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, hint=f"see '{self.prog} --help'")


def build_parser(argv: Sequence[str] = ()) -> Parser:
    """The parser, with the arguments of the command named in ``argv`` (if any) added.

    Top-level options take no value, so the first word not starting with ``-``
    is the command. The others get their name and help line only: enough for
    ``securechat --help``, and their modules stay unloaded.
    """
    parser = Parser(
        prog=PROG,
        description=(
            "End-to-end encrypted chat for the terminal, through a relay you do not have to trust."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        if name == chosen:
            module = importlib.import_module(f"securechat.cli.{command.module}")
            module.configure(name, p)
    return parser


def disable_core_dumps() -> None:
    """No core file may hold our keys: a crash must not write them to disk (soft and hard 0)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform, or already lower: nothing to give up


def report(exc: SecureChatError) -> None:
    """The error on stderr: what went wrong, then (its own line) what to do."""
    print(f"{PROG}: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"{PROG}: hint: {exc.hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code. The only place errors are printed."""
    disable_core_dumps()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(words).parse_args(words)
        handler: Handler = args.handler
        return handler(args)
    except SecureChatError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and closed: not an error worth a traceback.
        sys.stderr.close()
        return EXIT_OTHER


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
