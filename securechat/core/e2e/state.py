"""End-to-end state of one local identity: prekeys, pairwise sessions, seen ids (core).

This is the facade the client uses. It ties X3DH (:mod:`securechat.core.x3dh`), the
Double Ratchet (:mod:`securechat.core.ratchet`) and the message format
(:mod:`securechat.core.envelope`) together and owns the rules between them.

Per peer (keyed by the peer's identity X25519 key, which the relay also uses
as the sender address) we keep up to :data:`MAX_SESSIONS_PER_PEER` sessions,
most recently used first. The first one sends. Rules:

* **Starting.** ``encrypt`` to a peer without a session runs X3DH against the
  given bundle (or the fallback without one). Until the peer's first reply
  opens, every message carries the X3DH header (kind INITIAL), so whichever
  arrives first lets the peer build the session. The peer given to
  ``encrypt`` is the one the user chose: a record that an unverified sender
  made with the same X25519 key but another signing key is replaced.
* **Whom an initial message may claim to be.** Its sender key must equal the
  relay's ``sender_dh``; if the caller passes the identity the user trusts for
  that key (``trusted``), both keys must equal it (PeerKeyChangedError), else
  they must equal the keys we already hold for that peer.
* **Receiving an initial message.** If a session with the same ephemeral key
  exists, it is used. Otherwise it opens a new session only if it was sent
  within [now - REPLAY_WINDOW_MS, now + MAX_CLOCK_SKEW_MS] of our clock, after
  that peer's replay floor, with an ephemeral key that peer has not used
  (ReplayError otherwise); then X3DH runs with the named prekeys. Accepted
  keys are remembered per peer (bounded; an evicted key raises only that
  peer's floor), so one sender cannot evict another's replay protection.
* **Receiving a normal message.** Only sessions that can open it are tried:
  first those whose receiving ratchet key (or a skipped key) matches the
  header, then those that may take a DH step (:func:`ratchet.can_step`). The
  work each attempt costs is charged first to the sender's budget
  (:data:`WORK_PER_SECOND`); over budget, the message is refused
  (SessionError) without the work.
* **Failure.** Any malformed, forged or replayed payload raises
  AuthenticationError (ReplayError for a replayed initial message) and changes
  nothing. An authenticated but invalid content record (bad group, a msg_id
  that differs from the relay frame's) raises SessionError and changes
  nothing either.
* **Exactly once.** A payload identical to one opened recently, or a content
  whose msg_id was seen recently (last :data:`MAX_SEEN` per peer), comes back
  with ``duplicate=True``; for an identical payload the text is empty
  (plaintexts are never stored).
* **Bounded.** Peers that are not pinned (never sent to, not trusted) are
  evicted least recently active first beyond :data:`MAX_UNPINNED_PEERS`.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes

from securechat.core import envelope, ratchet, x3dh
from securechat.core.e2e import persist
from securechat.core.e2e.records import (
    MAX_CLOCK_SKEW_MS,
    MAX_OLD_SIGNED_PREKEYS,
    MAX_ONE_TIME_PREKEYS,
    MAX_SESSIONS_PER_PEER,
    MAX_UNPINNED_PEERS,
    MAX_WORK_BUCKETS,
    REPLAY_WINDOW_MS,
    SPK_GRACE_MS,
    SPK_ROTATION_MS,
    WORK_BURST,
    WORK_PER_SECOND,
    X3DH_COST,
    Peer,
    Session,
)
from securechat.core.envelope import Content
from securechat.core.keys import Identity, PublicIdentity
from securechat.core.x3dh import Bundle, OneTimePrekeySecret, SignedPrekeySecret
from securechat.errors import (
    AuthenticationError,
    InvalidPublicKeyError,
    PeerKeyChangedError,
    ReplayError,
    SessionError,
)

Rng = Callable[[int], bytes]

DIGEST_SIZE: Final = 16
# SHA-256 (was BLAKE2b-512 with label ".../v1/..."): OpenSSL runs it with the CPU's SHA
# instructions, the same code as the ratchet's HMAC-SHA256; measurably cheaper per message.
_DIGEST_KEY: Final = b"securechat/v2/payload-digest"
_NORMAL_PREFIX: Final = envelope.encode_prefix(None)
# A hash already fed with the label: each digest starts from a copy of it,
# which is cheaper than building and feeding a fresh hash object.
_DIGEST_BASE: Final = hashes.Hash(hashes.SHA256())
_DIGEST_BASE.update(_DIGEST_KEY)


def _digest(payload: bytes) -> bytes:
    # A dedup index, not a secret; still only the primitives of our two crypto libraries.
    digest = _DIGEST_BASE.copy()
    digest.update(payload)
    return digest.finalize()[:DIGEST_SIZE]


@dataclass(frozen=True, slots=True)
class Received:
    """One opened message. ``duplicate``: already delivered, do not show again.

    ``fallback``: it opened a new session in the no-prekey mode (weaker; a
    client that published prekeys should say so).
    """

    sender: PublicIdentity
    content: Content
    duplicate: bool
    new_session: bool = False
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class StateChanges:
    """Row encodings of what changed since the last :meth:`E2EState.take_changes`.

    ``core`` is the core row or None if unchanged; ``peers`` maps a peer's
    identity X25519 key to its row; ``deleted`` lists peers whose rows must go.
    The client writes them in the transaction that also queues the message,
    so a crash keeps both or neither.
    """

    core: bytes | None
    peers: dict[bytes, bytes]
    deleted: frozenset[bytes] = frozenset()

    def __bool__(self) -> bool:
        return self.core is not None or bool(self.peers) or bool(self.deleted)


class _Budget:
    """Per-sender token buckets of derivation work, in memory only (bounded LRU)."""

    def __init__(self) -> None:
        self._buckets: OrderedDict[bytes, tuple[float, int]] = OrderedDict()

    def charge(self, sender: bytes, cost: int, now_ms: int) -> None:
        tokens, last = self._buckets.pop(sender, (float(WORK_BURST), now_ms))
        elapsed = max(now_ms - last, 0)
        tokens = min(float(WORK_BURST), tokens + elapsed * WORK_PER_SECOND / 1000)
        if cost > tokens:
            self._buckets[sender] = (tokens, now_ms)
            raise SessionError(
                "refused a message that would cost too much work (many forged or far-ahead "
                "messages from this sender); it was not opened"
            )
        self._buckets[sender] = (tokens - cost, now_ms)
        while len(self._buckets) > MAX_WORK_BUCKETS:
            self._buckets.popitem(last=False)


class E2EState:
    """Everything end-to-end for one local identity (see the module docstring)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._signed: list[tuple[SignedPrekeySecret, int]] = []  # (key, retired_ms); [0] current
        self._one_time: dict[int, OneTimePrekeySecret] = {}
        self._next_prekey_id = 1
        # Least recently active first: a peer moves to the end when it is used.
        self._peers: dict[bytes, Peer] = {}
        self._budget = _Budget()
        # What differs from the rows last taken: every mutation marks its part
        # *before* changing it, so a step that raises half-way is still written.
        self._core_dirty = True
        self._dirty_peers: set[bytes] = set()
        self._deleted_peers: set[bytes] = set()

    @classmethod
    def new(cls, identity: Identity) -> E2EState:
        return cls(identity)

    # --- prekeys ---------------------------------------------------------------------------

    def _new_prekey_id(self) -> int:
        if self._next_prekey_id > x3dh.MAX_PREKEY_ID:
            raise SessionError("prekey ids exhausted; create a new identity")
        self._next_prekey_id += 1
        return self._next_prekey_id - 1

    def rotation_due(self, now_ms: int) -> bool:
        """True when there is no signed prekey yet or the current one is a week old."""
        if not self._signed:
            return True
        return now_ms - self._signed[0][0].signed.created_ms >= SPK_ROTATION_MS

    def make_prekeys(
        self, rng: Rng, now_ms: int, *, one_time: int
    ) -> tuple[bytes, tuple[bytes, ...]]:
        """(signed prekey blob, new one-time prekeys) to publish; rotates the SPK when due.

        Changes (and marks dirty) nothing when no rotation is due and
        ``one_time`` is 0: a client that publishes only when something
        changed then writes nothing while idle.
        """
        if not 0 <= one_time <= MAX_ONE_TIME_PREKEYS:
            raise SessionError(f"ask for 0 to {MAX_ONE_TIME_PREKEYS} one-time prekeys")
        if self.rotation_due(now_ms):
            self._core_dirty = True
            spk = x3dh.generate_signed_prekey(self.identity, self._new_prekey_id(), rng, now_ms)
            self._signed = [(spk, 0)] + [(k, r or now_ms) for k, r in self._signed]
        self._expire_signed(now_ms)
        fresh = [x3dh.generate_one_time_prekey(self._new_prekey_id(), rng) for _ in range(one_time)]
        if fresh:
            self._core_dirty = True
        for opk in fresh:
            self._one_time[opk.prekey.prekey_id] = opk
        while len(self._one_time) > MAX_ONE_TIME_PREKEYS:
            del self._one_time[min(self._one_time)]
        return self._signed[0][0].signed.encode(), tuple(o.prekey.encode() for o in fresh)

    def _expire_signed(self, now_ms: int) -> None:
        if len(self._signed) <= 1:  # only retired signed prekeys can expire
            return
        kept = [(k, r) for k, r in self._signed[1:] if now_ms - r < SPK_GRACE_MS]
        if len(kept) + 1 != len(self._signed) or len(kept) > MAX_OLD_SIGNED_PREKEYS:
            self._core_dirty = True
            self._signed = self._signed[:1] + kept[:MAX_OLD_SIGNED_PREKEYS]

    @property
    def one_time_prekey_count(self) -> int:
        return len(self._one_time)

    @property
    def has_prekeys(self) -> bool:
        """Whether we ever made a signed prekey (so peers should not need the fallback)."""
        return bool(self._signed)

    # --- peers -------------------------------------------------------------------------------

    def has_session(self, peer: PublicIdentity) -> bool:
        record = self._peers.get(peer.dh)
        return record is not None and record.identity.same_keys(peer) and bool(record.sessions)

    def peer_identity(self, identity_dh: bytes) -> PublicIdentity | None:
        """The identity we hold a session with under this X25519 key, if any."""
        record = self._peers.get(identity_dh)
        return record.identity if record is not None and record.sessions else None

    def pin(self, peer: PublicIdentity) -> None:
        """Never evict ``peer`` (the user trusts it); creates its record if needed."""
        record = self._user_peer(peer)
        if not record.pinned:
            self._dirty_peers.add(peer.dh)
            record.pinned = True

    def _user_peer(self, peer: PublicIdentity, *, pin: bool = True) -> Peer:
        """The record of a peer the user chose, replacing one made with other keys."""
        record = self._peers.get(peer.dh)
        if record is not None and record.identity is peer:
            return record
        if record is None or not record.identity.same_keys(peer):
            record = self._add(Peer(peer, pinned=pin))
        elif peer.name and peer.name != record.identity.name:
            self._dirty_peers.add(peer.dh)
            record.identity = peer
        return record

    def _add(self, record: Peer) -> Peer:
        """Insert (or replace) a record, evicting the least recently active unpinned peers."""
        key = record.identity.dh
        self._dirty_peers.add(key)
        self._deleted_peers.discard(key)
        self._peers.pop(key, None)
        self._peers[key] = record
        unpinned = [k for k, p in self._peers.items() if not p.pinned]
        for old in unpinned[: max(len(unpinned) - MAX_UNPINNED_PEERS, 0)]:
            del self._peers[old]
            self._dirty_peers.discard(old)
            self._deleted_peers.add(old)
        return record

    def _touch(self, key: bytes) -> None:
        """Move a peer to the most recently active end (eviction order)."""
        self._peers[key] = self._peers.pop(key)

    # --- sending ---------------------------------------------------------------------------

    def encrypt(
        self,
        peer: PublicIdentity,
        content: Content,
        rng: Rng,
        now_ms: int,
        bundle: Bundle | None = None,
        *,
        pin: bool = True,
    ) -> bytes:
        """Seal ``content`` for ``peer``, starting a session (X3DH) if there is none.

        ``pin``: the user wrote to this peer, so it is never evicted. A receipt
        to an unknown sender passes False: answering it must not keep it forever.
        """
        group = content.group
        if group is not None and not {peer.dh, self.identity.public.dh} <= set(group.members):
            raise SessionError("a group message must list both the sender and the recipient")
        plaintext = envelope.encode_content(content)
        record = self._user_peer(peer, pin=pin)
        self._dirty_peers.add(peer.dh)
        record.pinned |= pin
        self._touch(peer.dh)
        if not record.sessions:
            header, agreement = x3dh.initiate(self.identity, peer, bundle, rng)
            state = ratchet.init_initiator(
                agreement.shared_key, agreement.responder_ratchet_key, rng
            )
            prefix = envelope.encode_prefix(header)
            record.sessions.insert(
                0, Session(peer, agreement.associated_data, header.ephemeral, prefix, state)
            )
        session = record.sessions[0]
        prefix = session.initial or _NORMAL_PREFIX
        return prefix + ratchet.encrypt(session.state, plaintext, session.ad + prefix, rng)

    # --- receiving ---------------------------------------------------------------------------

    def decrypt(
        self,
        sender_dh: bytes,
        payload: bytes,
        now_ms: int,
        *,
        msg_id: bytes | None = None,
        trusted: PublicIdentity | None = None,
    ) -> Received:
        """Open a payload the relay says ``sender_dh`` sent (see module rules).

        ``msg_id``: the relay frame's id, which the content must repeat.
        ``trusted``: the identity the user trusts for ``sender_dh``, if any.
        """
        self._expire_signed(now_ms)
        initial, prefix, message = envelope.decode_envelope(payload)
        record = self._peers.get(sender_dh)
        if record is not None and trusted is not None and not record.identity.same_keys(trusted):
            record = None  # made by an unverified sender: replaced if this message opens
        digest = _digest(payload)
        if record is not None:
            seen = record.seen_payloads.get(digest)
            if seen is not None:
                return Received(record.identity, Content(seen[0], seen[1], ""), True)
        if initial is not None:
            if trusted is not None and not trusted.same_keys(initial.sender):
                raise PeerKeyChangedError(
                    f"a message claiming to be from {trusted.name or 'a trusted peer'} carries "
                    "a different signing key than the one you trust; rejected"
                )
            session, new, opk_id = self._initial_session(sender_dh, initial, record)
            attempts = [(session, X3DH_COST if new else 0)]
        elif record is None:
            raise AuthenticationError()
        else:
            new, opk_id = False, None
            attempts = self._candidates(record, message)
        for session, extra in attempts:
            cost = ratchet.work(session.state, message)
            if cost is None:
                continue
            self._budget.charge(sender_dh, cost + extra, now_ms)
            try:
                plaintext, update = ratchet.decrypt(session.state, message, session.ad + prefix)
            except AuthenticationError:
                continue
            content = envelope.decode_content(plaintext)
            self._check_content(session.peer, content, msg_id)
            if new:
                self._check_fresh(content.sent_ms, record, now_ms)
            received = self._commit(
                record,
                session,
                update,
                content,
                digest,
                opk_id,
                now_ms,
                new=new,
                fallback=initial is not None and initial.fallback,
            )
            if trusted is not None:
                self.pin(received.sender)
            return received
        raise AuthenticationError()

    def _candidates(self, record: Peer, message: bytes) -> list[tuple[Session, int]]:
        """Sessions that may open ``message``, the cheapest (key matches) first."""
        costed = []
        for index, session in enumerate(record.sessions):
            cost = ratchet.work(session.state, message)
            if cost is not None:
                costed.append((cost, index, session))
        costed.sort(key=lambda item: (item[0], item[1]))
        return [(session, 0) for _, _, session in costed]

    def _initial_session(
        self, sender_dh: bytes, header: x3dh.InitialHeader, record: Peer | None
    ) -> tuple[Session, bool, int | None]:
        """The session an initial message belongs to: existing (same EK) or a new one."""
        if not hmac.compare_digest(header.sender.dh, sender_dh):
            raise AuthenticationError()
        if record is not None:
            if not record.identity.same_keys(header.sender):
                raise AuthenticationError()
            for session in record.sessions:
                if hmac.compare_digest(session.ephemeral, header.ephemeral):
                    return session, False, None
            if header.ephemeral in record.ephemerals:
                raise ReplayError()
        own_private, own_public = self._responder_keys(header)
        opk_private = None
        if header.one_time_prekey_id is not None:
            opk = self._one_time.get(header.one_time_prekey_id)
            if opk is None:
                raise AuthenticationError()  # already consumed (or never ours)
            opk_private = opk.private
        try:
            agreement = x3dh.respond(self.identity, header, own_private, opk_private)
        except InvalidPublicKeyError as exc:
            raise AuthenticationError() from exc
        identity = record.identity if record is not None else header.sender
        state = ratchet.init_responder(agreement.shared_key, own_private, own_public)
        session = Session(identity, agreement.associated_data, header.ephemeral, None, state)
        return session, True, header.one_time_prekey_id

    def _responder_keys(self, header: x3dh.InitialHeader) -> tuple[bytes, bytes]:
        if header.fallback:
            return self.identity.dh_private, self.identity.public.dh
        for spk, _retired in self._signed:
            if spk.signed.prekey_id == header.signed_prekey_id:
                return spk.private, spk.signed.public
        raise AuthenticationError()  # unknown or expired signed prekey

    def _check_content(
        self, sender: PublicIdentity, content: Content, msg_id: bytes | None
    ) -> None:
        """Rules on every authenticated content (SessionError: refused, nothing changes)."""
        if msg_id is not None and not hmac.compare_digest(content.msg_id, msg_id):
            raise SessionError("message id inside differs from the relay frame's id")
        group = content.group
        if group is not None and not {sender.dh, self.identity.public.dh} <= set(group.members):
            raise SessionError("group message does not list both its sender and us")

    @staticmethod
    def _check_fresh(sent_ms: int, record: Peer | None, now_ms: int) -> None:
        """A new session's opening message: inside our clock's window, after the peer's floor."""
        if not now_ms - REPLAY_WINDOW_MS <= sent_ms <= now_ms + MAX_CLOCK_SKEW_MS:
            raise ReplayError(
                "rejected a session-opening message sent too long ago or in the future "
                "(check both clocks)"
            )
        if record is not None and sent_ms <= record.floor_ms:
            raise ReplayError()

    def _commit(
        self,
        record: Peer | None,
        session: Session,
        update: ratchet.Update,
        content: Content,
        digest: bytes,
        opk_id: int | None,
        now_ms: int,
        *,
        new: bool,
        fallback: bool,
    ) -> Received:
        """Apply an accepted message; ``record`` is the sender's (None: a new record)."""
        if record is None:
            record = self._add(Peer(session.peer))
        key = record.identity.dh
        self._dirty_peers.add(key)
        self._touch(key)
        ratchet.apply(session.state, update)
        if new:
            self._core_dirty |= opk_id is not None
            if opk_id is not None:
                del self._one_time[opk_id]
            record.remember_ephemeral(session.ephemeral, content.sent_ms, now_ms)
            record.sessions.insert(0, session)
            del record.sessions[MAX_SESSIONS_PER_PEER:]
        else:
            session.initial = None  # the peer answered, so it has the session
            if record.sessions[0] is not session:
                record.sessions.remove(session)
                record.sessions.insert(0, session)
        duplicate = content.msg_id in record.seen_ids
        record.remember(digest, content)
        return Received(record.identity, content, duplicate, new, new and fallback)

    # --- persistence ---------------------------------------------------------------------------
    # Two forms share one set of field encoders (persist.py): a full snapshot
    # (``serialize``: vectors, fuzzing) and rows, one core row plus one row per
    # peer, so that a message rewrites only the state of the peer it concerns.

    def has_changes(self) -> bool:
        return self._core_dirty or bool(self._dirty_peers) or bool(self._deleted_peers)

    def take_changes(self) -> StateChanges:
        """Rows changed since the last call; write them all in one transaction.

        Marks everything clean: if the write fails, hand them to :meth:`requeue`.
        """
        core = persist.core_row(self._core_fields()) if self._core_dirty else None
        peers = {key: persist.peer_row(self._peers[key]) for key in self._dirty_peers}
        changes = StateChanges(core, peers, frozenset(self._deleted_peers))
        self._core_dirty, self._dirty_peers, self._deleted_peers = False, set(), set()
        return changes

    def requeue(self, changes: StateChanges) -> None:
        """The write of ``changes`` failed (rolled back): take them again next time."""
        self._core_dirty |= changes.core is not None
        self._dirty_peers.update(k for k in changes.peers if k in self._peers)
        self._deleted_peers.update(k for k in changes.deleted if k not in self._peers)

    def _core_fields(self) -> persist.CoreFields:
        return persist.CoreFields(
            self.identity.public.dh, self._next_prekey_id, self._signed, self._one_time
        )

    def _restore_core(self, fields: persist.CoreFields) -> None:
        if not hmac.compare_digest(fields.identity_dh, self.identity.public.dh):
            raise SessionError("end-to-end state belongs to another identity")
        self._next_prekey_id = fields.next_prekey_id
        self._signed = fields.signed
        self._one_time = fields.one_time

    @classmethod
    def load(
        cls,
        identity: Identity,
        core: bytes,
        peers: Iterable[tuple[bytes, bytes]],
        *,
        key_of: Callable[[bytes], bytes] = bytes,
    ) -> E2EState:
        """Rebuild from rows: ``peers`` yields (the key a row is stored under, the row);
        ``key_of(peer X25519 key)`` must give that key back (rows cannot be swapped).

        Rows of an older version are read and marked changed, so they are
        rewritten in the current version at the next save.
        """
        state = cls(identity)
        fields, current = persist.parse_core_row(core)
        state._restore_core(fields)
        state._core_dirty = not current
        for stored_key, row in peers:
            record, current = persist.parse_peer_row(row)
            if not hmac.compare_digest(key_of(record.identity.dh), stored_key):
                raise SessionError("end-to-end peer row stored under another peer's key")
            state._load_peer(record)
            if not current:
                state._dirty_peers.add(record.identity.dh)
        return state

    def serialize(self) -> bytes:
        """Versioned binary snapshot, peers in key order (vectors, fuzzing)."""
        return persist.snapshot(self._core_fields(), [self._peers[k] for k in sorted(self._peers)])

    @classmethod
    def deserialize(cls, identity: Identity, data: bytes) -> E2EState:
        """Inverse of :meth:`serialize`; SessionError if corrupt or not ours.

        Everything is dirty after: none of it is in rows yet (this is how an old
        single-blob client state migrates).
        """
        state = cls(identity)
        fields, records = persist.parse_snapshot(data)
        state._restore_core(fields)
        for record in records:
            state._load_peer(record)
        state._dirty_peers.update(state._peers)
        return state

    def _load_peer(self, record: Peer) -> None:
        key = record.identity.dh
        if key in self._peers or len(self._peers) >= persist.MAX_PEERS:
            raise SessionError("end-to-end state repeats a peer or exceeds its bounds (corrupt?)")
        self._peers[key] = record
