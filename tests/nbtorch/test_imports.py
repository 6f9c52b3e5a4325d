"""Import structure of the nbtorch package: every import at the top of its file, and no import cycle between modules
(the old ``types → validate → detector → types`` cycle forced imports into function bodies)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.test_guards import import_cycles, import_graph, package_modules

PKG = Path(__file__).resolve().parents[2] / "nbtorch"
#: Imports allowed inside functions: optional dependencies, and the io package's own lazy imports (it keeps torch,
#: h5py, gemmi and fabio out of its import time).
LAZY_OK_MODULES = {"gemmi", "h5py", "fabio", "matplotlib", "torch"}
LAZY_OK_DIRS = {"io"}


def test_every_import_sits_at_the_top_of_its_file():
    bad = []
    for module, path in package_modules(PKG.parent, ["nbtorch"]).items():
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
    graph = import_graph(PKG.parent, ["nbtorch"])  # imports inside functions count too
    assert import_cycles(graph) == []
    assert {"nbtorch.types", "nbtorch.validate", "nbtorch.detector"} <= set(graph)
    assert "nbtorch.detector" not in set(graph["nbtorch.setup_checks"]) | set(graph["nbtorch.pytree"])


def test_pytree_helpers_are_one_implementation_exported_everywhere():
    import nbtorch
    import nbtorch.pytree as pytree
    import nbtorch.types as types

    for name in ("tree_map", "tree_leaves", "get_leaf", "replace_leaf"):
        assert getattr(nbtorch, name) is getattr(pytree, name) is getattr(types, name)
