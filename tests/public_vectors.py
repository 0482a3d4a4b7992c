"""Where the public test vectors are, and what a test does when they are not there.

Noise (cacophony, snow) and Wycheproof vectors are read at test time from
``../shared/vectors/`` beside the checkout; they are not copied into the
project. A clone made on its own, as a new user makes it, has no such folder:
the tests that need those files are then skipped, with the path in the reason,
and every other test runs. ``.ci/run`` sets ``SECURECHAT_REQUIRE_VECTORS=1``,
which turns a missing file into a failure, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "vectors"
REQUIRE_ENV = "SECURECHAT_REQUIRE_VECTORS"


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
