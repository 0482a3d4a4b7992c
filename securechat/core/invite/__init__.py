"""Invites: exchanging identity keys with a short one-time code (core, sans-I/O).

``securechat invite`` shows a code such as ``7-tiger-universe``; ``securechat
accept 7-tiger-universe`` on the other side. The two clients run SPAKE2 through
the relay under the code and exchange their public identity lines sealed under
the agreed keys, so each ends up with the other's key, verified, without a file
changing hands. ``words`` makes and reads codes; ``session`` is the exchange's
state machine (``docs/protocol.md`` section 7). The network pump around it is
``securechat/client/invite.py``.
"""

from securechat.core.invite.session import (
    CodeReady,
    Event,
    InviteSession,
    PeerJoined,
    PeerVerified,
    Role,
    State,
)
from securechat.core.invite.words import Code, make_code, parse_code

__all__ = [
    "Code",
    "CodeReady",
    "Event",
    "InviteSession",
    "PeerJoined",
    "PeerVerified",
    "Role",
    "State",
    "make_code",
    "parse_code",
]
