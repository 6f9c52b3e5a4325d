"""Structural guards over the two packages, read with ``ast`` only (nothing is imported, so they run in a second):

* no function (``def``, methods and nested functions included) longer than :data:`MAX_FUNCTION_LINES` lines;
* no import cycle between modules, counting every import of a module: at the top, inside functions and under
  ``if TYPE_CHECKING`` (a cycle hidden by a function-level import is still one).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nbtorch", "refine")
#: Longest function allowed, in lines from ``def`` to its last line (``end_lineno − lineno + 1``).
MAX_FUNCTION_LINES = 80


def package_modules(root: Path, packages) -> Dict[str, Path]:
    """``{dotted module name: path}`` of every ``.py`` file under ``root/<package>`` (``__init__`` → the package)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _nearest(name: str, known) -> str | None:
    """``name`` if it is a known module, else its closest known parent package (None outside the packages)."""
    while name not in known:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def _targets(module: str, path: Path, node, known) -> List[str]:
    """The known modules an import node imports: ``import a.b`` → a.b; ``from p import n`` → p.n when that is a
    module, else p (its ``__init__``); relative imports resolved against ``module``'s package."""
    if isinstance(node, ast.Import):
        return [_nearest(a.name, known) for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    return [_nearest(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, known) for a in node.names]


def import_graph(root: Path, packages) -> Dict[str, Dict[str, str]]:
    """``{module: {imported module: 'file:line' of its first import}}`` over the packages' modules, from every
    import statement anywhere in each file.  The implicit import of a module's parent packages is not an edge."""
    mods = package_modules(root, packages)
    graph: Dict[str, Dict[str, str]] = {}
    for module, path in mods.items():
        edges = graph.setdefault(module, {})
        for node in ast.walk(_tree(path)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for dep in _targets(module, path, node, mods):
                if dep is not None and dep != module:
                    edges.setdefault(dep, f"{path.relative_to(root)}:{node.lineno}")
    return graph


def import_cycles(graph: Dict[str, Dict[str, str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (each a sorted list), by Tarjan's algorithm
    written iteratively."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack, stack, out = set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    scc.append(m)
                    if m == node:
                        break
                if len(scc) > 1:
                    out.append(sorted(scc))
    return sorted(out)


def _describe(cycle: List[str], graph) -> str:
    inside = set(cycle)
    edges = [f"    {a} → {b}  ({graph[a][b]})" for a in cycle for b in sorted(graph[a]) if b in inside]
    return "  cycle of " + ", ".join(cycle) + ":\n" + "\n".join(edges)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_80_lines(package):
    long = []
    for module, path in package_modules(ROOT, [package]).items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"  {path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, (f"functions longer than {MAX_FUNCTION_LINES} lines in {package}/ (split them into named "
                      "steps):\n" + "\n".join(long))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph = import_graph(ROOT, PACKAGES)
    assert {"nbtorch.simulate", "nbtorch.io.images", "refine"} <= set(graph)  # the walk found the packages
    cycles = [c for c in import_cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, (f"import cycles in {package}/ (imports inside functions count: move the shared piece to a "
                        "module both can import):\n" + "\n".join(_describe(c, graph) for c in cycles))


#: refine's layers, top to bottom (docs/refine.md): each imports only the layers before it.
REFINE_LAYERS = (("model",), ("targets",), ("minimise",), ("pipeline",), ("imagelist", "studies", "scaleout"),
                 ("ensemble",), ("cli",))


def test_refine_layers_import_only_the_layers_above():
    """model ← targets ← minimise ← pipeline ← studies / scaleout ← ensemble ← cli: no module of a layer imports one
    of a later layer (the package ``refine`` itself re-exports and is left out)."""
    rank = {name: k for k, layer in enumerate(REFINE_LAYERS) for name in layer}
    layer = (lambda m: rank.get(m.split(".")[1]) if m.startswith("refine.") else None)
    graph = import_graph(ROOT, PACKAGES)
    assert set(rank) <= {m.split(".")[1] for m in graph if m.startswith("refine.")}
    wrong = [f"  {m} -> {d} ({where})" for m, deps in graph.items() for d, where in deps.items()
             if layer(m) is not None and layer(d) is not None and layer(d) > layer(m)]
    assert not wrong, "a refine layer imports a later one:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------------------------------------------
# the guard itself


def _write(root: Path, files: Dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import g\n",
        "pkg/b.py": "def g():\n    from pkg import c\n    return c\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\n",
        "pkg/d.py": "import pkg.a\n",  # imports into the cycle, is not part of it
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.b"] == {"pkg.c": "pkg/b.py:2"} and graph["pkg.c"] == {"pkg.a": "pkg/c.py:3"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert "pkg.b → pkg.c  (pkg/b.py:2)" in _describe(["pkg.a", "pkg.b", "pkg.c"], graph)


def test_cycle_finder_passes_a_chain_and_resolves_names_to_modules(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .sub import helper\n",
        "pkg/sub/__init__.py": "from .x import helper\n",
        "pkg/sub/x.py": "from ..y import VALUE\nfrom .. import y\n\ndef helper():\n    import pkg.y.z\n",
        "pkg/y.py": "VALUE = 1\n",
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert set(graph["pkg"]) == {"pkg.sub"} and set(graph["pkg.sub"]) == {"pkg.sub.x"}
    assert set(graph["pkg.sub.x"]) == {"pkg.y"}  # a name in a module, the module itself, an attribute path
    assert import_cycles(graph) == []
    _write(tmp_path, {"pkg/y.py": "from pkg import helper\n"})  # a name the package's __init__ holds → the package
    assert import_cycles(import_graph(tmp_path, ["pkg"])) == [["pkg", "pkg.sub", "pkg.sub.x", "pkg.y"]]
