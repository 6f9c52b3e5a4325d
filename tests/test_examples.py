"""Execute every notebook in examples/ (code cells in order, in one namespace), so the examples stay runnable."""
from __future__ import annotations

import json
import pathlib

import matplotlib
import pytest

matplotlib.use("Agg")
EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.ipynb"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = json.loads(path.read_text())
    ns: dict = {"__name__": "__main__"}
    for k, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}[cell {k}]", "exec"), ns)


def test_there_are_examples():
    assert EXAMPLES
