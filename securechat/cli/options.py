"""Options shared by the client commands (``talk``, ``send``, ``receive``, ``invite``...)."""

from __future__ import annotations

import argparse

from securechat.client.app import DEFAULT_RELAY, ENV_RELAY
from securechat.client.relays import DEFAULT_PORT
from securechat.errors import UsageError


def add_client_arguments(
    p: argparse.ArgumentParser, *, peers: str | None = "recipient (repeat for a group)"
) -> None:
    """``--peer`` (required, repeatable; ``peers`` is its help, None for none), ``--key``,
    ``--relay`` and ``--relay-key``."""
    if peers is not None:
        p.add_argument("--peer", action="append", required=True, metavar="NAME|FILE", help=peers)
    p.add_argument("--key", metavar="NAME|FILE", help="your identity (default: the only key)")
    p.add_argument(
        "--relay",
        metavar="HOST[:PORT]",
        help=f"relay address, port {DEFAULT_PORT} if none (default: ${ENV_RELAY} or "
        f"{DEFAULT_RELAY})",
    )
    p.add_argument(
        "--relay-key",
        metavar="FILE",
        help="the relay's relay.pub: pins its key in known_relays (replacing an older pin "
        "once the relay proves it holds this key)",
    )


def add_timeout(p: argparse.ArgumentParser, default: float, help_text: str) -> None:
    p.add_argument("--timeout", type=float, default=default, metavar="SECONDS", help=help_text)


def positive_timeout(value: float | None) -> float:
    """``--timeout`` checked: a positive number of seconds."""
    if value is None or not value > 0:
        raise UsageError(
            "--timeout must be a positive number of seconds", hint="for example --timeout 30"
        )
    return value
