"""Import structure of the nbtorch package: every import at the top of its file, and no import cycle between modules
(the old ``types → validate → detector → types`` cycle forced imports into function bodies)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "nbtorch"
#: Imports allowed inside functions: optional dependencies, and the io package's own lazy imports (it keeps torch,
#: h5py, gemmi and fabio out of its import time).
LAZY_OK_MODULES = {"gemmi", "h5py", "fabio", "matplotlib", "torch"}
LAZY_OK_DIRS = {"io"}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> list:
    """Absolute names of the nbtorch modules an ``ImportFrom`` node imports."""
    if node.level == 0:
        return [node.module] if node.module and node.module.startswith("nbtorch") else []
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    out = [target]
    if node.module is None:  # from .. import lattice: the submodule when there is one
        out = [f"{target}.{a.name}" for a in node.names]
    return out


def _existing(name: str, known: set) -> str:
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_import_sits_at_the_top_of_its_file():
    bad = []
    for module, path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            in_io = module.split(".")[1:2] == ["io"] and "io" in LAZY_OK_DIRS
            optional = all(n.split(".")[0] in LAZY_OK_MODULES for n in names)
            guarded = isinstance(node, ast.ImportFrom) and node.module == "torch._C._functorch"
            if not (optional or in_io or guarded):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    assert not bad, "imports inside functions (move them to the top of the file): " + ", ".join(bad)


def test_module_imports_have_no_cycle():
    graph = {}
    mods = dict(_modules())
    known = set(mods)
    for module, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                deps.update(_existing(n, known) for n in _resolve(module, path, node))
            elif isinstance(node, ast.Import):
                deps.update(_existing(a.name, known) for a in node.names if a.name.startswith("nbtorch"))
        # a module importing its own package's __init__ is how Python loads it anyway: not a cycle
        graph[module] = {d for d in deps if d in known and d != module and not module.startswith(d + ".")}

    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert {"nbtorch.types", "nbtorch.validate", "nbtorch.detector"} <= set(graph)
    assert "nbtorch.detector" not in graph["nbtorch.setup_checks"] | graph["nbtorch.pytree"]


def test_pytree_helpers_are_one_implementation_exported_everywhere():
    import nbtorch
    import nbtorch.pytree as pytree
    import nbtorch.types as types

    for name in ("tree_map", "tree_leaves", "get_leaf", "replace_leaf"):
        assert getattr(nbtorch, name) is getattr(pytree, name) is getattr(types, name)
