"""The package's structure: imports follow the pipeline's stages, no module imports itself back
through others, and the core never loads Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"pruner": ROOT / "pruner", "pruner.callbacks": ROOT / "callbacks",
                "pruner.lightning_modules": ROOT / "lightning_modules"}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name (callbacks/ and lightning_modules/
    install as pruner.callbacks and pruner.lightning_modules)."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (function-local imports
    too: a lazy import that runs back up is a cycle waiting for its caller)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    # a module's own packages are imported before it (Python's rule), not because of it
    return {t for t in found if not name.startswith(t + ".")}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_the_package_imports_itself_back_through_others():
    edges = graph()
    assert len(edges) > 40  # every module was read
    assert cycles(edges) == []


def test_the_core_never_imports_the_lightning_layer():
    lightning_side = ("pruner.callbacks", "pruner.lightning_modules")
    for name, targets in graph().items():
        if not name.startswith(lightning_side) and name != "pruner.__main__":  # the CLI entry dispatches to both
            assert not [t for t in targets if t.startswith(lightning_side)], name


def test_importing_pruner_loads_no_lightning():
    code = "import sys, pruner, pruner.loop, pruner.io, pruner.data; print(any(m.startswith('lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_no_module_is_longer_than_a_sitting():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 620}
    assert long == {}
