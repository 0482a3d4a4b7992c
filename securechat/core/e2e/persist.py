"""The saved form of the end-to-end state: a core row, one row per peer, a snapshot (core).

Version 2 (current) keeps the accepted X3DH ephemeral keys and the replay floor
per peer, in the peer's row, and a ``pinned`` flag; version 1 kept them in the
core row for all peers together, where one sender could evict everyone's keys
and poison one shared floor. Version 1 rows and snapshots are still read: their
shared ephemeral list and floor are dropped (a replay of one of those messages
is still caught by the per-peer payload digests of the last 4096 messages), and
their peers load as pinned, so an existing conversation is never evicted.

Layouts (``docs/protocol.md`` section 4.7)::

    core row  = "SCE2C" || u8 2 || core
    peer row  = "SCE2P" || u8 2 || peer
    snapshot  = "SCE2E" || u8 2 || core || n:u32 || n * peer   (peers by key order)
    core      = IK.dh:32 || next_prekey_id:u32 || n:u8 * (spk:109 || spk_priv:32 || retired_ms:u64)
                || n:u32 * (opk:36 || opk_priv:32)
    peer      = IK:64 || name_len:u8 || name || flags:u8 (bit0 pinned)
                || n:u8 * (IK:64 || AD:128 || EK:32 || len:u32 initial prefix || len:u32 ratchet)
                || n:u32 * msg_id:16 || n:u32 * (digest:16 || msg_id:16 || sent_ms:u64)
                || n:u16 * (EK:32 || sent_ms:u64) || floor_ms+1:u64

Every count is checked against its bound and trailing bytes are refused
(SessionError), so a corrupt or hostile file cannot make the loader allocate
without limit.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from securechat.core import dh, envelope, ratchet, x3dh
from securechat.core.e2e.records import (
    MAX_EPHEMERALS_PER_PEER,
    MAX_OLD_SIGNED_PREKEYS,
    MAX_ONE_TIME_PREKEYS,
    MAX_PEERS,
    MAX_SEEN,
    MAX_SESSIONS_PER_PEER,
    Peer,
    Session,
)
from securechat.core.envelope import Reader
from securechat.core.keys import PublicIdentity
from securechat.core.x3dh import OneTimePrekeySecret, SignedPrekeySecret
from securechat.errors import InvalidPublicKeyError, SessionError

__all__ = ["MAX_PEERS", "CoreFields"]

STATE_MAGIC: Final = b"SCE2E"  # a full snapshot
CORE_MAGIC: Final = b"SCE2C"  # the row for prekeys and counters
PEER_MAGIC: Final = b"SCE2P"  # the row for one peer: sessions, seen sets, replay keys
VERSION: Final = 2
OLD_VERSION: Final = 1  # read, never written
MAX_NAME_BYTES: Final = 255
FLAG_PINNED: Final = 1
_U8: Final = struct.Struct(">B")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")


@dataclass(slots=True)
class CoreFields:
    identity_dh: bytes
    next_prekey_id: int
    signed: list[tuple[SignedPrekeySecret, int]]  # (key, retired_ms); [0] current
    one_time: dict[int, OneTimePrekeySecret]


# --- writing ------------------------------------------------------------------------------------


def core_row(fields: CoreFields) -> bytes:
    return CORE_MAGIC + _U8.pack(VERSION) + _encode_core(fields)


def peer_row(record: Peer) -> bytes:
    return PEER_MAGIC + _U8.pack(VERSION) + _encode_peer(record)


def snapshot(fields: CoreFields, records: list[Peer]) -> bytes:
    out = [STATE_MAGIC, _U8.pack(VERSION), _encode_core(fields), _U32.pack(len(records))]
    out += [_encode_peer(record) for record in records]
    return b"".join(out)


def _blob(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _encode_core(fields: CoreFields) -> bytes:
    out = [fields.identity_dh, _U32.pack(fields.next_prekey_id), _U8.pack(len(fields.signed))]
    for spk, retired in fields.signed:
        out += [spk.signed.encode(), spk.private, _U64.pack(retired)]
    out.append(_U32.pack(len(fields.one_time)))
    out += [o.prekey.encode() + o.private for o in fields.one_time.values()]
    return b"".join(out)


def _encode_peer(record: Peer) -> bytes:
    name = record.identity.name.encode()
    out = [record.identity.key_bytes, _U8.pack(len(name)), name]
    out += [_U8.pack(FLAG_PINNED if record.pinned else 0), _U8.pack(len(record.sessions))]
    for s in record.sessions:
        out += [s.peer.key_bytes, s.ad, s.ephemeral, _blob(s.initial or b"")]
        out.append(_blob(ratchet.serialize(s.state)))
    out.append(_U32.pack(len(record.seen_ids)))
    out += list(record.seen_ids)
    out.append(_U32.pack(len(record.seen_payloads)))
    out += [d + i + _U64.pack(ms) for d, (i, ms) in record.seen_payloads.items()]
    out.append(_U16.pack(len(record.ephemerals)))
    out += [ek + _U64.pack(ms) for ek, ms in record.ephemerals.items()]
    out.append(_U64.pack(record.floor_ms + 1))
    return b"".join(out)


# --- reading ------------------------------------------------------------------------------------


def parse_core_row(row: bytes) -> tuple[CoreFields, bool]:
    """(fields, whether the row is of the current version)."""
    r = Reader(row, _corrupt())
    version = _header(r, CORE_MAGIC, "an end-to-end state row")
    with _corrupt_as_session_error():
        fields = _decode_core(r, version)
        r.end()
    return fields, version == VERSION


def parse_peer_row(row: bytes) -> tuple[Peer, bool]:
    r = Reader(row, _corrupt())
    version = _header(r, PEER_MAGIC, "an end-to-end peer row")
    with _corrupt_as_session_error():
        record = _decode_peer(r, version)
        r.end()
    return record, version == VERSION


def parse_snapshot(data: bytes) -> tuple[CoreFields, list[Peer]]:
    r = Reader(data, _corrupt())
    version = _header(r, STATE_MAGIC, "an end-to-end state file")
    with _corrupt_as_session_error():
        fields = _decode_core(r, version)
        records = [_decode_peer(r, version) for _ in range(_bounded(r.u32(), MAX_PEERS))]
        r.end()
    return fields, records


def _header(r: Reader, magic: bytes, what: str) -> int:
    if r.take(len(magic)) != magic:
        raise SessionError(f"not {what}")
    version = r.u8()
    if version not in (OLD_VERSION, VERSION):
        raise SessionError(f"{what} of unsupported version {version} (written by a newer client?)")
    return version


def _decode_core(r: Reader, version: int) -> CoreFields:
    identity_dh, next_prekey_id = r.take(dh.KEY_SIZE), r.u32()
    if version == OLD_VERSION:
        r.u64()  # the shared replay floor of version 1: dropped (see the module docstring)
    signed = []
    for _ in range(_bounded(r.u8(), 1 + MAX_OLD_SIGNED_PREKEYS)):
        spk = x3dh.SignedPrekey.decode(r.take(x3dh.SIGNED_PREKEY_SIZE))
        signed.append((SignedPrekeySecret(spk, r.take(32)), r.u64()))
    one_time = {}
    for _ in range(_bounded(r.u32(), MAX_ONE_TIME_PREKEYS)):
        opk = x3dh.OneTimePrekey.decode(r.take(x3dh.ONE_TIME_PREKEY_SIZE))
        one_time[opk.prekey_id] = OneTimePrekeySecret(opk, r.take(32))
    if version == OLD_VERSION:
        for _ in range(_bounded(r.u32(), 4096)):  # version 1's shared ephemeral list
            r.take(32 + 8)
    return CoreFields(identity_dh, next_prekey_id, signed, one_time)


def _identity(raw: bytes, name: str) -> PublicIdentity:
    return PublicIdentity(raw[:32], raw[32:], name)


def _decode_peer(r: Reader, version: int) -> Peer:
    key_bytes = r.take(64)
    record = Peer(_identity(key_bytes, r.take(r.u8()).decode("utf-8")))
    if version == OLD_VERSION:
        record.pinned = True
    else:
        flags = r.u8()
        if flags & ~FLAG_PINNED:
            raise _corrupt()
        record.pinned = bool(flags & FLAG_PINNED)
    for _ in range(_bounded(r.u8(), MAX_SESSIONS_PER_PEER)):
        peer = _identity(r.take(64), record.identity.name)
        ad, ephemeral, initial = r.take(128), r.take(32), r.blob()
        state = ratchet.deserialize(r.blob())
        record.sessions.append(Session(peer, ad, ephemeral, initial or None, state))
    for _ in range(_bounded(r.u32(), MAX_SEEN)):
        record.seen_ids[r.take(envelope.MSG_ID_SIZE)] = None
    for _ in range(_bounded(r.u32(), MAX_SEEN)):
        digest = r.take(16)
        record.seen_payloads[digest] = (r.take(envelope.MSG_ID_SIZE), r.u64())
    if version != OLD_VERSION:
        for _ in range(_bounded(int.from_bytes(r.take(2), "big"), MAX_EPHEMERALS_PER_PEER)):
            ephemeral = r.take(32)  # read in file order (RHS of d[k] = v runs first)
            record.ephemerals[ephemeral] = r.u64()
        record.floor_ms = r.u64() - 1
    return record


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
