"""Client-side end-to-end cost of one 1 KiB message against a raw libsodium box.

Why two E2E figures: a message in a one-way stream costs one symmetric
ratchet step (chain KDF, AEAD, header); a message that answers the peer's
last one also costs a Diffie-Hellman ratchet step (a fresh X25519 key pair
and two DH). The issue's target (seal+open <= 3x a precomputed ``Box``) is
judged on the stream; the ping-pong figure is printed beside it.

Each figure is the median over ``rounds`` of the mean time per operation
in a round, in-process, after a warm-up round.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

MESSAGE_BYTES = 1024


def _median_us(op: Callable[[], None], per_round: int, rounds: int) -> float:
    for _ in range(max(1, per_round // 10)):
        op()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(per_round):
            op()
        samples.append((time.perf_counter() - start) / per_round * 1e6)
    return statistics.median(samples)


def raw_box(per_round: int, rounds: int) -> float:
    """Precomputed ``nacl.public.Box``: encrypt (random nonce) + decrypt of 1 KiB."""
    from nacl.public import Box, PrivateKey

    a, b = PrivateKey.generate(), PrivateKey.generate()
    ab, ba = Box(a, b.public_key), Box(b, a.public_key)
    message = os.urandom(MESSAGE_BYTES)

    def op() -> None:
        ba.decrypt(ab.encrypt(message))

    return _median_us(op, per_round, rounds)


def _pair() -> tuple[Any, Any, Any, Any]:
    from securechat.core import keys
    from securechat.core.e2e import E2EState, parse_bundle

    alice = keys.generate_identity("alice", os.urandom(keys.SEED_SIZE))
    bob = keys.generate_identity("bob", os.urandom(keys.SEED_SIZE))
    a, b = E2EState.new(alice), E2EState.new(bob)
    now = int(time.time() * 1000)
    spk, otks = b.make_prekeys(os.urandom, now, one_time=1)
    bundle = parse_bundle(spk, otks[0])
    return alice, bob, (a, b), bundle


def _text_for_record(record_bytes: int) -> int:
    """The longest text whose padded content record is ``record_bytes`` long."""
    from securechat.core import envelope
    from securechat.core.envelope import Content

    n = record_bytes
    while len(envelope.encode_content(Content(bytes(16), 0, "x" * n))) > record_bytes:
        n -= 1  # encode_content returns the padded record
    return n


def e2e(per_round: int, rounds: int, text_bytes: int = MESSAGE_BYTES) -> dict[str, float]:
    """E2EState.encrypt + decrypt of ``text_bytes`` of text: stream and ping-pong.

    With 1 KiB of text the padded record is 2 KiB (the next bucket), twice what
    the raw box seals; ``record_1k`` in :func:`run` seals exactly 1 KiB.
    """
    from securechat.core.envelope import Content

    alice, bob, (a, b), bundle = _pair()
    text = "x" * text_bytes
    now = int(time.time() * 1000)
    counter = [0]

    def content() -> Content:
        counter[0] += 1
        return Content(counter[0].to_bytes(16, "big"), now, text)

    # first exchange: X3DH, then Bob answers so both sides are past the initial header
    b.decrypt(alice.public.dh, a.encrypt(bob.public, content(), os.urandom, now, bundle), now)
    a.decrypt(bob.public.dh, b.encrypt(alice.public, content(), os.urandom, now), now)

    def stream() -> None:
        b.decrypt(alice.public.dh, a.encrypt(bob.public, content(), os.urandom, now), now)

    turn = [False]

    def ping_pong() -> None:
        turn[0] = not turn[0]
        if turn[0]:
            b.decrypt(alice.public.dh, a.encrypt(bob.public, content(), os.urandom, now), now)
        else:
            a.decrypt(bob.public.dh, b.encrypt(alice.public, content(), os.urandom, now), now)

    return {
        "stream_us": _median_us(stream, per_round, rounds),
        "ping_pong_us": _median_us(ping_pong, per_round // 2, rounds),
    }


# --- persisting the client's E2E state ------------------------------------------------------------

SEEN_FULL = 4096  # e2e.MAX_SEEN: a busy peer's seen msg ids and payload digests
SKIPPED_FULL = 2000  # ratchet.MAX_SKIPPED_KEYS: message keys kept for late messages


def _busy_peer(me: Any, now: int) -> Any:
    """A peer that sent ``me`` SEEN_FULL messages and left SKIPPED_FULL keys skipped."""
    from securechat.core import keys, ratchet
    from securechat.core.envelope import Content

    peer = keys.generate_identity("peer", os.urandom(keys.SEED_SIZE))
    state = type(me).new(peer)
    sent = [0]

    def send() -> bytes:
        sent[0] += 1
        body = Content(os.urandom(16), now, "x")
        return state.encrypt(me.identity.public, body, os.urandom, now)  # type: ignore[no-any-return]

    for _ in range(SEEN_FULL):
        me.decrypt(peer.public.dh, send(), now)
    while sum(len(s.state.skipped) for s in me._peers[peer.public.dh].sessions) < SKIPPED_FULL:
        for _ in range(min(ratchet.MAX_SKIP, SKIPPED_FULL)):
            send()  # lost on the way: their keys stay skipped
        me.decrypt(peer.public.dh, send(), now)
    return peer


def state_write(peers: int, messages: int = 40) -> dict[str, float]:
    """Per message sent to one of ``peers`` busy peers: persist the E2E state, old vs new way.

    ``before``: serialize the whole state, seal it, write it (schema 1, one blob).
    ``after``: ``take_changes`` (that peer's row only), seal, write (schema 2).
    Both include the encrypt that changes the state (tens of us) and a real
    SQLite transaction (WAL, synchronous=FULL) in a temporary directory, so
    the fsync of the machine's disk is part of the figure.
    """
    import tempfile
    from pathlib import Path

    from securechat.client.store import ClientStore, StoreKeys
    from securechat.core import keys
    from securechat.core.e2e import E2EState
    from securechat.core.envelope import Content

    me = E2EState.new(keys.generate_identity("me", os.urandom(keys.SEED_SIZE)))
    now = int(time.time() * 1000)
    busy = [_busy_peer(me, now) for _ in range(peers)]
    target = busy[0].public
    result: dict[str, float] = {"peers": peers}
    with tempfile.TemporaryDirectory() as tmp:
        store = ClientStore(
            Path(tmp) / "bench.state.db", StoreKeys(os.urandom(32), os.urandom(32), os.urandom(32))
        )
        try:
            for mode in ("before", "after"):
                me.take_changes()
                written, samples = [0.0], []
                for _ in range(messages + 3):
                    start = time.perf_counter()
                    me.encrypt(target, Content(os.urandom(16), now, "x"), os.urandom, now)
                    with store.transaction():
                        if mode == "before":
                            blob = me.serialize()
                            store.put_blob("e2e_state", blob)
                            written[0] = len(blob) + 40  # nonce + tag
                        else:
                            changes = me.take_changes()
                            written[0] = store.put_e2e_rows(changes.core, changes.peers)
                    samples.append((time.perf_counter() - start) * 1e6)
                result[f"{mode}_us"] = statistics.median(samples[3:])
                result[f"{mode}_bytes"] = written[0]
        finally:
            store.close()
    return result


def run(quick: bool) -> dict[str, Any]:
    per_round, rounds = (300, 3) if quick else (2000, 7)
    result: dict[str, Any] = {"box_us": raw_box(per_round * 5, rounds)}
    try:
        result.update(e2e(per_round, rounds))
        text = _text_for_record(MESSAGE_BYTES)
        result["record_1k_text_bytes"] = text
        result["record_1k_us"] = e2e(per_round, rounds, text)["stream_us"]
        if not quick:
            result["state_write"] = [state_write(1), state_write(20)]
    except Exception as exc:  # report, do not crash the whole benchmark
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


if __name__ == "__main__":
    print(run(quick=True))
