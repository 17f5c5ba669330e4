"""The import graph follows the layer order written in fft_dist/__init__.py: no import points up,
and no two modules import each other (directly or through others), lazy imports included."""
from __future__ import annotations

import ast
from pathlib import Path

import fft_dist
from helpers import REPO

PACKAGE = REPO / "fft_dist"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every fft_dist module `path` imports, at any depth of its code (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fft_dist")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fft_dist"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules} - {module_name(path)}


def layer_of(module: str, layers: list[list[str]]) -> int:
    for i, names in enumerate(layers):
        for name in names:
            if module == f"fft_dist.{name}" or module.startswith(f"fft_dist.{name}."):
                return i
    raise AssertionError(f"{module} is in no layer of fft_dist.LAYERS; add it there")


def test_every_import_points_down_the_layers():
    layers = fft_dist.LAYERS
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        if me == "fft_dist":
            continue
        mine = layer_of(me, layers)
        for other in sorted(imports_of(path)):
            if other == "fft_dist":
                continue
            theirs = layer_of(other, layers)
            if theirs > mine:
                bad.append(f"{me} (layer {mine}) imports {other} (layer {theirs})")
    assert not bad, "imports against the layer order:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    # a package's __init__ re-exporting its own modules is not a cycle of concepts
    graph = {m: {o for o in deps if not m.startswith(o + ".") and not (o.startswith(m + ".") and m in ("fft_dist",))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long, long


def test_no_test_or_benchmark_code_in_the_package():
    names = [p.name for p in PACKAGE.rglob("*.py")]
    assert not [n for n in names if n.startswith(("test", "bench")) or n in ("testing.py", "conftest.py")], names
