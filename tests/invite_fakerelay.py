"""A malicious relay double for invites: the real protocol (Noise XX + frames), a rendezvous
that pairs an opener with its joiner, and a hook through which every InviteData passes.

A TCP proxy cannot touch what travels inside the Noise link, so the double terminates
it, as a relay that is not honest would. ``tamper(from_opener, payload)`` gets every
InviteData (the kind is ``payload[1]``: 1 a PAKE message, 2 a sealed public line) and
returns what to forward instead (or None to drop it).

One thread per connection: a test double for two clients.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from securechat.core import wire

from noise_server import NoiseServerDouble, PeerConn

Tamper = Callable[[bool, bytes], bytes | None]


class TamperingRelay(NoiseServerDouble):
    def __init__(self, tamper: Tamper) -> None:
        self.tamper = tamper
        self.seen: list[bytes] = []  # every InviteData payload as the clients sent it
        self._lock = threading.Lock()
        self._openers: dict[int, PeerConn] = {}
        self._pairs: dict[int, tuple[PeerConn, PeerConn]] = {}
        self._next = 1
        super().__init__()  # listening starts last: the tables above exist

    def _on_connect(self, c: PeerConn) -> None:
        c.send(wire.Synced(), wire.PrekeyCount(0))

    def _on_close(self, c: PeerConn) -> None:
        """As the relay does: the other party of a pair is told (PEER_LEFT)."""
        with self._lock:
            gone = [(p, pair) for p, pair in self._pairs.items() if c in pair]
            for plate, _ in gone:
                del self._pairs[plate]
        for plate, (opener, joiner) in gone:
            (joiner if c is opener else opener).send(
                wire.InviteClosed(plate, wire.INVITE_PEER_LEFT)
            )

    def _on_frame(self, c: PeerConn, frame: wire.Frame) -> None:
        if isinstance(frame, wire.Ping):
            c.send(wire.Pong(frame.nonce))
        elif isinstance(frame, wire.InviteOpen):
            with self._lock:
                plate, self._next = self._next, self._next + 1
                self._openers[plate] = c
            c.send(wire.InviteOpened(plate))
        elif isinstance(frame, wire.InviteJoin):
            with self._lock:
                opener = self._openers.pop(frame.nameplate, None)
                if opener is not None:
                    self._pairs[frame.nameplate] = (opener, c)
            if opener is None:
                c.send(wire.InviteClosed(frame.nameplate, wire.INVITE_NO_SUCH))
        elif isinstance(frame, wire.InviteData):
            with self._lock:
                pair = self._pairs.get(frame.nameplate)
                self.seen.append(frame.payload)
            if pair is None:
                return
            from_opener = c is pair[0]
            other = pair[1] if from_opener else pair[0]
            payload = self.tamper(from_opener, frame.payload)
            if payload is not None:
                other.send(wire.InviteData(frame.nameplate, payload))
