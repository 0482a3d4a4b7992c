"""``securechat relay``: the relay's command (its options and loop live in ``relay.server``).

Loaded only when the relay runs: no client command pays for the relay, SQLite or
the selector loop at start-up.
"""

from __future__ import annotations

import argparse

from securechat.relay.server import add_arguments, run_relay


def configure(command: str, p: argparse.ArgumentParser) -> None:
    assert command == "relay"
    p.description = (
        "Run the relay: a TCP server that authenticates clients (Noise XX), routes opaque "
        "end-to-end encrypted frames, and stores them for offline recipients until they "
        "acknowledge. It holds no key that can read a message."
    )
    add_arguments(p)
    p.set_defaults(handler=run_relay)
