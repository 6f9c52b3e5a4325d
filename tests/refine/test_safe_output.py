"""Issue 18 items 2 and 8 for the refine programs: the safe-output rule (nbtorch.io.safe_output) in nbtorch-refine
(one image, ``--images`` joint and ``--independent``), nbtorch-sweep and nbtorch-demo — an output that is an input is
refused before any work, exit 2, one line — and ``--results`` as a JSON-lines file: anything else refused, every
valid line kept on resume."""
from __future__ import annotations

import json
import os
import warnings

import pytest

from refine.cli import many as cli_many
from refine.cli import demo
from refine.cli.fit import main as refine_main
from refine.scaleout import append_line, done_paths, read_results

#: nanoBragg flags of a tiny start; the checks run before the model is built, so the images need not be real.
FLAGS = "-cell 40 50 60 90 90 90 -N 2 -default_F 100 -distance 60 -pixel 0.2 -detpixels 8 -lambda 1".split()


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder (the current one) with two 'images', a MOSFLM matrix and a LIST of the images; no fit may start."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.img", "b.img", "start.mat"):
        (tmp_path / name).write_bytes(name.encode() * 8)
    (tmp_path / "list.txt").write_text("a.img -misset 1 2 3\nb.img -misset 4 5 6\n")
    fail = lambda *a, **k: pytest.fail("work started before the output check")  # noqa: E731
    monkeypatch.setattr(cli_many, "_run_independent", fail)
    monkeypatch.setattr(cli_many, "_run_joint", fail)
    monkeypatch.setattr("refine.cli.fit._load", fail)
    monkeypatch.setattr(demo, "_run", fail)
    return tmp_path


def _snapshot(folder):
    return {p.name: (p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink()
                     else None) for p in folder.iterdir()}


def _refused(capsys, main, argv, words, prog="nbtorch-refine"):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: "), err
    for w in words:
        assert w in err, err
    return err


INDEPENDENT = ["--images", "list.txt", "--independent", "--refine", "scale"]


@pytest.mark.parametrize("results, make", [
    ("a.img", None),                                            # a listed image
    ("link.jsonl", lambda f: (f / "link.jsonl").symlink_to("b.img")),   # a symlink to one
    ("hard.jsonl", lambda f: os.link(f / "a.img", f / "hard.jsonl")),  # a hard link to one
    ("list.txt", None),                                         # the LIST itself
])
def test_independent_results_onto_a_listed_image_is_refused(folder, capsys, results, make):
    if make:
        make(folder)
    before = _snapshot(folder)
    _refused(capsys, refine_main, INDEPENDENT + ["--results", results] + FLAGS,
             [f"--results {results}: the same file as the input"])
    assert _snapshot(folder) == before


@pytest.mark.parametrize("content", [
    json.dumps({"converged": True, "shared": {"distance": 60.0}, "images": [{"path": "a.img"}]}, indent=2) + "\n",
    "notes about the run\nsecond line\nlast line",
    '{"path": "a.img", "converged": true}\n42\n',
    "42",
    '{"converged": true}\n',
])
def test_results_that_is_not_json_lines_is_refused(folder, capsys, content):
    """--results joint.json (one pretty-printed document), a text file, a line 42, objects without "path": exit 2,
    one line, the file untouched (notes.txt used to lose its last line)."""
    (folder / "joint.json").write_text(content)
    _refused(capsys, refine_main, INDEPENDENT + ["--results", "joint.json"] + FLAGS,
             ["--results joint.json: line", "not a results file"])
    assert (folder / "joint.json").read_text() == content


def test_results_fifo_is_refused_without_blocking(folder, capsys):
    os.mkfifo(folder / "r.jsonl")
    _refused(capsys, refine_main, INDEPENDENT + ["--results", "r.jsonl"] + FLAGS, ["not a regular file"])


def test_resume_keeps_a_valid_last_line_without_newline(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"path": "a", "converged": true}\n{"path": "b", "converged": false}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert done_paths(str(path)) == {"a", "b"}
    append_line(str(path), {"path": "c", "converged": True})
    assert path.read_text() == ('{"path": "a", "converged": true}\n{"path": "b", "converged": false}\n'
                                '{"path": "c", "converged": true}\n')
    assert [r["path"] for r in read_results(str(path))] == ["a", "b", "c"]


def test_resume_drops_a_cut_line_with_a_warning_and_keeps_the_rest(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"path": "a"}\n\n{"path": "b"}\n{"path": "c", "conv')
    with pytest.warns(UserWarning, match="dropped its last line, cut short"):
        assert done_paths(str(path)) == {"a", "b"}
    assert path.read_text() == '{"path": "a"}\n\n{"path": "b"}\n'
    for text in ('{"path": "a"}\n42\n', 'plain text'):  # never guessed at, never truncated
        path.write_text(text)
        with pytest.raises(ValueError, match="not a results file"):
            done_paths(str(path))
        assert path.read_text() == text


def test_joint_json_onto_a_listed_image_or_its_matrix_is_refused(folder, capsys):
    before = _snapshot(folder)
    joint = ["--images", "list.txt", "--shared", "distance", "--per-image", "scale"]
    _refused(capsys, refine_main, joint + ["--json", "b.img"] + FLAGS, ["--json b.img: the same file as the input",
                                                                         "list.txt line 2"])
    # a -mat start rewrites <json stem>.image<k>.mat: never the matrix it starts from
    (folder / "list.txt").write_text("a.img -mat out.image1.mat\n")
    (folder / "out.image1.mat").write_text("matrix")
    _refused(capsys, refine_main, joint + ["--json", "out.json"] + FLAGS,
             ["out.image1.mat: the same file as the input list.txt line 1 -mat"])
    assert _snapshot(folder) == dict(before, **{"list.txt": b"a.img -mat out.image1.mat\n",
                                                 "out.image1.mat": b"matrix"})


@pytest.mark.parametrize("args, words", [
    (["--json", "a.img"], ["--json a.img: the same file as the input OBSERVED a.img"]),
    (["--image", "start.mat", "-mat", "start.mat"], ["--image start.mat: the same file as the input -mat"]),
    (["--matrix-out", "start.mat", "-mat", "start.mat"], ["--matrix-out start.mat", "the input -mat start.mat"]),
    (["--plot", "nodir/p.png"], ["--plot nodir/p.png: the directory", "does not exist"]),
])
def test_single_image_outputs_onto_inputs_are_refused(folder, capsys, args, words):
    before = _snapshot(folder)
    _refused(capsys, refine_main, ["a.img"] + args + FLAGS, words)
    assert _snapshot(folder) == before


def test_demo_refuses_an_output_that_is_a_directory(folder, capsys):
    (folder / "out" / "fit.json").mkdir(parents=True)
    _refused(capsys, demo.main, ["--out", "out"], ["--out out/fit.json: is a directory"], prog="nbtorch-demo")
    _refused(capsys, demo.main, ["--out", "a.img"], ["--out a.img: not a directory"], prog="nbtorch-demo")


# ---------------------------------------------------------------------------------------------------------------
# nbtorch-sweep: checked before the study runs


@pytest.fixture
def sweep(folder, monkeypatch):
    pytest.importorskip("optuna")
    from refine import studies
    from refine.cli import sweep as sweep_cli

    monkeypatch.setattr(studies, "global_search", lambda *a, **k: pytest.fail("the study ran"))
    return lambda *extra: sweep_cli.main(["a.img", "--search", "distance:1", "--n-trials", "1", "--storage",
                                          f"sqlite:///{folder / 's.db'}", *extra, *FLAGS])


@pytest.mark.parametrize("extra, words", [
    (["--json", "a.img"], ["--json a.img: the same file as the input OBSERVED a.img"]),
    (["--json", "nodir/out.json"], ["--json nodir/out.json: the directory", "nodir does not exist"]),
    (["--plots", "b.img"], ["--plots b.img: not a directory"]),
    (["--plots", ".", "-mat", "history.png"], ["--plots ./history.png: the same file as the input -mat"]),
    (["--json", "out.json", "-mat", "out.mat"], ["(refined -mat) out.mat: the same file as the input -mat"]),
])
def test_sweep_outputs_refused_before_the_study(folder, sweep, capsys, extra, words):
    if "history.png" in extra:
        (folder / "history.png").write_text("a matrix that happens to have this name")
    before = _snapshot(folder)
    rc = sweep(*extra)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("nbtorch-sweep: "), err
    for w in words:
        assert w in err, err
    assert _snapshot(folder) == before
