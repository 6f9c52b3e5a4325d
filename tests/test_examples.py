"""The notebooks in examples/.

``test_notebook_runs`` (marker ``notebooks``, deselected from the default run by pyproject's ``addopts``; CI runs
``python -m pytest -q -m notebooks`` after the main suite, see ``.ci/run``) executes every notebook with nbclient in a
fresh kernel of this interpreter and fails when a cell raises or when the notebook draws no picture (no image/png
output).  The cheap checks below run in the default suite: the notebooks are valid, stored without outputs and name
their kernel.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))
#: Seconds a notebook may take before the kernel is stopped (CI: 2 cores).
CELL_TIMEOUT = 600


def _read(path):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(str(path), as_version=4)


def test_there_are_examples():
    assert len(EXAMPLES) >= 6, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_is_stored_clean(path):
    """Valid nbformat 4, no outputs or execution counts (strip them before committing), the python3 kernel."""
    nbformat = pytest.importorskip("nbformat")
    nb = _read(path)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [k for k, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; strip them before committing"
    assert any(c.cell_type == "markdown" for c in nb.cells)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Execute the notebook top to bottom in a fresh kernel of this interpreter (ipykernel) in a temporary folder; every cell must run and at least one picture must be drawn."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # a kernel spec of this very interpreter, found before any user's "python3"
    spec = tmp_path / "jupyter" / "kernels" / "nbtorch-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbtorch tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(tmp_path / "jupyter"),
                                                                     os.environ.get("JUPYTER_PATH", "")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the pictures
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(path.parents[1]),
                                                                   os.environ.get("PYTHONPATH", "")])))
    nb = _read(path)
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="nbtorch-tests",
                            resources={"metadata": {"path": str(work)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell failed:\n{str(exc)[-4000:]}", pytrace=False)
    seconds = time.perf_counter() - t0
    n = _images(nb)
    print(f"{path.name}: {seconds:.1f} s, {n} pictures")
    assert n >= 1, f"{path.name} ran but drew no picture (no image/png output)"
