"""The layering of STYLE.md, checked: a pure core, shells around it, imports inward only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "securechat"
CORE = ("errors", "dh", "encoding", "keys", "wire", "noise", "x3dh", "ratchet", "envelope", "e2e",
        "invite")
SHELLS = {"relay", "client", "ui", "cli", "keystore", "demo", "__main__"}
# The relay routes ciphertext; it must not be able to decrypt even by mistake.
FORBIDDEN_FOR_RELAY = {"keys", "x3dh", "ratchet", "envelope", "e2e", "keystore", "client", "ui",
                       "invite"}  # nor run an invite's PAKE
RELAY_FILES = sorted((PKG / "relay").glob("*.py"))
# The core takes bytes, randomness and time as arguments: nothing that touches the
# outside world, starts threads or reads the clock.
IMPURE = {
    "socket", "selectors", "threading", "asyncio", "os", "sys", "time", "sqlite3",
    "subprocess", "pathlib", "shutil", "tempfile", "io", "logging", "random", "secrets",
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_imports(module: str) -> set[str]:
    """Imports of a top-level module: one file, or every file of a package."""
    if (PKG / module).is_dir():
        return set().union(*(_imports(p) for p in sorted((PKG / module).glob("*.py"))))
    return _imports(PKG / f"{module}.py")


@pytest.mark.parametrize("module", CORE)
def test_core_module_is_pure(module: str) -> None:
    for name in _module_imports(module):
        top = name.split(".")[0]
        assert top not in IMPURE, f"core module {module} imports {name}"


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_a_shell(module: str) -> None:
    for name in _module_imports(module):
        parts = name.split(".")
        if parts[0] == "securechat" and len(parts) > 1:
            assert parts[1] not in SHELLS, f"core module {module} imports shell {name}"


def test_errors_imports_nothing_of_ours() -> None:
    assert not [n for n in _imports(PKG / "errors.py") if n.startswith("securechat")]


def test_every_module_is_classified() -> None:
    """A new top-level module must be placed in the core or the shells on purpose."""
    found = {p.stem for p in PKG.glob("*.py")} | {p.name for p in PKG.iterdir() if p.is_dir()
                                                  and (p / "__init__.py").exists()}
    unclassified = found - set(CORE) - SHELLS - {"__init__"}
    assert not unclassified, f"classify these as core or shell: {sorted(unclassified)}"


@pytest.mark.parametrize("path", RELAY_FILES, ids=[p.name for p in RELAY_FILES])
def test_relay_never_imports_e2e_core(path: Path) -> None:
    for name in _imports(path):
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
        todo += [n for n in _imports(path) if n.startswith("securechat.")]
