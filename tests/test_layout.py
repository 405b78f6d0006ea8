"""The package's layers: data flows one way, and nothing below the tools imports upward.

Every import statement of the package (at module level or inside a function) is read from the source,
so a lazy import that reaches up is caught as surely as a top-level one.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "vmsd"

# What each layer may import from the package (besides itself and the layers it lists).
ALLOWED: dict[str, tuple[str, ...]] = {
    "vmsd.runtime": (),
    # The CPR state's layout is a shipped spec: the engine reads and writes it with the generated classes.
    "vmsd.migration": ("vmsd.runtime", "vmsd.generated"),
    "vmsd.generated": ("vmsd.runtime",),
    # The language's tables live in the runtime, where generated code and the interpretive decoder read them.
    "vmsd.grammar": ("vmsd.runtime.kinds", "vmsd.runtime.scalars"),
    "vmsd.codegen": ("vmsd.grammar", "vmsd.runtime", "vmsd.__init__"),
    "vmsd.qemu": ("vmsd.runtime", "vmsd.migration", "vmsd.generated"),
    "vmsd.testing": ("vmsd.runtime", "vmsd.migration"),
    # Everything but the CLI, which sits on top of the tools.
    "vmsd.tools": ("vmsd.runtime", "vmsd.migration", "vmsd.generated", "vmsd.qemu", "vmsd.grammar", "vmsd.codegen",
                   "vmsd.testing", "vmsd.bundled"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The vmsd modules ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vmsd"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("vmsd"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "generated" not in p.parts}


def _layer(module: str) -> str | None:
    return next((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), None)


@pytest.mark.parametrize("layer", list(ALLOWED))
def test_layers_import_only_downward(layer: str) -> None:
    paths = [p for m, p in _modules().items() if _layer(m) == layer]
    if layer == "vmsd.generated":
        paths = list((PACKAGE / "generated").rglob("*.py"))
    assert paths
    allowed = (layer, *ALLOWED[layer])
    wrong = sorted(
        f"{p.relative_to(SRC)}: {imp}"
        for p in paths
        for imp in _imports(p)
        if imp != "vmsd" and not any(imp == a or imp.startswith(a + ".") for a in allowed)
    )
    assert not wrong, "imports reaching up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            cycle = [*path[path.index(m):], m]
            # A package importing its own submodules (to re-export them) is not a cycle of modules.
            if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in itertools.pairwise(cycle)):
                pytest.fail("import cycle: " + " -> ".join(cycle))
            return
        if m in done:
            return
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
