"""The layering of STYLE.md, checked by walking every import with ``ast``.

* ``securechat.core`` is the sans-I/O core: it imports only ``core`` and ``errors``
  of ours, and nothing from the standard library that touches the world (sockets,
  threads, files, clocks, the environment).
* The relay imports of the core only what routing needs (``wire``, ``noise``,
  ``encoding``, ``dh``): never the end-to-end modules, so it cannot decrypt even by
  mistake; and nothing of the client side.
* Shells are never imported by the core; the client never imports the relay;
  ``errors`` imports nothing of ours and ``files`` only ``errors``.
* Nothing imports in a circle (imports under ``if TYPE_CHECKING:`` count too: a
  cycle for the type checker is still two modules that each need the other).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "securechat"
IMPURE = {
    "socket", "selectors", "threading", "asyncio", "os", "sys", "time", "sqlite3",
    "subprocess", "pathlib", "shutil", "tempfile", "io", "logging", "random", "secrets",
    "signal", "fcntl", "getpass", "datetime",
}  # fmt: skip
RELAY_MAY_USE = {
    "securechat.core.wire",
    "securechat.core.noise",
    "securechat.core.encoding",
    "securechat.core.dh",
}
LAYERS = {  # a module under the key may import ours only from these prefixes
    "securechat.errors": (),
    "securechat.files": ("securechat.errors",),
    "securechat.core": ("securechat.core", "securechat.errors"),
    "securechat.relay": (
        "securechat.relay",
        "securechat.errors",
        "securechat.files",
        *RELAY_MAY_USE,
    ),
    "securechat.client": (
        "securechat.client",
        "securechat.core",
        "securechat.errors",
        "securechat.files",
    ),
    "securechat.daemon": (
        "securechat.daemon",
        "securechat.client",
        "securechat.core",
        "securechat.errors",
        "securechat.files",
        "securechat.__version__",
    ),
    "securechat.ui": (
        "securechat.ui",
        "securechat.daemon",
        "securechat.client",
        "securechat.core",
        "securechat.errors",
    ),
    "securechat.cli": ("securechat",),
    "securechat.__main__": ("securechat.cli",),
    "securechat": ("securechat.__version__",),
}


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_name(p): p for p in PKG.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports(module: str) -> frozenset[str]:
    """Every module (ours or not) that ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            found |= submodules
            if len(submodules) < len(node.names):  # names from the module itself
                found.add(base)
    return frozenset(found)


def ours(module: str) -> set[str]:
    return {m for m in imports(module) if m in MODULES and m != module}


def _layer(module: str) -> str:
    return max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("securechat.core")))
def test_the_core_touches_nothing_outside(module: str) -> None:
    for name in imports(module):
        assert name.split(".")[0] not in IMPURE, f"core module {module} imports {name}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_follows_the_layers(module: str) -> None:
    allowed = LAYERS[_layer(module)]
    for name in ours(module):
        assert name.startswith(allowed) or name == "securechat", (
            f"{module} imports {name}; its layer may import only {allowed}"
        )


def test_the_relay_cannot_reach_the_end_to_end_code() -> None:
    """Transitively: nothing the relay imports leads to keys, x3dh, ratchet, envelope, e2e."""
    seen: set[str] = set()
    todo = [m for m in MODULES if m.startswith("securechat.relay")]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if module.startswith("securechat.core"):
            allowed = module in RELAY_MAY_USE or module.startswith(
                tuple(m + "." for m in RELAY_MAY_USE)
            )
            assert allowed, f"the relay reaches {module}"
        todo += ours(module)


def _cycles() -> Iterator[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    counter = [0]

    def visit(v: str) -> Iterator[list[str]]:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(ours(v)):
            if w not in index:
                yield from visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                yield sorted(component)

    for module in sorted(MODULES):
        if module not in index:
            yield from visit(module)


def test_no_import_cycle() -> None:
    """No import cycle anywhere in the package: a cycle hides which layer depends on which."""
    found = list(_cycles())
    assert not found, f"import cycles: {found}"


def test_a_cycle_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The detector itself: two modules that import each other are reported."""
    a, b = "securechat.errors", "securechat.files"
    real = ours

    def fake(module: str) -> set[str]:
        return {b} if module == a else {a} if module == b else real(module)

    monkeypatch.setitem(globals(), "ours", fake)
    assert any({a, b} <= set(c) for c in _cycles())
