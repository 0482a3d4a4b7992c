"""Sending: seal, persist, queue; or hold a message until its peers' bundles are in (no I/O).

Part of the client session. Never lose a word: a message is sealed for every
member, then in ONE transaction the advanced ratchets are saved, the exact frame
is queued in the outbox and the history line is recorded; only then is the
frame handed to the pump. An outbox entry leaves only on the relay's
``Accepted`` (:mod:`securechat.client.receipts`).

Never a silent downgrade: a message to a peer we have no session with is
*held* (its text sealed at rest, not yet end to end) while its bundle is asked
for (:mod:`securechat.client.prekeys`), and sealed once every bundle is in.
Held messages go out oldest first; a conversation's later messages wait behind
its oldest held one, so its order is kept. The user is told why a message
waits (offline, no answer, a relay that withholds or forges prekeys) once per
conversation; a message that only waits for an answer on its way is not news.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from securechat.client.e2e_store import E2EStore
from securechat.client.events import NoticeEvent, Output, Status
from securechat.client.peers import Conversation
from securechat.client.prekeys import PrekeyFetches
from securechat.client.receipts import Receipts
from securechat.client.store import ClientStore
from securechat.core import envelope, keys, wire, x3dh
from securechat.errors import UsageError

Rng = Callable[[int], bytes]
Tap = Callable[[str, wire.Frame], None]


def frame_size(peers: int, padded: int) -> int:
    """The largest SendMulti a message padded to ``padded`` bytes can make (all INITIAL)."""
    copy = envelope.MAX_ENVELOPE_SIZE - envelope.PAD_BUCKETS[-1] + padded
    return wire.HEADER_SIZE + wire.ID_SIZE + 2 + peers * (wire.MAILBOX_SIZE + 4 + copy)


def check_frame_size(conv: Conversation, content: envelope.Content, padded: int) -> None:
    """Refuse, before sealing, a group message whose SendMulti would exceed the frame limit.

    One frame carries every member's copy: 63 copies of the largest padding bucket
    do not fit, 63 of the next smaller one do. Say how much text would.
    """
    if frame_size(len(conv.peers), padded) <= wire.MAX_FRAME:
        return
    empty = envelope.Content(content.msg_id, content.sent_ms, "", content.group)
    overhead = len(envelope.unpad(envelope.encode_content(empty)))
    fits = [b for b in envelope.PAD_BUCKETS if frame_size(len(conv.peers), b) <= wire.MAX_FRAME]
    most = max(fits[-1] - 1 - overhead, 0) if fits else 0
    raise UsageError(
        f"message too long for a group of {len(conv.peers) + 1}: one frame carries every "
        f"member's copy, so at most {most} bytes of text fit",
        hint="shorten it, or send it in parts",
    )


class Outgoing:
    """See the module docstring. ``online`` is set by the session as the link comes and goes."""

    def __init__(
        self,
        identity: keys.Identity,
        store: ClientStore,
        e2e_store: E2EStore,
        receipts: Receipts,
        rng: Rng,
        *,
        keep_history: bool,
        tap: Tap | None,
    ) -> None:
        self._me = identity
        self._store = store
        self._e2e = e2e_store
        self._receipts = receipts
        self._rng = rng
        self._keep_history = keep_history
        self._tap = tap
        self.fetches = PrekeyFetches(store)
        self.online = False
        self._noticed: set[str] = set()  # conversations told why they wait

    def send_text(self, conv: Conversation, text: str, now_ms: int, out: Output) -> bytes:
        """Seal and queue (or hold) one message; return its id."""
        content = envelope.Content(self._rng(wire.ID_SIZE), now_ms, text, conv.group)
        padded = len(envelope.encode_content(content))  # too long or malformed: refused here
        check_frame_size(conv, content, padded)
        behind = self._store.held_count(conv.conv_id) > 0
        missing = [p for p in conv.peers if not self._e2e.state.has_session(p)]
        if not behind and not missing:
            self._seal_and_queue(conv, content, {}, now_ms, out, from_held=False)
            return content.msg_id
        self._hold(conv, content)
        if not self.online:
            who = (missing or list(conv.peers))[0].name
            reason = (
                "earlier messages to them are waiting"
                if behind
                else f"offline: the message to {who} waits for the relay"
            )
            self._notice(conv, reason, out)
        self.release(now_ms, out)
        return content.msg_id

    def _hold(self, conv: Conversation, content: envelope.Content) -> None:
        """Keep the text, sealed at rest, until its peers' bundles are in."""
        record = {
            "peers": [p.to_line() for p in conv.peers],
            "msg_id": content.msg_id.hex(),
            "sent_ms": content.sent_ms,
            "text": content.text,
        }
        with self._store.transaction():
            self._store.held_add(conv.conv_id, content.msg_id, record)
            if self._keep_history:
                self._store.history_add(
                    conv.conv_id, content.msg_id, Status.PENDING, self._history(conv, content)
                )

    def release(self, now_ms: int, out: Output) -> None:
        """Seal the held messages whose bundles are in; ask for the bundles still missing."""
        if not self.online:
            return
        waiting_convs: set[str] = set()
        wanted: set[bytes] = set()
        for record in self._store.held():
            peers = [keys.PublicIdentity.from_line(line) for line in record["peers"]]
            conv = Conversation.with_peers(self._me.public, peers)
            if conv.conv_id in waiting_convs:
                continue  # behind an older message of its conversation
            missing = [p for p in conv.peers if not self._e2e.state.has_session(p)]
            wanted |= {p.dh for p in missing}
            blocked = self.fetches.blocked(missing)
            if blocked is not None:
                waiting_convs.add(conv.conv_id)
                if blocked.reason:
                    self._notice(conv, blocked.reason, out)
                out.frames += self.fetches.ask(blocked.ask, now_ms)
                continue
            bundles = {p.dh: self.fetches.take(p) for p in missing}
            content = envelope.Content(
                bytes.fromhex(record["msg_id"]), int(record["sent_ms"]), record["text"], conv.group
            )
            self._seal_and_queue(conv, content, bundles, now_ms, out, from_held=True)
            self._noticed.discard(conv.conv_id)
        self.fetches.keep_only(wanted)

    def _seal_and_queue(
        self,
        conv: Conversation,
        content: envelope.Content,
        bundles: dict[bytes, x3dh.Bundle | None],
        now_ms: int,
        out: Output,
        *,
        from_held: bool,
    ) -> None:
        """Seal for every member; in one transaction: ratchets, outbox, history; then send."""
        msg_id, state = content.msg_id, self._e2e.state
        payloads = [
            (
                wire.mailbox_address(peer.dh),
                state.encrypt(peer, content, self._rng, now_ms, bundles.get(peer.dh)),
            )
            for peer in conv.peers
        ]
        frame: wire.Frame
        if len(payloads) == 1:
            frame = wire.Send(msg_id, payloads[0][0], payloads[0][1])
        else:
            frame = wire.SendMulti(msg_id, tuple(payloads))
        self._receipts.sent(msg_id, frozenset(p.dh for p in conv.peers))
        with self._e2e.transaction():
            self._store.outbox_add(msg_id, wire.encode(frame))
            if from_held:
                self._store.held_remove(msg_id)
            elif self._keep_history:
                self._store.history_add(
                    conv.conv_id, msg_id, Status.PENDING, self._history(conv, content)
                )
        if self._tap is not None:
            self._tap("out", frame)
        out.frames.append(frame)

    def _history(self, conv: Conversation, content: envelope.Content) -> dict[str, Any]:
        return {
            "sender": self._me.name,
            "fp": self._me.public.fingerprint,
            "sent_ms": content.sent_ms,
            "text": content.text,
            "out": True,
            "to": [p.dh.hex() for p in conv.peers],
        }

    def _notice(self, conv: Conversation, reason: str, out: Output) -> None:
        """Say why a conversation's messages wait, once until they go."""
        if conv.conv_id not in self._noticed:
            self._noticed.add(conv.conv_id)
            out.events.append(NoticeEvent(f"waiting to send: {reason}", error=True))
