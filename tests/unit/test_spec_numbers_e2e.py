"""Every number docs/protocol.md states for identities, the E2E layer and the client is
the code's constant (issue 13: the spec and the product must not drift apart again).

Each row names a phrase of the spec with one number in it and the constant it must
equal; a changed constant, or a spec edited without the code, fails here.
"""

from __future__ import annotations

import re

import pytest
from securechat.client import messenger, prekeys, receipts, session
from securechat.core import envelope, keys, ratchet, x3dh
from securechat.core.e2e import records

from paths import DOCS

SPEC = (DOCS / "protocol.md").read_text()
DAY_MS = 24 * 3600 * 1000


def _numbers(text: str) -> list[int]:
    return [int(n.replace(" ", "").replace(",", "")) for n in re.findall(r"\d[\d ,]*\d|\d", text)]


# (a regex whose group 1 holds the number, the value the code has)
ROWS: list[tuple[str, int]] = [
    (r"1 to (\d+) characters", keys.MAX_NAME),
    (r"`(\d+) <= opslimit", keys.MIN_OPSLIMIT),
    (r"opslimit <= (\d+)`", keys.MAX_OPSLIMIT),
    (r"`(\d+) <= memlimit", keys.MIN_MEMLIMIT),
    (r"`opslimit = (\d)`", keys.DEFAULT_OPSLIMIT),
    (r"`memlimit = (\d+)`", keys.DEFAULT_MEMLIMIT),
    (r"Signed prekey blob, (\d+) bytes", x3dh.SIGNED_PREKEY_SIZE),
    (r"`SPK_ROTATION_MS` \((\d+) days\)", records.SPK_ROTATION_MS // DAY_MS),
    (r"`SPK_GRACE_MS` \((\d+) days\)", records.SPK_GRACE_MS // DAY_MS),
    (r"`MAX_OLD_SIGNED_PREKEYS` \((\d+)\)", records.MAX_OLD_SIGNED_PREKEYS),
    (r"`MAX_ONE_TIME_PREKEYS` \((\d+)\)", records.MAX_ONE_TIME_PREKEYS),
    (r"Header \((\d+) bytes\)", ratchet.HEADER_SIZE),
    (r"`MAX_SKIP = (\d+)`", ratchet.MAX_SKIP),
    (r"`MAX_SKIPPED_KEYS = (\d+)`", ratchet.MAX_SKIPPED_KEYS),
    (r"`MAX_ENVELOPE_SIZE` = (\d+ \d+) bytes", envelope.MAX_ENVELOPE_SIZE),
    (r"X3DH header \((\d+) bytes", envelope.X3DH_HEADER_SIZE),
    (r"minus\s+(\d+) \(its", ratchet.OVERHEAD),
    (r"2 <= count <= (\d+)", envelope.MAX_GROUP_MEMBERS),
    (r"text \(UTF-8, <= (\d+ \d+) bytes\)", envelope.MAX_TEXT_BYTES),
    (r"count:u16 \(1\.\.(\d+)\)", envelope.MAX_CONTROL_IDS),
    (r"among the\s+last (\d+) opened", records.MAX_SEEN),
    (r"\((\d+) days = signed-prekey", records.REPLAY_WINDOW_MS // DAY_MS),
    (r"and (\d) hour\)", records.MAX_CLOCK_SKEW_MS // 3_600_000),
    (r"\(at most (\d+) per\s+peer", records.MAX_EPHEMERALS_PER_PEER),
    (r"`MAX_UNPINNED_PEERS` \((\d+)\)", records.MAX_UNPINNED_PEERS),
    (r"sender of (\d+) steps per second", records.WORK_PER_SECOND),
    (r"(\d+ \d+) at\s+most", records.WORK_BURST),
    (r"a DH step counts (\d+)", ratchet.DH_STEP_COST),
    (r"an X3DH (\d+)\)", records.X3DH_COST),
    (r"\(at most (\d), most recently used first\)", records.MAX_SESSIONS_PER_PEER),
    (r"no answer within (\d+) s", int(prekeys.FETCH_TIMEOUT)),
    (r"every (\d+) s\)", int(session.HELD_RETRY)),
    (r"\(up to (\d+) ids\)", envelope.MAX_CONTROL_IDS),
    (r"at most one per peer per (minute)", int(receipts.REJECT_INTERVAL)),
    (r"one-time prekeys up to\s+(\d+)", session.PREKEY_TARGET),
    (r"count is below (\d+)", session.PREKEY_LOW_WATER),
    (r"Ping every (\d+) s", int(messenger.PING_INTERVAL)),
    (r"up to (\d+) s; a changed relay", int(messenger.BACKOFF_MAX)),
]


@pytest.mark.parametrize(("phrase", "value"), ROWS, ids=[r[0][:40] for r in ROWS])
def test_the_spec_states_the_codes_number(phrase: str, value: int) -> None:
    match = re.search(phrase, SPEC)
    assert match is not None, f"the spec no longer says {phrase!r}"
    stated = match.group(1)
    number = 60 if stated == "minute" else _numbers(stated)[0]
    assert number == value, f"spec says {stated} for {phrase!r}, the code has {value}"


def test_the_padding_buckets_are_the_codes() -> None:
    match = re.search(r"to the smallest of ([\d,\s]+) bytes", SPEC)
    assert match is not None
    stated = tuple(int(n) for n in re.findall(r"\d+", match.group(1)))
    assert stated == envelope.PAD_BUCKETS


def test_backoff_starts_where_the_spec_says() -> None:
    assert "from 0.25 s up to" in SPEC and messenger.BACKOFF_INITIAL == 0.25
