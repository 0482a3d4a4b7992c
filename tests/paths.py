"""Where things are, for tests in any folder below ``tests/``."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PKG = REPO / "securechat"
DOCS = REPO / "docs"
VECTORS = TESTS / "vectors"
