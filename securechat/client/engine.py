"""What a front-end (talk, send, receive) needs of the engine that drives an identity.

Two things provide it: the :class:`~securechat.client.messenger.Messenger`
itself (in-process, when this command holds the identity), and
:class:`securechat.daemon.remote.RemoteMessenger` (the same calls made through
the identity's daemon, when one runs). The front-ends are written against this
protocol only, so they behave the same either way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

from securechat.client.peers import Conversation
from securechat.core import keys
from securechat.errors import PeerKeyChangedError, SecureChatError


class Flag(Protocol):
    """``threading.Event``'s reading half."""

    def wait(self, timeout: float | None = None) -> bool: ...

    def is_set(self) -> bool: ...


class HasPublic(Protocol):
    @property
    def public(self) -> keys.PublicIdentity: ...

    @property
    def name(self) -> str: ...


class Engine(Protocol):
    """See the module docstring."""

    @property
    def identity(self) -> HasPublic: ...

    @property
    def relay_address(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def fatal(self) -> SecureChatError | None: ...

    @property
    def last_connect_error(self) -> SecureChatError | None: ...

    @property
    def refused(self) -> OrderedDict[bytes, str]: ...

    @property
    def synced(self) -> Flag: ...

    def send_text(self, conv: Conversation, text: str) -> bytes: ...

    def check_peers(
        self, peers: Iterable[keys.PublicIdentity]
    ) -> dict[str, PeerKeyChangedError]: ...

    def trust(self, peer: keys.PublicIdentity) -> bool: ...

    def pending(self) -> int: ...

    def history(self, conv: str, limit: int) -> list[dict[str, object]]: ...

    def wait_all_accepted(self, timeout: float) -> bool: ...
