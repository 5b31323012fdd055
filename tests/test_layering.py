"""The package's layers, read from its source with `ast` (nothing of qcompiler is imported).

Two rules (issue 13, part 4):

1. No import cycle between modules of qcompiler/. Every `import` / `from ... import` statement counts,
   wherever it stands: a function-level ("lazy") import is still a dependency, it only hides the cycle
   until run time; `if TYPE_CHECKING:` imports count too. Not counted: the implicit import of the parent
   packages (`import qcompiler.passes.base` runs passes/__init__.py, which imports every pass; counting that
   would make every `from .base import Pass` a cycle, and it is the registry's documented shape).
   `from pkg import name` is an edge to the submodule pkg.name when that module exists, else to pkg.
2. Nothing in qcompiler/ir/, qcompiler/calibration/ or qcompiler/passes/ (the target-neutral passes; a
   backend's lowering lives in the backend) imports qcompiler/backends/. Backends import the IR and passes, never the reverse: a pass
   that needs a target fact receives it through the target / capability object the driver hands it.

Each failure lists every violation (module -> module, file:line), so the first red run is the to-do list.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "qcompiler"
NEUTRAL = ("qcompiler.ir", "qcompiler.calibration", "qcompiler.passes")
BACKENDS = "qcompiler.backends"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """Absolute module named by `from X import ...` in module `mod` (relative levels resolved)."""
    if node.level == 0:
        return node.module or ""
    base = mod.split(".")
    if not is_pkg:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest qcompiler module that `name` (a dotted path) lies in, or None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges() -> list[tuple[str, str, str]]:
    """(importer, imported, "file:line") for every import between two qcompiler modules."""
    modules = _modules()
    edges = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node)
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else base)
            where = f"{path.relative_to(PKG.parent)}:{getattr(node, 'lineno', 0)}"
            for owner in dict.fromkeys(_owner(t, modules) for t in targets):
                if owner is not None and owner != mod:
                    edges.append((mod, owner, where))
    return edges


def _graph(edges) -> nx.DiGraph:
    g = nx.DiGraph()
    for a, b, where in edges:
        if g.has_edge(a, b):
            g[a][b]["where"].append(where)
        else:
            g.add_edge(a, b, where=[where])
    return g


def cycles(edges) -> list[str]:
    """One line per strongly connected component of more than one module, with its edges."""
    g = _graph(edges)
    out = []
    for comp in nx.strongly_connected_components(g):
        if len(comp) < 2:
            continue
        inner = sorted(f"{a} -> {b} ({', '.join(d['where'])})"
                       for a, b, d in g.subgraph(comp).edges(data=True))
        out.append(f"cycle among {sorted(comp)}:\n    " + "\n    ".join(inner))
    return sorted(out)


def _in(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def backend_imports(edges) -> list[str]:
    return sorted(f"{a} -> {b} ({where})" for a, b, where in edges
                  if any(_in(a, p) for p in NEUTRAL) and _in(b, BACKENDS))


def test_reader_sees_the_package():
    """The reader must find real edges (an empty graph would pass both rules vacuously)."""
    edges = import_edges()
    pairs = {(a, b) for a, b, _ in edges}
    assert ("qcompiler.driver", "qcompiler.passes.manager") in pairs or \
        ("qcompiler.passes", "qcompiler.passes.manager") in pairs
    assert len(_modules()) > 50 and len(pairs) > 100


def test_reader_finds_a_cycle_and_a_backend_import():
    """The two checks fire on a made-up graph (relative, lazy and absolute imports alike)."""
    edges = [("qcompiler.a", "qcompiler.b", "a.py:1"), ("qcompiler.b", "qcompiler.a", "b.py:9"),
             ("qcompiler.passes.x", "qcompiler.backends.ascend.ops", "x.py:3"),
             ("qcompiler.backends.ascend.ops", "qcompiler.ir.meta", "ops.py:2")]
    assert len(cycles(edges)) == 1 and "a.py:1" in cycles(edges)[0]
    assert backend_imports(edges) == ["qcompiler.passes.x -> qcompiler.backends.ascend.ops (x.py:3)"]


def test_no_import_cycles():
    found = cycles(import_edges())
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(found)


def test_target_neutral_code_does_not_import_backends():
    found = backend_imports(import_edges())
    assert not found, f"{len(found)} import(s) from ir/, calibration/ or passes/ into backends/:\n" + "\n".join(found)
