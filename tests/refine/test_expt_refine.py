"""``nbtorch-refine --expt FILE [--experiment K] --out-expt OUT``: a DIALS experiment list is the starting model and
its imageset the observed image; the refined crystal and detector come back in a copy of the list, within the noise of
the truth, with everything the fit did not touch as read; user errors are one line, exit 2, nothing written.

tests/data/dials_refine/stills.expt: two stills sharing a beam, each with its own crystal (P222, 40 × 50 × 60 Å),
detector (four 32 × 32 panels of 0.3 mm at 60 mm in two groups, top and bottom) and image (raw float32, the panels
stacked along slow, written here)."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.io.dials import read_experiments, write_experiments
from nbtorch.io.images import write_raw_float
from refine.cli.fit import main

DATA = Path(__file__).resolve().parent.parent / "data"
EXPT = DATA / "dials_refine" / "stills.expt"
#: What the .expt does not hold: structure factors, crystal size, fluence, sampling.
FLAGS = ["-default_F", "100", "-N", "6", "-fluence", "1e28", "-oversample", "1"]
#: The truth against the file's experiment 0: the crystal turned by a few mrad, the top group moved by ~0.4 px and
#: ~0.1° (the file is the indexing-grade start).
MISSET = (0.2, -0.3, 0.25)  # deg
TOP = ((0.1, -0.08, 0.05), (0.1, -0.08, 0.1))  # mm, deg


def _copy(tmp_path: Path, index: int = 0) -> Path:
    """The data file in ``tmp_path``; with ``index`` > 0 a copy holding experiment ``index`` alone (what ``-expt``
    builds first)."""
    doc = json.loads(EXPT.read_text())
    if index:
        doc["experiment"] = [doc["experiment"][index]]
    path = tmp_path / ("stills.expt" if not index else f"only_{index}.expt")
    path.write_text(json.dumps(doc))
    return path


def _model(expt: Path):
    return nbtorch.from_nanobragg_args(["-expt", str(expt)] + FLAGS, dtype=torch.float64)


def _observe(params, setup, path: Path, seed: int) -> None:
    """A noisy still of the model at ``path`` as the imageset names it (raw float32, panels stacked along slow)."""
    image = nbtorch.simulate(params, setup, fused=False)
    noisy = torch.poisson(image, generator=torch.Generator().manual_seed(seed))
    write_raw_float(str(path), noisy.reshape(-1, image.shape[-1]).numpy().astype(np.float32))


def _truth(params, setup):
    c, d = params.crystal, params.detector
    g = setup.panels.node_index("top")
    shift, rot = d.group_shift.clone(), d.group_rotation.clone()
    shift[g], rot[g] = torch.tensor(TOP[0], dtype=torch.float64), torch.tensor(TOP[1], dtype=torch.float64)
    return params._replace(crystal=c._replace(misset=c.misset + torch.tensor(MISSET, dtype=torch.float64)),
                           detector=d._replace(group_shift=shift, group_rotation=rot))


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """``nbtorch-refine --expt stills.expt --refine orientation,scale,panel_group:top --out-expt …`` on a noisy still
    of the moved truth (experiment 0); the truth written as an experiment list too."""
    tmp = tmp_path_factory.mktemp("expt")
    expt = _copy(tmp)
    params, setup = _model(expt)
    truth = _truth(params, setup)
    _observe(truth, setup, tmp / "shot_0.bin", seed=1)
    record = read_experiments(expt)[0]
    write_experiments(tmp / "truth.expt", expt, [record._replace(params=truth, setup=setup)])
    out, fit_json = tmp / "refined.expt", tmp / "fit.json"
    rc = main(["--expt", str(expt), "--refine", "orientation,scale,panel_group:top", "--out-expt", str(out),
               "--json", str(fit_json), "--quiet"] + FLAGS)
    return rc, tmp, expt, out, json.loads(fit_json.read_text())


def test_expt_refine_moves_the_crystal_and_the_group_to_the_truth(refined):
    rc, tmp, expt, out, fit = refined
    assert rc == 0, fit["message"]
    assert fit["expt"] == {"input": str(expt), "experiment": 0, "identifier": "shot-0", "out": str(out)}
    assert fit["nanobragg_args"] is None and any("written with --out-expt" in n for n in fit["notes"])
    got, truth, start = (json.loads(p.read_text()) for p in (out, tmp / "truth.expt", expt))
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        err = np.subtract(got["crystal"][0][key], truth["crystal"][0][key])
        moved = np.subtract(start["crystal"][0][key], truth["crystal"][0][key])
        assert np.abs(moved).max() > 0.1 and np.abs(err).max() < 0.03, (key, err)  # Å; 60 Å × 5 mrad = 0.3 Å
    lab = {name: read_experiments(p)[0].setup.panels.panels for name, p in
           (("got", out), ("truth", tmp / "truth.expt"), ("start", expt))}
    for k in range(4):
        err = np.subtract(lab["got"][k].corner, lab["truth"][k].corner)
        assert np.abs(err).max() < 0.03, (k, err)  # mm: 0.1 pixel
        for axis in ("fast", "slow"):  # tilts out of the plane are the least determined (ESD ~0.1°)
            assert np.abs(np.subtract(getattr(lab["got"][k], axis), getattr(lab["truth"][k], axis))).max() < 3e-3
        moved = np.abs(np.subtract(lab["start"][k].corner, lab["truth"][k].corner)).max()
        assert (moved > 0.05) == (k < 2)  # the top group (panels 0, 1) moved, the bottom one did not
    for k, axis in enumerate(("shift_x", "shift_y", "shift_z", "rotation_x", "rotation_y", "rotation_z")):
        key = f"panel_group:top.{axis}"
        err, esd = fit["values"][key] - TOP[k // 3][k % 3], fit["value_esd"][key]
        assert 0 < esd < (0.01 if k < 3 else 0.2) and abs(err) < 4 * esd, (key, err, esd)  # mm, deg


def test_out_expt_keeps_every_other_model_as_read(refined):
    _, _, expt, out, _ = refined
    got, start = json.loads(out.read_text()), json.loads(expt.read_text())
    for key in ("experiment", "imageset", "beam", "goniometer", "scan", "profile", "__id__"):
        assert got[key] == start[key], key
    assert got["crystal"][1] == start["crystal"][1] and got["detector"][1] == start["detector"][1]
    assert got["crystal"][0]["space_group_hall_symbol"] == start["crystal"][0]["space_group_hall_symbol"]
    tree, tree0 = got["detector"][0]["hierarchy"], start["detector"][0]["hierarchy"]
    for node, node0 in ((tree, tree0), (tree["children"][1], tree0["children"][1])):  # root and bottom: not refined
        for key in ("fast_axis", "slow_axis", "origin"):
            np.testing.assert_allclose(node[key], node0[key], rtol=0, atol=1e-9)
    assert tree["children"][0]["origin"] != tree0["children"][0]["origin"]  # top: refined, in its parent's frame
    for k in range(4):  # panels within their groups: fixed, written in the group's frame as read
        for key in ("fast_axis", "slow_axis", "origin"):
            np.testing.assert_allclose(got["detector"][0]["panels"][k][key], start["detector"][0]["panels"][k][key],
                                       rtol=0, atol=1e-9)
    rec = read_experiments(out)[0]
    assert rec.identifier == "shot-0" and rec.crystal.cell_system == "orthorhombic"


def test_experiment_k_is_refined_and_written_alone(tmp_path, capsys):
    """``--experiment 1``: experiment 1's model and image (built from a one-experiment copy), and only its models
    written back; without OBSERVED the imageset's image is read, with OBSERVED that file."""
    expt = _copy(tmp_path)
    params, setup = _model(_copy(tmp_path, 1))
    _observe(params, setup, tmp_path / "shot_1.bin", seed=2)
    out, fit_json = tmp_path / "refined.expt", tmp_path / "fit.json"
    rc = main(["--expt", str(expt), "--experiment", "1", "--refine", "orientation,scale", "--out-expt", str(out),
               "--json", str(fit_json), "--quiet"] + FLAGS)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "written with --out-expt" in captured.err and "refined model: nbtorch" not in captured.out
    fit = json.loads(fit_json.read_text())
    assert fit["expt"]["experiment"] == 1 and fit["expt"]["identifier"] == "shot-1"
    assert 0.5 < fit["chi2_nu"] < 2 and abs(fit["values"]["scale"] - 1) < 0.02  # experiment 1's model, not 0's
    assert all(abs(fit["values"][f"orientation.{a}"]) < 0.5 for a in "xyz")  # mrad: the file's crystal is the truth
    got, start = json.loads(out.read_text()), json.loads(expt.read_text())
    assert got["crystal"][0] == start["crystal"][0] and got["detector"][0] == start["detector"][0]
    for key in ("real_space_a", "real_space_b", "real_space_c"):
        np.testing.assert_allclose(got["crystal"][1][key], start["crystal"][1][key], rtol=0, atol=0.02)
    # OBSERVED overrides the imageset: experiment 0's image is a poor fit of experiment 1's model
    shutil.copy(tmp_path / "shot_1.bin", tmp_path / "other.bin")
    _observe(*_model(expt), tmp_path / "shot_1.bin", seed=3)  # the imageset's file now holds experiment 0's still
    assert main([str(tmp_path / "other.bin"), "--expt", str(expt), "--experiment", "1", "--refine", "scale",
                 "--quiet"] + FLAGS) == 0
    assert main(["--expt", str(expt), "--experiment", "1", "--refine", "scale", "--quiet"] + FLAGS) == 4


def test_expt_flag_model_prints_where_the_crystal_goes(tmp_path, capsys):
    """``nbtorch-refine OBSERVED -expt FILE`` (the flag): no flags for an exact lattice, a note naming --out-expt and
    --matrix-out instead of the old 'cannot write the model as flags' line; --matrix-out gives the flags."""
    expt = _copy(tmp_path)
    params, setup = _model(expt)
    _observe(params, setup, tmp_path / "obs.bin", seed=4)
    argv = [str(tmp_path / "obs.bin"), "--refine", "scale", "--quiet", "-expt", str(expt)] + FLAGS
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" not in err
    assert "the refined crystal is written with --out-expt OUT.expt or --matrix-out OUT.mat" in err
    assert main(argv + ["--matrix-out", str(tmp_path / "r.mat"), "--out-expt", str(tmp_path / "r.expt")]) == 0
    out = capsys.readouterr().out
    assert f"-expt {expt} -mat {tmp_path / 'r.mat'}" in out and (tmp_path / "r.expt").is_file()
    assert main(argv + ["--matrix-out", str(tmp_path / "r.mat"), "--json", str(tmp_path / "fit.json"), "--image",
                        str(tmp_path / "model.bin")]) == 0
    flags = json.loads((tmp_path / "fit.json").read_text())["nanobragg_args"]
    assert flags[:4] == ["-expt", str(expt), "-mat", str(tmp_path / "r.mat")]
    again = nbtorch.simulate(*nbtorch.from_nanobragg_args(flags, dtype=torch.float64), fused=False)  # the flags
    model = np.fromfile(tmp_path / "model.bin", dtype="<f4").reshape(again.shape)  # re-simulate the refined model
    np.testing.assert_allclose(model, again.numpy(), rtol=5e-4, atol=1e-4 * float(again.max()))  # -mat: 8 decimals


@pytest.mark.parametrize("case,pattern", [
    ("missing image", r"--expt \S+stills\.expt: experiment 0: image \S+shot_0\.bin \(imageset\[0\]\.images\[0\]\) "
                      r"not found"),
    ("bad experiment", r"--experiment 2: \S+stills\.expt holds 2 experiments \(0 to 1\)"),
    ("negative experiment", r"--experiment must be an integer >= 0; got -1"),
    ("out-expt without expt", r"--out-expt \S+out\.expt: the model does not come from a DIALS experiment list: give "
                              r"--expt FILE"),
    ("experiment without expt", r"--experiment 1: the model does not come from a DIALS experiment list"),
    ("both", r"--expt \S+ and -expt \S+ both give the experiment list: give one"),
    ("flag and experiment", r"--experiment 1 with -expt \S+: give the experiment as -expt_experiment 1 after the "
                            r"flag, or --expt FILE"),
    ("expt_experiment with expt", r"-expt_experiment 1 with --expt \S+: give the experiment as --experiment 1"),
    ("flag experiment beyond", r"-expt_experiment 2: \S+stills\.expt holds 2 experiments \(0 to 1\)"),
    ("image beyond", r"--expt \S+stills\.expt: imageset\[0\]\.images: no image 1 \(0-based\): the imageset has 1 "
                     r"image$"),
    ("no observed", r"OBSERVED is missing: give the observed image first, before the nanoBragg flags, or --expt FILE"),
    ("bad file", r"--expt \S+bad\.expt: line 1, column 1: not valid JSON"),
    ("frame beyond the file", r"--expt \S+one_panel\.expt: experiment 0: image 0 \(imageset\[0\]\.images\[0\], "
                              r"frame 4\) \S+run7\.h5: no frame 4 \(0-based\) in /entry/data/data: it holds 3 frames "
                              r"\(0 to 2\)"),
    ("out-expt is the input", r"--out-expt \S+stills\.expt: the same file as the input"),
    ("flag the file gives", r"-distance conflicts with -expt \S+stills\.expt: the detector"),
    ("no structure factors", r"missing required input: structure factors: give -hkl FILE"),
])
def test_user_errors_are_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, case, pattern):
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the copy of experiment K goes
    expt = _copy(tmp_path)
    obs, out = tmp_path / "obs.bin", tmp_path / "out.expt"
    obs.write_bytes(np.zeros((128, 32), np.float32).tobytes())
    (tmp_path / "bad.expt").write_text("not json")
    shutil.copy(DATA / "dials" / "one_panel.expt", tmp_path / "one_panel.expt")
    with h5py.File(tmp_path / "run7.h5", "w") as f:  # 3 frames of one_panel.expt's 48 × 40 panel
        f["/entry/data/data"] = np.zeros((3, 40, 48), np.float32)
    outputs = ["--out-expt", str(out), "--json", str(tmp_path / "fit.json")]
    argv = {
        "missing image": ["--expt", str(expt)] + outputs,
        "bad experiment": ["--expt", str(expt), "--experiment", "2"] + outputs,
        "negative experiment": ["--expt", str(expt), "--experiment", "-1"] + outputs,
        "out-expt without expt": [str(obs), "-cell", "40", "50", "60", "90", "90", "90"] + outputs,
        "experiment without expt": [str(obs), "--experiment", "1", "-cell", "40", "50", "60", "90", "90", "90"],
        "both": ["--expt", str(expt), "-expt", str(expt)] + outputs,
        "flag and experiment": [str(obs), "--experiment", "1", "-expt", str(expt)] + outputs,
        "expt_experiment with expt": [str(obs), "--expt", str(expt)] + outputs + ["-expt_experiment", "1"],
        "flag experiment beyond": [str(obs), "-expt", str(expt), "-expt_experiment", "2"] + outputs,
        "image beyond": ["--expt", str(expt)] + outputs + ["-expt_image", "1"],
        "no observed": outputs,
        "bad file": ["--expt", str(tmp_path / "bad.expt")] + outputs,
        "frame beyond the file": ["--expt", str(tmp_path / "one_panel.expt")] + outputs,
        "out-expt is the input": [str(obs), "--expt", str(expt), "--out-expt", str(expt)],
        "flag the file gives": [str(obs), "--expt", str(expt), "--experiment", "1", "-distance", "50"] + outputs,
        "no structure factors": [str(obs), "--expt", str(expt)] + outputs,
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    flags = [] if case == "no structure factors" else FLAGS  # the temporary copy's name never shows
    assert main(argv + ["--refine", "scale"] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nbtorch-refine: error: "), err
    assert re.search(pattern, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any((tmp_path / "tmp").iterdir())
    assert json.loads(expt.read_text()) == json.loads(EXPT.read_text())
