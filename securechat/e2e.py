"""End-to-end state of one local identity: prekeys, pairwise sessions, seen ids (core).

This is the facade the client uses. It ties X3DH (:mod:`securechat.x3dh`), the
Double Ratchet (:mod:`securechat.ratchet`) and the message format
(:mod:`securechat.envelope`) together and owns the rules between them.

Per peer (keyed by the peer's identity X25519 key, which the relay also uses
as the sender address) we keep up to :data:`MAX_SESSIONS_PER_PEER` sessions,
most recently used first. The first one sends. Rules:

* **Starting.** ``encrypt`` to a peer without a session runs X3DH against the
  given bundle (or the fallback without one). Until the peer's first reply
  opens, every message carries the X3DH header (kind INITIAL), so whichever
  arrives first lets the peer build the session.
* **Receiving an initial message.** Its sender key must equal the relay's
  ``sender_dh``. If a session with the same ephemeral key exists, it is used.
  Otherwise an ephemeral key we accepted before is a replay (ReplayError);
  else X3DH runs with the named prekeys, and the new session goes first.
  On success the one-time prekey is deleted and the ephemeral key remembered
  (bounded; when an entry is evicted its send time becomes a watermark and
  new-session messages not newer than it are rejected as replays).
* **Receiving a normal message.** Tried on the peer's sessions, first one
  first; the one that opens it moves to the front (this resolves two people
  starting sessions with each other at the same time).
* **Failure.** Any malformed, forged or replayed payload raises
  AuthenticationError (ReplayError for a replayed initial message) and changes
  nothing. An authenticated but invalid content record raises SessionError
  and changes nothing either.
* **Exactly once.** A payload identical to one opened recently, or a content
  whose msg_id was seen recently (last :data:`MAX_SEEN` per peer), comes back
  with ``duplicate=True``; for an identical payload the text is empty
  (plaintexts are never stored).
"""

from __future__ import annotations

import contextlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes

from securechat import dh, envelope, ratchet, x3dh
from securechat.envelope import Content, Group, Reader
from securechat.errors import (
    AuthenticationError,
    InvalidPublicKeyError,
    PeerKeyChangedError,
    ReplayError,
    SessionError,
)
from securechat.keys import Identity, PublicIdentity
from securechat.x3dh import Bundle, OneTimePrekeySecret, SignedPrekeySecret, parse_bundle

__all__ = [
    "Bundle", "Content", "E2EState", "Group", "Received", "StateChanges", "parse_bundle",
]

Rng = Callable[[int], bytes]

# --- bounds and periods we chose ------------------------------------------------------------
DAY_MS: Final = 24 * 3600 * 1000
SPK_ROTATION_MS: Final = 7 * DAY_MS  # a new signed prekey after a week
SPK_GRACE_MS: Final = 30 * DAY_MS  # old ones still open initial messages for a month
MAX_OLD_SIGNED_PREKEYS: Final = 4
MAX_ONE_TIME_PREKEYS: Final = 1000  # private halves kept; the oldest are dropped beyond
MAX_SESSIONS_PER_PEER: Final = 4
MAX_SEEN: Final = 4096  # msg ids and payload digests remembered per peer
MAX_SEEN_EPHEMERALS: Final = 4096  # accepted X3DH ephemeral keys remembered
MAX_PEERS: Final = 100_000  # sanity bound when loading state
MAX_NAME_BYTES: Final = 255

STATE_MAGIC: Final = b"SCE2E"  # a full snapshot (serialize/deserialize)
STATE_VERSION: Final = 1
CORE_MAGIC: Final = b"SCE2C"  # the row for prekeys, accepted ephemerals, counters
PEER_MAGIC: Final = b"SCE2P"  # the row for one peer: sessions and seen sets
ROW_VERSION: Final = 1
DIGEST_SIZE: Final = 16
# SHA-256 (was BLAKE2b-512 with label ".../v1/..."): OpenSSL runs it with the CPU's SHA
# instructions, the same code as the ratchet's HMAC-SHA256; measurably cheaper per message.
# Digests stored by an older version simply never match again (a collision is negligible).
_DIGEST_KEY: Final = b"securechat/v2/payload-digest"
_DIGEST_ALGORITHM: Final = hashes.SHA256()
_U8: Final = struct.Struct(">B")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_NORMAL_PREFIX: Final = envelope.encode_prefix(None)


@dataclass(frozen=True, slots=True)
class Received:
    """One opened message. ``duplicate``: already delivered, do not show again."""

    sender: PublicIdentity
    content: Content
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StateChanges:
    """Row encodings of what changed since the last :meth:`E2EState.take_changes`.

    ``core`` is the core row or None if unchanged; ``peers`` maps a peer's
    identity X25519 key to its row. The client writes them in the transaction
    that also queues the message, so a crash keeps both or neither.
    """

    core: bytes | None
    peers: dict[bytes, bytes]

    def __bool__(self) -> bool:
        return self.core is not None or bool(self.peers)


@dataclass(slots=True)
class _Session:
    peer: PublicIdentity
    ad: bytes  # X3DH associated data
    ephemeral: bytes  # the X3DH ephemeral key that created the session
    initial: bytes | None  # envelope prefix repeated until the peer replies
    state: ratchet.RatchetState


@dataclass(slots=True)
class _Peer:
    # OrderedDicts: evicting the oldest entry is O(1); popping a plain dict's
    # first key over and over makes every later lookup of the first key slower.
    identity: PublicIdentity
    sessions: list[_Session] = field(default_factory=list)
    seen_ids: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    seen_payloads: OrderedDict[bytes, tuple[bytes, int]] = field(default_factory=OrderedDict)

    def remember(self, digest: bytes, content: Content) -> None:
        msg_id, ids, payloads = content.msg_id, self.seen_ids, self.seen_payloads
        ids[msg_id] = None
        payloads[digest] = (msg_id, content.sent_ms)
        while len(ids) > MAX_SEEN:
            ids.popitem(last=False)
        while len(payloads) > MAX_SEEN:
            payloads.popitem(last=False)


# A hash already fed with the label: each digest starts from a copy of it,
# which is cheaper than building and feeding a fresh hash object.
_DIGEST_BASE: Final = hashes.Hash(_DIGEST_ALGORITHM)
_DIGEST_BASE.update(_DIGEST_KEY)


def _digest(payload: bytes) -> bytes:
    # A dedup index, not a secret; still only the primitives of our two crypto
    # libraries (cryptography's hashes are cheaper per call than PyNaCl's wrapper).
    digest = _DIGEST_BASE.copy()
    digest.update(payload)
    return digest.finalize()[:DIGEST_SIZE]


def _trim(ordered: OrderedDict[bytes, int], bound: int) -> int:
    """Drop the oldest entries beyond ``bound``; return the largest value dropped."""
    dropped = -1
    while len(ordered) > bound:
        dropped = max(dropped, ordered.popitem(last=False)[1])
    return dropped


class E2EState:
    """Everything end-to-end for one local identity (see the module docstring)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._signed: list[tuple[SignedPrekeySecret, int]] = []  # (key, retired_ms); [0] current
        self._one_time: dict[int, OneTimePrekeySecret] = {}
        self._next_prekey_id = 1
        self._peers: dict[bytes, _Peer] = {}
        # accepted EK -> its message's sent_ms, oldest first
        self._ephemerals: OrderedDict[bytes, int] = OrderedDict()
        self._ephemeral_floor_ms = -1
        # What differs from the rows last taken: every mutation marks its part
        # *before* changing it, so a step that raises half-way is still written.
        self._core_dirty = True
        self._dirty_peers: set[bytes] = set()

    @classmethod
    def new(cls, identity: Identity) -> E2EState:
        return cls(identity)

    # --- prekeys ---------------------------------------------------------------------------

    def _new_prekey_id(self) -> int:
        if self._next_prekey_id > x3dh.MAX_PREKEY_ID:
            raise SessionError("prekey ids exhausted; create a new identity")
        self._next_prekey_id += 1
        return self._next_prekey_id - 1

    def make_prekeys(
        self, rng: Rng, now_ms: int, *, one_time: int
    ) -> tuple[bytes, tuple[bytes, ...]]:
        """(signed prekey blob, new one-time prekeys) to publish; rotates the SPK when due."""
        if not 0 <= one_time <= MAX_ONE_TIME_PREKEYS:
            raise SessionError(f"ask for 0 to {MAX_ONE_TIME_PREKEYS} one-time prekeys")
        self._core_dirty = True
        current = self._signed[0][0] if self._signed else None
        if current is None or now_ms - current.signed.created_ms >= SPK_ROTATION_MS:
            spk = x3dh.generate_signed_prekey(self.identity, self._new_prekey_id(), rng, now_ms)
            self._signed = [(spk, 0)] + [(k, r or now_ms) for k, r in self._signed]
        self._expire_signed(now_ms)
        fresh = [x3dh.generate_one_time_prekey(self._new_prekey_id(), rng) for _ in range(one_time)]
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

    # --- sending ---------------------------------------------------------------------------

    def has_session(self, peer: PublicIdentity) -> bool:
        record = self._peers.get(peer.dh)
        return record is not None and bool(record.sessions)

    def _peer_record(self, peer: PublicIdentity) -> _Peer:
        record = self._peers.get(peer.dh)
        if record is not None and record.identity is peer:
            return record
        if record is None:
            record = self._peers[peer.dh] = _Peer(peer)
        elif not record.identity.same_keys(peer):
            raise PeerKeyChangedError(
                f"{peer.name or 'peer'}: signing key differs from the one in our sessions"
            )
        elif peer.name and peer.name != record.identity.name:
            record.identity = peer
        return record

    def encrypt(
        self,
        peer: PublicIdentity,
        content: Content,
        rng: Rng,
        now_ms: int,
        bundle: Bundle | None = None,
    ) -> bytes:
        """Seal ``content`` for ``peer``, starting a session (X3DH) if there is none."""
        group = content.group
        if group is not None and not {peer.dh, self.identity.public.dh} <= set(group.members):
            raise SessionError("a group message must list both the sender and the recipient")
        plaintext = envelope.encode_content(content)
        record = self._peer_record(peer)
        self._dirty_peers.add(peer.dh)
        if not record.sessions:
            header, agreement = x3dh.initiate(self.identity, peer, bundle, rng)
            state = ratchet.init_initiator(
                agreement.shared_key, agreement.responder_ratchet_key, rng
            )
            prefix = envelope.encode_prefix(header)
            record.sessions.insert(
                0, _Session(peer, agreement.associated_data, header.ephemeral, prefix, state)
            )
        session = record.sessions[0]
        prefix = session.initial or _NORMAL_PREFIX
        return prefix + ratchet.encrypt(session.state, plaintext, session.ad + prefix, rng)

    # --- receiving ---------------------------------------------------------------------------

    def decrypt(self, sender_dh: bytes, payload: bytes, now_ms: int) -> Received:
        """Open a payload the relay says ``sender_dh`` sent (see module rules)."""
        self._expire_signed(now_ms)
        initial, prefix, message = envelope.decode_envelope(payload)
        record = self._peers.get(sender_dh)
        digest = _digest(payload)
        if record is not None:
            seen = record.seen_payloads.get(digest)
            if seen is not None:
                return Received(record.identity, Content(seen[0], seen[1], ""), True)
        if initial is not None:
            session, new, opk_id = self._initial_session(sender_dh, initial, record)
            candidates = [session]
        elif record is None:
            raise AuthenticationError()
        else:
            new, opk_id = False, None
            # no copy needed: the list only changes in _commit, right before we return
            candidates = record.sessions
        for session in candidates:
            try:
                plaintext, update = ratchet.decrypt(session.state, message, session.ad + prefix)
            except AuthenticationError:
                continue
            content = envelope.decode_content(plaintext)
            if new or content.group is not None:
                self._check_content(session.peer, content, new)
            if record is None:
                record = self._peer_record(session.peer)
            return self._commit(record, session, update, content, digest, new, opk_id)
        raise AuthenticationError()

    def _initial_session(
        self, sender_dh: bytes, header: x3dh.InitialHeader, record: _Peer | None
    ) -> tuple[_Session, bool, int | None]:
        """The session an initial message belongs to: existing (same EK) or a new one."""
        if not hmac.compare_digest(header.sender.dh, sender_dh):
            raise AuthenticationError()
        if record is not None:
            if not record.identity.same_keys(header.sender):
                raise AuthenticationError()
            for session in record.sessions:
                if hmac.compare_digest(session.ephemeral, header.ephemeral):
                    return session, False, None
        if header.ephemeral in self._ephemerals:
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
        session = _Session(identity, agreement.associated_data, header.ephemeral, None, state)
        return session, True, header.one_time_prekey_id

    def _responder_keys(self, header: x3dh.InitialHeader) -> tuple[bytes, bytes]:
        if header.fallback:
            return self.identity.dh_private, self.identity.public.dh
        for spk, _retired in self._signed:
            if spk.signed.prekey_id == header.signed_prekey_id:
                return spk.private, spk.signed.public
        raise AuthenticationError()  # unknown or expired signed prekey

    def _check_content(self, sender: PublicIdentity, content: Content, new: bool) -> None:
        group = content.group
        if group is not None and not {sender.dh, self.identity.public.dh} <= set(group.members):
            raise SessionError("group message does not list both its sender and us")
        if new and content.sent_ms <= self._ephemeral_floor_ms:
            raise ReplayError()

    def _commit(
        self,
        record: _Peer,
        session: _Session,
        update: ratchet.Update,
        content: Content,
        digest: bytes,
        new: bool,
        opk_id: int | None,
    ) -> Received:
        """Apply an accepted message; ``record`` is the sender's (the session's peer)."""
        self._dirty_peers.add(record.identity.dh)
        self._core_dirty |= new
        ratchet.apply(session.state, update)
        if new:
            if opk_id is not None:
                del self._one_time[opk_id]
            self._ephemerals[session.ephemeral] = content.sent_ms
            self._ephemeral_floor_ms = max(
                self._ephemeral_floor_ms, _trim(self._ephemerals, MAX_SEEN_EPHEMERALS)
            )
            record.sessions.insert(0, session)
            del record.sessions[MAX_SESSIONS_PER_PEER:]
        else:
            session.initial = None  # the peer answered, so it has the session
            if record.sessions[0] is not session:
                record.sessions.remove(session)
                record.sessions.insert(0, session)
        duplicate = content.msg_id in record.seen_ids
        record.remember(digest, content)
        return Received(record.identity, content, duplicate)

    # --- persistence ---------------------------------------------------------------------------
    # Two forms share one set of field encoders: a full snapshot (``serialize``; vectors,
    # fuzzing, the client's old single blob) and rows, one core row plus one row per peer,
    # so that a message rewrites only the state of the peer it concerns.

    def take_changes(self) -> StateChanges:
        """Rows changed since the last call; write them all in one transaction.

        Marks everything clean: if the write fails, hand them to :meth:`requeue`.
        """
        core = None
        if self._core_dirty:
            core = CORE_MAGIC + _U8.pack(ROW_VERSION) + self._encode_core()
        header = PEER_MAGIC + _U8.pack(ROW_VERSION)
        peers = {key: header + _encode_peer(self._peers[key]) for key in self._dirty_peers}
        self._core_dirty, self._dirty_peers = False, set()
        return StateChanges(core, peers)

    def requeue(self, changes: StateChanges) -> None:
        """The write of ``changes`` failed (rolled back): take them again next time."""
        self._core_dirty |= changes.core is not None
        self._dirty_peers.update(changes.peers)

    @classmethod
    def load(cls, identity: Identity, core: bytes, peers: Mapping[bytes, bytes]) -> E2EState:
        """Rebuild from rows (``peers``: identity X25519 key -> row); nothing is dirty after."""
        r = Reader(core, _corrupt())
        if r.take(len(CORE_MAGIC)) != CORE_MAGIC or r.u8() != ROW_VERSION:
            raise SessionError("not an end-to-end state row of a supported version")
        state = cls._decode_core(identity, r)
        with _corrupt_as_session_error():
            r.end()
            for key, row in peers.items():
                r = Reader(row, _corrupt())
                if r.take(len(PEER_MAGIC)) != PEER_MAGIC or r.u8() != ROW_VERSION:
                    raise SessionError("not an end-to-end peer row of a supported version")
                record = _decode_peer(r)
                r.end()
                if not hmac.compare_digest(record.identity.dh, key):
                    raise SessionError("end-to-end peer row stored under another peer's key")
                state._add_peer(record)
        state._core_dirty = False
        return state

    def serialize(self) -> bytes:
        """Versioned binary snapshot, peers in key order; the client encrypts it at rest."""
        out = [STATE_MAGIC, _U8.pack(STATE_VERSION), self._encode_core()]
        out.append(_U32.pack(len(self._peers)))
        out += [_encode_peer(self._peers[key]) for key in sorted(self._peers)]
        return b"".join(out)

    @classmethod
    def deserialize(cls, identity: Identity, data: bytes) -> E2EState:
        """Inverse of :meth:`serialize`; SessionError if corrupt or not ours.

        Everything is dirty after: none of it is in rows yet (this is how an old
        single-blob client state migrates).
        """
        r = Reader(data, _corrupt())
        if r.take(len(STATE_MAGIC)) != STATE_MAGIC or r.u8() != STATE_VERSION:
            raise SessionError("not an end-to-end state file of a supported version")
        state = cls._decode_core(identity, r)
        with _corrupt_as_session_error():
            for _ in range(_bounded(r.u32(), MAX_PEERS)):
                state._add_peer(_decode_peer(r))
            r.end()
        state._dirty_peers.update(state._peers)
        return state

    def _encode_core(self) -> bytes:
        out = [self.identity.public.dh, _U32.pack(self._next_prekey_id)]
        out += [_U64.pack(self._ephemeral_floor_ms + 1), _U8.pack(len(self._signed))]
        for spk, retired in self._signed:
            out += [spk.signed.encode(), spk.private, _U64.pack(retired)]
        out.append(_U32.pack(len(self._one_time)))
        out += [o.prekey.encode() + o.private for o in self._one_time.values()]
        out.append(_U32.pack(len(self._ephemerals)))
        out += [ek + _U64.pack(ms) for ek, ms in self._ephemerals.items()]
        return b"".join(out)

    @classmethod
    def _decode_core(cls, identity: Identity, r: Reader) -> E2EState:
        if not hmac.compare_digest(r.take(dh.KEY_SIZE), identity.public.dh):
            raise SessionError("end-to-end state belongs to another identity")
        state = cls(identity)
        state._next_prekey_id, state._ephemeral_floor_ms = r.u32(), r.u64() - 1
        with _corrupt_as_session_error():
            for _ in range(_bounded(r.u8(), 1 + MAX_OLD_SIGNED_PREKEYS)):
                signed = x3dh.SignedPrekey.decode(r.take(x3dh.SIGNED_PREKEY_SIZE))
                state._signed.append((SignedPrekeySecret(signed, r.take(32)), r.u64()))
            for _ in range(_bounded(r.u32(), MAX_ONE_TIME_PREKEYS)):
                opk = x3dh.OneTimePrekey.decode(r.take(x3dh.ONE_TIME_PREKEY_SIZE))
                state._one_time[opk.prekey_id] = OneTimePrekeySecret(opk, r.take(32))
            for _ in range(_bounded(r.u32(), MAX_SEEN_EPHEMERALS)):
                ephemeral = r.take(32)  # read in file order (RHS of d[k] = v runs first)
                state._ephemerals[ephemeral] = r.u64()
        return state

    def _add_peer(self, record: _Peer) -> None:
        key = record.identity.dh
        if key in self._peers or len(self._peers) >= MAX_PEERS:
            raise SessionError("end-to-end state repeats a peer or exceeds its bounds (corrupt?)")
        self._peers[key] = record


def _corrupt() -> SessionError:
    return SessionError("end-to-end state is truncated or corrupt")


@contextlib.contextmanager
def _corrupt_as_session_error() -> Iterator[None]:
    try:
        yield
    except (ValueError, InvalidPublicKeyError) as exc:
        raise SessionError("end-to-end state is corrupt") from exc


def _bounded(count: int, bound: int) -> int:
    if count > bound:
        raise SessionError("end-to-end state exceeds its bounds (corrupt?)")
    return count


def _blob(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _encode_peer(record: _Peer) -> bytes:
    name = record.identity.name.encode()
    out = [record.identity.key_bytes, _U8.pack(len(name)), name, _U8.pack(len(record.sessions))]
    for s in record.sessions:
        out += [s.peer.key_bytes, s.ad, s.ephemeral, _blob(s.initial or b"")]
        out.append(_blob(ratchet.serialize(s.state)))
    out.append(_U32.pack(len(record.seen_ids)))
    out += list(record.seen_ids)
    out.append(_U32.pack(len(record.seen_payloads)))
    out += [d + i + _U64.pack(ms) for d, (i, ms) in record.seen_payloads.items()]
    return b"".join(out)


def _identity(raw: bytes, name: str) -> PublicIdentity:
    return PublicIdentity(raw[:32], raw[32:], name)


def _decode_peer(r: Reader) -> _Peer:
    key_bytes = r.take(64)
    record = _Peer(_identity(key_bytes, r.take(r.u8()).decode("utf-8")))
    for _ in range(_bounded(r.u8(), MAX_SESSIONS_PER_PEER)):
        peer = _identity(r.take(64), record.identity.name)
        ad, ephemeral, initial = r.take(128), r.take(32), r.blob()
        state = ratchet.deserialize(r.blob())
        record.sessions.append(_Session(peer, ad, ephemeral, initial or None, state))
    for _ in range(_bounded(r.u32(), MAX_SEEN)):
        record.seen_ids[r.take(envelope.MSG_ID_SIZE)] = None
    for _ in range(_bounded(r.u32(), MAX_SEEN)):
        digest = r.take(DIGEST_SIZE)
        record.seen_payloads[digest] = (r.take(envelope.MSG_ID_SIZE), r.u64())
    return record
