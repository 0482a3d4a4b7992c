"""Import directions: the relay cannot reach the E2E core; wire.py stays pure."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "securechat"
FORBIDDEN_FOR_RELAY = {"keys", "x3dh", "ratchet", "envelope", "keystore", "client", "ui"}
IMPURE = {"socket", "threading", "os", "time", "sys", "selectors", "sqlite3", "subprocess"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


RELAY_FILES = sorted((PKG / "relay").glob("*.py"))


@pytest.mark.parametrize("path", RELAY_FILES, ids=[p.name for p in RELAY_FILES])
def test_relay_never_imports_e2e_core(path: Path) -> None:
    for name in imported_modules(path):
        parts = name.split(".")
        if parts[0] == "securechat" and len(parts) > 1:
            assert parts[1] not in FORBIDDEN_FOR_RELAY, f"{path.name} imports {name}"


def test_relay_dependencies_transitively_clean() -> None:
    """Follow securechat.* imports from the relay: none reaches the E2E core."""
    seen: set[str] = set()
    todo = [f"securechat.relay.{p.stem}" for p in RELAY_FILES]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        rel = mod.split(".")[1:]
        candidates = [PKG.joinpath(*rel).with_suffix(".py"), PKG.joinpath(*rel, "__init__.py")]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            continue
        assert rel[0] not in FORBIDDEN_FOR_RELAY, f"relay reaches {mod}"
        todo += [n for n in imported_modules(path) if n.startswith("securechat.")]


def test_wire_is_pure() -> None:
    for name in imported_modules(PKG / "wire.py"):
        assert name.split(".")[0] not in IMPURE, f"wire.py imports {name}"
