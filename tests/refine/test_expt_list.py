"""``nbtorch-refine --expt-list LIST``: many DIALS stills, one line per experiment list (``EXPT [REFL] [SPECTRUM]``,
hopper's input), refined independently on Dask (each result line with its refined experiment list, ``out_expt``) or
jointly (a shared distance); a list of several experiments gives a shot each; malformed lines are one-line errors
naming the LIST and the line, exit 2.

Three stills of 64 × 64 pixels of 0.3 mm at 60 mm (a P222 crystal, 40 × 50 × 60 Å, in three orientations), each
its own ``.expt`` (written by :func:`nbtorch.io.dials.write_experiments`: the start, the truth turned by a few
mrad) with its noisy image (raw float32) next to it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.io.dials import read_experiments, write_experiments
from nbtorch.io.images import write_raw_float
from nbtorch.io.refl import table_from_columns, write_reflections
from nbtorch.spectrum import write_lam
from refine import scaleout
from refine.cli import many
from refine.cli.checks import UsageError
from refine.cli.fit import main
from refine.cli.many import main as main_many
from refine.imagelist import entry_start, load_entries, parse_expt_list, result_key
from refine.scaleout import read_results

#: What an .expt does not hold: structure factors, crystal size, fluence, sampling (every line's).
FLAGS = ["-default_F", "100", "-N", "6", "-fluence", "1e29", "-oversample", "1"]
#: Each shot's crystal (axis, angle in degrees) and the truth's misset about the start (degrees: 3–5 mrad).
ORIENTATIONS = (((1, 2, 3), 30), ((3, -1, 2), 50), ((-2, 1, 1), 70))
MISSETS = ((0.2, -0.15, 0.1), (-0.1, 0.25, -0.2), (0.15, 0.1, 0.25))
#: The truth's distance (mm) against the files' 60 (the joint fit shares it).
TRUE_DISTANCE = 60.3


def _rotation(axis, degrees: float) -> np.ndarray:
    a, u = np.radians(degrees), np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _document(basis: np.ndarray, images) -> dict:
    """An experiment list of one still per image: a one-panel detector (64², 0.3 mm, 60 mm, centred), λ 1 Å,
    the crystal of real-space columns ``basis`` (Å)."""
    panel = {"name": "p0", "type": "SENSOR_PAD", "fast_axis": [1, 0, 0], "slow_axis": [0, -1, 0],
             "origin": [-9.6, 9.6, -60.0], "image_size": [64, 64], "pixel_size": [0.3, 0.3],
             "trusted_range": [-1, 1e6], "thickness": 0, "mu": 0, "material": "Si", "mask": [], "gain": 1.0,
             "pedestal": 0, "identifier": "", "raw_image_offset": [0, 0],
             "px_mm_strategy": {"type": "SimplePxMmStrategy"}}
    beam = {"__id__": "monochromatic", "direction": [0, 0, 1], "wavelength": 1.0, "divergence": 0,
            "sigma_divergence": 0, "polarization_normal": [0, 1, 0], "polarization_fraction": 0.999, "flux": 0,
            "transmission": 1}
    crystal = {"__id__": "crystal", "real_space_a": list(basis[:, 0]), "real_space_b": list(basis[:, 1]),
               "real_space_c": list(basis[:, 2]), "space_group_hall_symbol": " P 2 2"}
    return {"__id__": "ExperimentList",
            "experiment": [{"__id__": "Experiment", "identifier": f"shot-{k}", "beam": 0, "detector": 0,
                            "crystal": 0, "imageset": k} for k in range(len(images))],
            "imageset": [{"__id__": "ImageSet", "images": [name]} for name in images],
            "beam": [beam], "detector": [{"panels": [panel]}], "crystal": [crystal], "goniometer": [], "scan": [],
            "profile": []}


def _model(expt: Path):
    return nbtorch.from_nanobragg_args(["-expt", str(expt)] + FLAGS, dtype=torch.float64)


def _write_shot(folder: Path, k: int) -> None:
    """``shot{k}.expt`` (the start), ``truth{k}.expt`` (the crystal turned by MISSETS[k]) and ``shot{k}.bin``, a
    noisy still of the truth at :data:`TRUE_DISTANCE`."""
    start = folder / f"shot{k}.expt"
    start.write_text(json.dumps(_document(_rotation(*ORIENTATIONS[k]) @ np.diag([40.0, 50.0, 60.0]),
                                          [f"shot{k}.bin"])))
    params, setup = _model(start)
    c = params.crystal
    truth = params._replace(crystal=c._replace(misset=c.misset + torch.tensor(MISSETS[k], dtype=torch.float64)))
    write_experiments(folder / f"truth{k}.expt", start, [read_experiments(start)[0]._replace(params=truth)])
    truth = truth._replace(detector=truth.detector._replace(distance=torch.tensor(TRUE_DISTANCE,
                                                                                  dtype=torch.float64)))
    image = nbtorch.simulate(truth, setup, fused=False)
    noisy = torch.poisson(image, generator=torch.Generator().manual_seed(k))
    write_raw_float(str(folder / f"shot{k}.bin"), noisy[0].numpy().astype(np.float32))


@pytest.fixture(scope="module")
def stills(tmp_path_factory) -> Path:
    """A folder with three shots and ``list.txt`` naming them (a comment and a blank line too)."""
    folder = tmp_path_factory.mktemp("stills")
    for k in range(3):
        _write_shot(folder, k)
    (folder / "list.txt").write_text("# EXPT [REFL] [SPECTRUM]\n\n" + "".join(f"shot{k}.expt\n" for k in range(3)))
    return folder


def _crystal_error(path: Path, truth: Path) -> float:
    """The largest difference (Å) between the real-space vectors of two experiment lists' first crystals."""
    got, want = (json.loads(p.read_text())["crystal"][0] for p in (path, truth))
    return max(np.abs(np.subtract(got[key], want[key])).max() for key in ("real_space_a", "real_space_b",
                                                                          "real_space_c"))


def test_independent_writes_each_shots_refined_experiment_list(stills, tmp_path, capsys):
    results, out_dir = tmp_path / "fits.jsonl", tmp_path / "refined"
    argv = ["--expt-list", str(stills / "list.txt"), "--independent", "--refine", "orientation,scale",
            "--workers", "1", "--threads", "1", "--results", str(results), "--out-dir", str(out_dir),
            "--max-iter", "2", "--no-coarse", "--quiet"] + FLAGS
    rc = main(argv)
    assert rc in (0, 3), capsys.readouterr().err  # two iterations may stop short of convergence
    lines = read_results(str(results))
    assert len(lines) == 3 and not any(rec.get("error") for rec in lines), lines
    by_expt = {rec["expt"]["input"]: rec for rec in lines}
    for k in range(3):
        rec = by_expt[str(stills / f"shot{k}.expt")]
        out = Path(rec["out_expt"])
        assert out == out_dir / f"shot{k}_line{k + 3}_refined.expt" and rec["path"] == str(stills / f"shot{k}.bin")
        assert rec["expt"] == {"input": str(stills / f"shot{k}.expt"), "experiment": 0, "identifier": "shot-0",
                               "refl": None, "out": str(out)}
        assert rec["nanobragg_args"] is None  # the crystal is the .expt's exact lattice: written to out_expt
        assert read_experiments(out)[0].identifier == "shot-0"
        start, got = (_crystal_error(p, stills / f"truth{k}.expt") for p in (stills / f"shot{k}.expt", out))
        assert start > 0.1 and got < 0.5 * start, (k, start, got)  # Å: 60 Å × 4 mrad = 0.24 Å at the start
    single = tmp_path / "single.json"  # a line gives what nbtorch-refine --expt EXPT gives for its shot
    assert main(["--expt", str(stills / "shot1.expt"), "--refine", "orientation,scale", "--json", str(single),
                 "--max-iter", "2", "--no-coarse", "--quiet"] + FLAGS) == rc
    alone, line = json.loads(single.read_text())["parameters"], by_expt[str(stills / "shot1.expt")]["parameters"]
    assert line["misset_deg"] == pytest.approx(alone["misset_deg"], rel=1e-9, abs=1e-12)
    assert line["scale"] == pytest.approx(alone["scale"], rel=1e-9)
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    assert main(argv) == rc  # a rerun finds every shot done (keyed by image, .expt and K): nothing refined again
    assert len(read_results(str(results))) == 3 and stamps == {p: p.stat().st_mtime_ns for p in out_dir.iterdir()}


def test_joint_shares_the_distance_and_reports_every_shot(stills, tmp_path, capsys):
    """One distance from three stills (0.3 mm off at the start), each shot's orientation and scale its own; the JSON
    holds every shot's values and refined experiment list (next to --json), which carries the shared distance."""
    out = tmp_path / "joint.json"
    rc = main(["--expt-list", str(stills / "list.txt"), "--shared", "distance", "--per-image", "orientation,scale",
               "--json", str(out), "--max-iter", "2", "--no-coarse", "--quiet"] + FLAGS)
    assert rc in (0, 3), capsys.readouterr().err
    d = json.loads(out.read_text())
    assert abs(d["shared"]["distance"] - TRUE_DISTANCE) < 0.05, d["shared"]
    assert [img["path"] for img in d["images"]] == [str(stills / f"shot{k}.bin") for k in range(3)]
    for k, img in enumerate(d["images"]):
        refined = tmp_path / "joint_refined" / f"shot{k}_line{k + 3}_refined.expt"
        assert img["expt"] == {"input": str(stills / f"shot{k}.expt"), "experiment": 0, "identifier": "shot-0",
                               "refl": None, "out": str(refined)}
        assert img["parameters"]["distance_mm"] == pytest.approx(d["shared"]["distance"], rel=1e-12)
        truth = stills / f"truth{k}.expt"
        assert _crystal_error(refined, truth) < 0.5 * _crystal_error(stills / f"shot{k}.expt", truth)
        panel = read_experiments(refined)[0].setup.panels.panels[0]
        assert panel.corner[2] == pytest.approx(-d["shared"]["distance"], abs=1e-9)  # the shared distance, written


def test_a_list_of_several_experiments_gives_a_shot_each(tmp_path):
    """Two experiments in one file (two crystals, two images) and a spectrum on the line: two shots, each with its
    experiment's model (as a file of that experiment alone builds it) and image, the spectrum, and its own messages,
    output name and results key."""
    doc = _document(np.diag([40.0, 50.0, 60.0]), ["a.bin", "b.bin"])
    doc["crystal"].append(dict(doc["crystal"][0], real_space_a=[0.0, 40.0, 0.0], real_space_b=[-50.0, 0.0, 0.0]))
    doc["experiment"][1]["crystal"] = 1
    (tmp_path / "two.expt").write_text(json.dumps(doc))
    for k in (0, 1):
        write_raw_float(str(tmp_path / "ab"[k]) + ".bin", np.zeros((64, 64), np.float32))
        (tmp_path / f"only{k}.expt").write_text(json.dumps(dict(doc, experiment=[doc["experiment"][k]])))
    write_lam(tmp_path / "s.lam", [0.99, 1.0, 1.01], [1.0, 2.0, 1.0])
    (tmp_path / "list.txt").write_text("two.expt s.lam\n")
    entries = parse_expt_list(str(tmp_path / "list.txt"), FLAGS)
    assert [(e.experiment, e.identifier, e.path) for e in entries] == [
        (0, "shot-0", str(tmp_path / "a.bin")), (1, "shot-1", str(tmp_path / "b.bin"))]
    assert [e.where() for e in entries] == [f"{tmp_path / 'list.txt'} line 1 experiment {k}" for k in (0, 1)]
    assert [e.out_expt_name() for e in entries] == ["two_line1_exp0_refined.expt", "two_line1_exp1_refined.expt"]
    assert len({e.key() for e in entries}) == 2
    assert [result_key({"path": e.path, "expt": e.expt_report(None)}) for e in entries] == [e.key() for e in entries]
    images = []
    for k, e in enumerate(entries):
        params, setup, _ = entry_start(e)
        assert setup.n_sources == 3 and e.flags[-2:] == ["-spectrum", str(tmp_path / "s.lam")]
        alone = nbtorch.from_nanobragg_args(["-expt", str(tmp_path / f"only{k}.expt")] + FLAGS + e.flags[-2:],
                                            dtype=torch.float64)
        images.append(nbtorch.simulate(params, setup, fused=False))
        torch.testing.assert_close(images[-1], nbtorch.simulate(*alone, fused=False), rtol=1e-12, atol=0)
    assert (images[0] - images[1]).abs().max() > 0.1 * images[0].max()  # two crystals, two models


@pytest.mark.parametrize("line, problem", [
    ("missing.expt", "EXPT missing.expt: no such file"),
    ("shot0.expt strong.refl s.lam extra", "4 columns; a line is EXPT [REFL] [SPECTRUM]"),
    ("shot0.expt bad.lam", "SPECTRUM"),
    ("shot0.expt strong.refl bad.lam", "SPECTRUM"),
    ("shot0.expt missing.refl", "REFL missing.refl: no such file"),
    ("shot1.expt", "EXPT shot1.expt is already listed on line 2"),
    ("nojson.expt", "EXPT"),
])
def test_malformed_lines_are_one_line_errors_exit_2(stills, tmp_path, capsys, line, problem):
    for name in ("shot0.expt", "shot0.bin", "shot1.expt", "shot1.bin"):
        shutil.copy(stills / name, tmp_path / name)
    (tmp_path / "strong.refl").write_bytes(b"")
    (tmp_path / "bad.lam").write_text("wavelength,weight\n1.0,2.0\nnot a row\n")
    (tmp_path / "nojson.expt").write_text("{not json")
    lst = tmp_path / "bad.txt"
    lst.write_text(f"# comment\nshot1.expt\n\n{line}\n")
    for mode in (["--shared", "distance", "--per-image", "scale"], ["--independent", "--refine", "scale",
                                                                   "--results", str(tmp_path / "r.jsonl")]):
        rc = main(["--expt-list", str(lst)] + mode + FLAGS)
        err = capsys.readouterr().err
        assert rc == 2 and f"{lst} line 4: " in err and problem in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("argv, problem", [
    (["--images", "a.txt", "--expt-list", "b.txt", "--shared", "distance"], "both give the LIST: give one"),
    (["--images", "a.txt", "--out-dir", "d", "--shared", "distance"], "--out-dir d: the refined experiment lists"),
    (["--expt-list", "b.txt", "--gain", "2", "--gain-map", "g.bin", "--shared", "distance"],
     "--gain 2.0 and --gain-map g.bin both give the gain"),
])
def test_list_options_usage_errors(tmp_path, capsys, monkeypatch, argv, problem):
    monkeypatch.chdir(tmp_path)
    assert main(argv + FLAGS) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1, err
    with pytest.raises(UsageError, match="give the LIST: --images LIST"):  # (without either: one image's program)
        main_many(["--shared", "distance"] + FLAGS)


def test_a_gain_map_applies_to_every_shot(stills, tmp_path):
    """``--gain-map`` with a LIST: one map for every shot.  Images of twice the counts with a map of 2 ADU/photon fit
    as the original images do (the same photons); without the map their scale doubles."""
    (tmp_path / "gain").mkdir()
    for k in range(2):
        for folder, factor in ((tmp_path, 1), (tmp_path / "gain", 2)):
            shutil.copy(stills / f"shot{k}.expt", folder / f"shot{k}.expt")
            image = np.fromfile(stills / f"shot{k}.bin", dtype=np.float32)
            (factor * image).astype(np.float32).tofile(folder / f"shot{k}.bin")
    write_raw_float(str(tmp_path / "map.bin"), np.full((64, 64), 2.0, np.float32))
    scales = {}
    for name, folder, extra in (("plain", tmp_path, []), ("map", tmp_path / "gain", ["--gain-map", str(tmp_path /
                                "map.bin")]), ("counts", tmp_path / "gain", [])):
        (folder / "list.txt").write_text("shot0.expt\nshot1.expt\n")
        out = tmp_path / f"{name}.json"
        main(["--expt-list", str(folder / "list.txt"), "--per-image", "scale", "--json", str(out), "--max-iter", "2",
              "--no-coarse", "--quiet"] + extra + FLAGS)
        scales[name] = [img["parameters"]["scale"] for img in json.loads(out.read_text())["images"]]
    assert scales["map"] == pytest.approx(scales["plain"], rel=1e-9)
    assert np.divide(scales["counts"], scales["plain"]) == pytest.approx([2, 2], rel=0.01)


def _two_experiment_list(folder: Path, refl_ids=(0, 1, 1, -1)) -> Path:
    """``two.expt`` (two experiments: crystal 0 on a.bin, crystal 1 on b.bin), ``strong.refl`` (spots of ids
    ``refl_ids`` with identifiers shot-0 and shot-1) and ``list.txt`` naming both."""
    doc = _document(np.diag([40.0, 50.0, 60.0]), ["a.bin", "b.bin"])
    doc["crystal"].append(dict(doc["crystal"][0], real_space_a=[0.0, 40.0, 0.0], real_space_b=[-50.0, 0.0, 0.0]))
    doc["experiment"][1]["crystal"] = 1
    (folder / "two.expt").write_text(json.dumps(doc))
    for name in ("a.bin", "b.bin"):
        write_raw_float(str(folder / name), np.ones((64, 64), np.float32))
    n = len(refl_ids)
    xyz = np.stack([np.arange(n) * 10.0 + 5.5, np.full(n, 20.5), np.zeros(n)], 1)
    write_reflections(folder / "strong.refl", table_from_columns(
        {"id": np.asarray(refl_ids, np.int32), "panel": np.zeros(n, np.uint64), "xyzobs.px.value": xyz},
        identifiers={0: "shot-0", 1: "shot-1"}))
    (folder / "list.txt").write_text("two.expt strong.refl\n")
    return folder / "list.txt"


def test_a_lines_refl_gives_each_shot_its_rows_as_spots(tmp_path, monkeypatch):
    """REFL on a line: each shot's fit is a spot-ROI fit of the rows of its own experiment (identifier → id), on Dask
    (refine_one) and jointly (fit_many gets one spot list per image); a shot without rows is an error naming the
    line."""
    lst = _two_experiment_list(tmp_path)
    entries = parse_expt_list(str(lst), FLAGS)
    assert [e.refl for e in entries] == [str(tmp_path / "strong.refl")] * 2
    given = []
    monkeypatch.setattr(scaleout, "fit", lambda *a, spots=None, **kw: given.append(spots) or 1 / 0)
    for e in entries:
        rec = scaleout.refine_one(e, ["scale"], {}, threads=1)
        assert rec["error"].startswith("ZeroDivisionError") and rec["expt"]["refl"] == str(tmp_path / "strong.refl")
    assert [t.nrows for t in given] == [1, 2]
    np.testing.assert_array_equal(given[1]["xyzobs.px.value"][:, 0], [15.5, 25.5])
    joint = []
    monkeypatch.setattr(many, "fit_many", lambda *a, spots=None, **kw: joint.append(spots) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main_many(["--expt-list", str(lst), "--per-image", "scale", "--quiet"] + FLAGS)
    assert [t.nrows for t in joint[0]] == [1, 2]
    _two_experiment_list(tmp_path, refl_ids=(1, 1))
    assert main(["--expt-list", str(lst), "--per-image", "scale", "--quiet"] + FLAGS) == 2
    rec = scaleout.refine_one(parse_expt_list(str(lst), FLAGS)[0], ["scale"], {}, threads=1)  # a results line
    assert f"{lst} line 1 experiment 0: REFL " in rec["error"] and "no reflection of experiment 0 ('shot-0')" in \
        rec["error"] and rec["out_expt"] is None


def test_shots_in_frames_of_one_hdf5_file(stills, tmp_path):
    """Two experiments whose images are frames 1 and 0 of one HDF5 file (``single_file_indices``): each shot reads its
    own frame (what nbtorch-refine --expt reads)."""
    doc = json.loads((stills / "shot0.expt").read_text())
    doc["experiment"].append(dict(doc["experiment"][0], identifier="shot-1"))
    doc["imageset"] = [{"__id__": "ImageSet", "images": ["run.h5"], "single_file_indices": [k]} for k in (1, 0)]
    doc["experiment"][1]["imageset"] = 1
    (tmp_path / "run.expt").write_text(json.dumps(doc))
    frames = np.stack([np.full((64, 64), 3.0), np.fromfile(stills / "shot0.bin", np.float32).reshape(64, 64)])
    with h5py.File(tmp_path / "run.h5", "w") as f:
        f["/entry/data/data"] = frames.astype(np.float32)
    (tmp_path / "list.txt").write_text("run.expt\n")
    entries = parse_expt_list(str(tmp_path / "list.txt"), FLAGS)
    assert [(e.experiment, e.frame, e.path) for e in entries] == [(0, 1, str(tmp_path / "run.h5")),
                                                                (1, 0, str(tmp_path / "run.h5"))]
    observed, _, _ = load_entries(entries)
    for e, obs in zip(entries, observed):
        np.testing.assert_array_equal(np.asarray(obs.data).reshape(64, 64), frames[e.frame])


def test_a_shots_expt_read_out_noise_reaches_its_gaussian_fit(tmp_path, monkeypatch):
    """A panel's ``readout_noise`` (ADU, nbtorch's .expt extension) is each --independent shot's σ_r with the
    gaussian target; the option wins over the file, and the poisson target takes none."""
    lst = _two_experiment_list(tmp_path)
    doc = json.loads((tmp_path / "two.expt").read_text())
    for panel in doc["detector"][0]["panels"]:
        panel["readout_noise"] = 4.0
    (tmp_path / "two.expt").write_text(json.dumps(doc))
    entry = parse_expt_list(str(lst), FLAGS)[0]
    given = []
    monkeypatch.setattr(scaleout, "fit", lambda *a, **kw: given.append(kw.get("readout_noise_adu")) or 1 / 0)
    for options in ({"target": "gaussian"}, {"target": "gaussian", "readout_noise_adu": 9.0}, {"target": "poisson"}):
        assert scaleout.refine_one(entry, ["scale"], options, threads=1)["error"].startswith("ZeroDivisionError")
    assert np.all(np.asarray(given[0]) == 4.0) and given[1] == 9.0 and given[2] is None
