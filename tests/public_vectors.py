"""Where the public test vectors are, and what a test does when they are not there.

Noise (cacophony, snow) and Wycheproof vectors are read at test time from
``../shared/vectors/`` beside the checkout when that folder exists: the full
published files. A clone made on its own, as a new user makes it, has no such
folder: the tests then read the subsets shipped in ``tests/vectors/public/``
(the same layout; provenance and licences in its README), so a user's own run
checks them too. ``.ci/run`` sets ``SECURECHAT_REQUIRE_VECTORS=1``, which makes
the full files mandatory: a missing one is a failure, so CI cannot pass on the
subsets or by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_ENV = "SECURECHAT_REQUIRE_VECTORS"
FULL = Path(__file__).resolve().parents[2] / "shared" / "vectors"
BUNDLED = Path(__file__).resolve().parent / "vectors" / "public"
# The folder the tests read: the full files when present (or required), else the subsets.
SHARED = FULL if FULL.is_dir() or os.environ.get(REQUIRE_ENV) == "1" else BUNDLED
USING_FULL = SHARED == FULL


def missing(path: Path) -> None:
    """A vector file is absent: fail when it is required (CI), else skip."""
    message = f"public test vectors not found at {path} (see tests/public_vectors.py)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message)
    pytest.skip(message)


def require(path: Path) -> Path:
    """``path`` if it exists; otherwise :func:`missing` (skip or fail)."""
    if not path.exists():
        missing(path)
    return path
