"""Import structure of the nbtorch package: every import at the top of its file (but the file readers a run may not
need), no import cycle between modules (the old ``types → validate → detector → types`` cycle forced imports into
function bodies), and a plain ``nbtorch`` run that loads none of the readers of detector files, models or NeXus."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from tests.test_guards import import_cycles, import_graph, package_modules

PKG = Path(__file__).resolve().parents[2] / "nbtorch"
#: Imports allowed inside functions: optional dependencies, the io package's own lazy imports (it keeps torch,
#: h5py, gemmi and fabio out of its import time), and the io readers a command line loads only for the flag that
#: names their file (``from ..io.crystfel import …`` for -geom: start-up, issue 24).
LAZY_OK_MODULES = {"gemmi", "h5py", "fabio", "matplotlib", "torch"}
LAZY_OK_DIRS = {"io"}


def _io_reader(node) -> bool:
    """Whether ``node`` is a relative import from one of the io package's modules (``from ..io.x import …``)."""
    return isinstance(node, ast.ImportFrom) and node.level >= 1 and (node.module or "").startswith("io.")


def test_every_import_sits_at_the_top_of_its_file():
    bad = []
    for module, path in package_modules(PKG.parent, ["nbtorch"]).items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(map(id, tree.body))  # and the body of a module-level try (nbtorch/__init__.py's imports)
        top |= {id(n) for t in tree.body if isinstance(t, ast.Try) for n in t.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            in_io = module.split(".")[1:2] == ["io"] and "io" in LAZY_OK_DIRS
            optional = all(n.split(".")[0] in LAZY_OK_MODULES for n in names)
            guarded = isinstance(node, ast.ImportFrom) and node.module == "torch._C._functorch"
            if not (optional or in_io or guarded or _io_reader(node)):
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


def test_importing_nbtorch_leaves_the_garbage_collector_as_it_was():
    """nbtorch/__init__ turns the collector off while torch is imported and then restores its state."""
    code = "import gc, sys; gc.disable() if sys.argv[1] == 'off' else None; import nbtorch; print(gc.isenabled())"
    for state, expected in (("on", "True"), ("off", "False")):
        out = subprocess.run([sys.executable, "-c", code, state], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


_PLAIN_RUN = """
import sys
from nbtorch.cli import main
main(sys.argv[1:])
print(sorted(m for m in sys.modules if m.split('.')[0] in ('gemmi', 'h5py', 'fabio', 'refine', 'torch')
             and not m.startswith('torch') or m in READERS))
"""


def test_a_plain_run_loads_no_reader_it_does_not_use(tmp_path):
    """``nbtorch`` simulating from flags alone (no -geom, -expt, -pdb, -hkl, -nexusfile) imports neither the readers
    of CrystFEL, DIALS, NeXus or model files nor h5py, gemmi, fabio or refine: start-up is what a run needs."""
    readers = ["nbtorch.io.crystfel", "nbtorch.io.dials", "nbtorch.io.dials_experiments",
               "nbtorch.io.structure_files", "nbtorch.io.refl"]
    code = f"READERS = {readers!r}\n" + _PLAIN_RUN
    args = "-default_F 100 -cell 50 50 50 90 90 90 -N 3 -distance 50 -detpixels 8 -floatfile f.bin -nopgm".split()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**os.environ, "NBTORCH_FUSED": "0"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]
    assert (tmp_path / "f.bin").stat().st_size == 8 * 8 * 4
