"""``nbtorch-refine --expt FILE --refl FILE --out-refl OUT.refl``: the refined model's predicted centroids
(:mod:`refine.pipeline.predicted`) written as a DIALS reflection table — the experiment's rows, every input column
kept bit for bit, ``xyzcal.px`` of a refined still on the observed centroids of its strong spots; the rows of one
experiment of a list (``id`` or identifier); user errors one line, exit 2, nothing written.

The experiment list is tests/data/dials_refine/stills.expt (two stills, each with four 32 × 32 panels of 0.3 mm at
60 mm; see tests/refine/test_expt_refine.py); the observed image and the table are made here."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.io.dials import read_experiments
from nbtorch.io.images import write_raw_float
from nbtorch.io.refl import FLAGS as REFL_FLAGS
from nbtorch.io.refl import read_reflections, table_from_columns, write_reflections
from nbtorch.spots import predict_spots, reciprocal_basis
from refine.cli.fit import main
from refine.pipeline.predicted import predicted_rows, predicted_table, rows_of_experiment

DATA = Path(__file__).resolve().parent.parent / "data"
EXPT = DATA / "dials_refine" / "stills.expt"
FLAGS = ["-default_F", "100", "-N", "6", "-fluence", "1e28", "-oversample", "1", "-gauss_xtal"]
MISSET = (0.2, -0.3, 0.25)  # deg: the truth against the file's crystal (indexing-grade start) …
SHIFT = (0.25, -0.2, 0.0)  # mm: … and its top panel group (panels 0, 1) moved by ~1 px
HALF = 2  # half side of a centroid box (px)


def _model(expt: Path):
    return nbtorch.from_nanobragg_args(["-expt", str(expt)] + FLAGS, dtype=torch.float64)


def _turned(params, setup):
    c, d = params.crystal, params.detector
    shift = d.group_shift.clone()
    shift[setup.panels.node_index("top")] = torch.tensor(SHIFT, dtype=torch.float64)
    return params._replace(crystal=c._replace(misset=c.misset + torch.tensor(MISSET, dtype=torch.float64)),
                           detector=d._replace(group_shift=shift))


def _hkl(n: int = 6) -> np.ndarray:
    r = np.arange(-n, n + 1)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def _spots(params, setup, image: np.ndarray, count: int):
    """(miller_index [k, 3], panel [k], centroid [k, 2] px, summed intensity [k]) of the ``count`` predicted spots
    nearest the Bragg condition whose box lies inside their panel: the intensity-weighted centroids of ``image``
    [P, S, F] (pixel centres at i + ½).  (Spots are ~4 px apart and smaller than a pixel here.)"""
    hkl = _hkl()
    s = predict_spots(params, setup, hkl)
    lam = params.beam.wavelength
    v = torch.tensor(setup.beam, dtype=torch.float64) / lam + torch.as_tensor(hkl).double() @ \
        reciprocal_basis(params, setup).T
    excitation = (torch.linalg.vector_norm(v, dim=-1) - 1 / lam).abs().numpy()
    rows = []
    for i in np.argsort(excitation):
        p, f, sl = int(s.panel[i]), float(s.fast_px[i]), float(s.slow_px[i])
        fi, si = int(f), int(sl)
        if not (s.valid[i] and HALF <= fi < setup.fpixels - HALF and HALF <= si < setup.spixels - HALF):
            continue
        box = image[p, si - HALF:si + HALF + 1, fi - HALF:fi + HALF + 1]
        ys, xs = np.mgrid[si - HALF:si + HALF + 1, fi - HALF:fi + HALF + 1] + 0.5
        rows.append((hkl[i], p, ((box * xs).sum() / box.sum(), (box * ys).sum() / box.sum()), box.sum()))
        if len(rows) == count:
            break
    return tuple(np.array([r[k] for r in rows]) for k in range(4))


def _table(hkl, panel, xy, intensity, ident: int = 0, extra_rows: bool = True):
    """A DIALS-like strong/indexed table of the spots (experiment ``ident``), with an unindexed row (id −1, h = 0)
    and a row of experiment 1 when ``extra_rows``."""
    n = len(hkl)
    cols = {
        "id": np.full(n, ident, np.int32), "panel": panel.astype(np.uint64), "miller_index": hkl.astype(np.int32),
        "xyzobs.px.value": np.column_stack([xy, np.full(n, 0.5)]),
        "bbox": np.column_stack([xy[:, 0] - 3, xy[:, 0] + 4, xy[:, 1] - 3, xy[:, 1] + 4, np.zeros(n), np.ones(n)])
        .astype(np.int32),
        "flags": np.full(n, REFL_FLAGS["strong"] | REFL_FLAGS["indexed"], np.uint64),
        "intensity.sum.value": intensity.astype(np.float64), "entering": np.zeros(n, bool),
        "xyzcal.px": np.full((n, 3), 7.0),
    }
    if extra_rows:
        cols = {k: np.concatenate([v, v[:2]]) for k, v in cols.items()}
        cols["id"][-2:] = (-1, 1)
        cols["miller_index"][-2] = 0
    return table_from_columns(cols, identifiers={0: "shot-0", 1: "shot-1"})


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    """A noisy still of the turned truth of experiment 0 at the imageset's file, and a table of its 12 spots nearest
    the Bragg condition with centroids measured on the noiseless image."""
    tmp = tmp_path_factory.mktemp("out_refl")
    expt = tmp / "stills.expt"
    expt.write_text(EXPT.read_text())
    params, setup = _model(expt)
    truth = _turned(params, setup)
    image = nbtorch.simulate(truth, setup, fused=False)
    noisy = torch.poisson(image, generator=torch.Generator().manual_seed(5))
    write_raw_float(str(tmp / "shot_0.bin"), noisy.reshape(-1, image.shape[-1]).numpy().astype(np.float32))
    hkl, panel, xy, intensity = _spots(truth, setup, image.numpy(), 12)
    write_reflections(tmp / "strong.refl", _table(hkl, panel, xy, intensity))
    return tmp, expt, params, setup, truth, xy


def test_predicted_table_keeps_the_rows_and_columns(still):
    """Written and read back: every input column and the identifiers bit for bit, xyzcal.px replaced by the truth's
    predictions (on the observed centroids), xyzcal.mm = px × 0.3 mm, the unindexed row not predicted."""
    tmp, _, _, setup, truth, xy = still
    table = read_reflections(tmp / "strong.refl")
    out = tmp / "predicted.refl"
    write_reflections(out, predicted_table(table, truth, setup, 0))
    got = read_reflections(out)
    assert got.nrows == table.nrows and got.identifiers == table.identifiers
    for name in table.columns:
        if name != "xyzcal.px":
            assert got.types[name] == table.types[name]
            np.testing.assert_array_equal(got[name], table[name], err_msg=name)
    done = predicted_rows(got)
    np.testing.assert_array_equal(done, np.arange(table.nrows) != table.nrows - 2)  # the unindexed row
    np.testing.assert_array_equal(got["xyzcal.px"][~done], 0.0)
    np.testing.assert_array_equal(got["xyzcal.mm"][~done], 0.0)
    px, mm = got["xyzcal.px"][done], got["xyzcal.mm"][done]
    np.testing.assert_allclose(px[:12, :2], xy, rtol=0, atol=0.2)  # the truth predicts its own centroids
    np.testing.assert_array_equal(px[:, 2], 0.5)  # the observed frame coordinate
    np.testing.assert_allclose(mm[:, :2], px[:, :2] * 0.3, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(mm[:, 2], 0.0)


def test_panel_and_id_added_and_a_named_panel_used(still):
    """Without ``panel``/``id`` the predicted panel and the experiment id are added; with a panel column each row
    is predicted on the panel it names (the same point where it lands there, outside the panel elsewhere)."""
    tmp, _, _, setup, truth, _ = still
    table = read_reflections(tmp / "strong.refl")
    rows = rows_of_experiment(table, 0, "shot-0")
    bare = table_from_columns({"miller_index": rows["miller_index"]})
    got = predicted_table(bare, truth, setup, 3)
    np.testing.assert_array_equal(got["panel"], rows["panel"])
    np.testing.assert_array_equal(got["id"], 3)
    assert got.types["panel"] == "std::size_t" and got.types["id"] == "int"
    named = predicted_table(rows, truth, setup, 0)
    np.testing.assert_allclose(named["xyzcal.px"][:, :2], got["xyzcal.px"][:, :2], rtol=0, atol=1e-9)
    other = rows.with_columns(panel=(rows["panel"] + 1) % 4)
    moved = predicted_table(other, truth, setup, 0)["xyzcal.px"]
    outside = (moved[:, 0] < 0) | (moved[:, 0] >= 32) | (moved[:, 1] < 0) | (moved[:, 1] >= 32)
    assert outside.all(), moved
    with pytest.raises(ValueError, match=r"column 'panel' holds panel 4, but the model's detector has 4 panels"):
        predicted_table(rows.with_columns(panel=rows["panel"] + 4 - rows["panel"]), truth, setup, 0)
    with pytest.raises(ValueError, match=r"no column 'miller_index'"):
        predicted_table(table_from_columns({"panel": rows["panel"]}), truth, setup, 0)


def test_rows_of_experiment():
    ids = np.array([0, 1, -1, 1, 0], np.int32)
    table = table_from_columns({"id": ids, "d": np.arange(5.0)}, identifiers={0: "a", 1: "b"})
    np.testing.assert_array_equal(rows_of_experiment(table, 1, "b")["d"], [1.0, 3.0])
    np.testing.assert_array_equal(rows_of_experiment(table, 0, "b")["d"], [1.0, 3.0])  # the identifier wins
    np.testing.assert_array_equal(rows_of_experiment(table, 0, "")["d"], [0.0, 4.0])  # no identifier: the index
    swapped = table_from_columns({"id": ids, "d": np.arange(5.0)}, identifiers={0: "b", 1: "a"})
    np.testing.assert_array_equal(rows_of_experiment(swapped, 1, "b")["d"], [0.0, 4.0])
    no_map = table_from_columns({"id": ids, "d": np.arange(5.0)})
    np.testing.assert_array_equal(rows_of_experiment(no_map, 1, "b")["d"], [1.0, 3.0])
    with pytest.raises(ValueError, match=r"no experiment identifier 'c' \(experiment 2\) in its identifiers "
                                         r"\(0: 'a', 1: 'b'\)"):
        rows_of_experiment(table, 2, "c")
    assert rows_of_experiment(table_from_columns({"d": np.arange(3.0)}), 4, "x").nrows == 3  # no id: one experiment
    one = table_from_columns({"id": np.zeros(3, np.int32)})
    assert rows_of_experiment(one, 0, "") is one  # every row: the table itself (opaque columns kept)
    assert rows_of_experiment(one, 1, "").nrows == 0


def test_cli_out_refl_of_a_refined_still(still, capsys):
    """The refined still's predictions lie on the observed centroids (< 0.5 px; the start's are ~1 px off); the rows
    are experiment 0's (not the unindexed one, not experiment 1's); the JSON report names the table."""
    tmp, expt, params, setup, _, xy = still
    out, fit_json = tmp / "cli.refl", tmp / "fit.json"
    rc = main(["--expt", str(expt), "--refl", str(tmp / "strong.refl"), "--refine",
               "orientation,scale,panel_group:top", "--out-refl", str(out), "--json", str(fit_json), "--no-coarse"]
              + FLAGS)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{out}: 12 of 12 reflections predicted" in err
    fit = json.loads(fit_json.read_text())
    assert fit["expt"]["out_refl"] == str(out) and fit["expt"]["identifier"] == "shot-0"
    got, table = read_reflections(out), read_reflections(tmp / "strong.refl")
    assert got.nrows == 12 and (got["id"] == 0).all()
    for name in table.columns:
        if name != "xyzcal.px":
            np.testing.assert_array_equal(got[name], table[name][:12], err_msg=name)
    refined = np.linalg.norm(got["xyzcal.px"][:, :2] - xy, axis=1)
    start = predict_spots(params, setup, torch.as_tensor(got["miller_index"].astype(np.int64)))
    before = np.linalg.norm(np.column_stack([start.fast_px.numpy(), start.slow_px.numpy()]) - xy, axis=1)
    assert refined.max() < 0.5 and before.max() > 0.8, (refined, before)


@pytest.mark.parametrize("case,pattern", [
    ("no refl", r"--out-refl \S+out\.refl: the predicted table holds the rows of the input reflections of a DIALS "
                r"experiment: give --refl FILE"),
    ("no expt", r"--out-refl \S+out\.refl: .* give --expt FILE"),
    ("missing refl", r"--refl \S+nothing\.refl: no such file$"),
    ("no rows", r"--refl \S+other\.refl: no reflection of experiment 0 \('shot-0'\) \(column 'id'\)"),
    ("unknown identifier", r"--refl \S+named\.refl: \S+: no experiment identifier 'shot-0' \(experiment 0\) in its "
                           r"identifiers \(0: 'elsewhere'\)"),
    ("no miller index", r"--refl \S+spots\.refl: \S+: no column 'miller_index'"),
    ("bad panel", r"--refl \S+panel\.refl: \S+: column 'panel' holds panel 7, but the model's detector has 4 panels"),
    ("out-refl is the input", r"--out-refl \S+strong\.refl: the same file as the input"),
])
def test_user_errors_are_one_line_exit_2_nothing_written(still, tmp_path, capsys, case, pattern):
    src, expt, *_ = still
    strong = tmp_path / "strong.refl"
    strong.write_bytes((src / "strong.refl").read_bytes())
    table = read_reflections(strong)
    write_reflections(tmp_path / "other.refl", table.with_columns(id=table["id"] + 5))
    write_reflections(tmp_path / "named.refl", table_from_columns({"id": np.zeros(2, np.int32)},
                                                                   identifiers={0: "elsewhere"}))
    write_reflections(tmp_path / "spots.refl", table_from_columns({"id": np.zeros(2, np.int32)}))
    write_reflections(tmp_path / "panel.refl", table.with_columns(panel=np.full(table.nrows, 7, np.uint64)))
    obs = tmp_path / "obs.bin"
    obs.write_bytes(np.zeros((128, 32), np.float32).tobytes())
    out = tmp_path / "out.refl"
    refl = {"no refl": None, "no expt": strong, "missing refl": tmp_path / "nothing.refl",
            "no rows": tmp_path / "other.refl", "unknown identifier": tmp_path / "named.refl",
            "no miller index": tmp_path / "spots.refl", "bad panel": tmp_path / "panel.refl",
            "out-refl is the input": strong}[case]
    model = [str(obs), "-cell", "40", "50", "60", "90", "90", "90", "-detpixels_f", "32", "-detpixels_s", "128"] \
        if case == "no expt" else \
        [str(obs), "--expt", str(expt)]
    argv = model + ["--out-refl", str(strong if case == "out-refl is the input" else out), "--json",
                    str(tmp_path / "fit.json"), "--refine", "scale"] + (["--refl", str(refl)] if refl else []) + FLAGS
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nbtorch-refine: error: "), err
    assert re.search(pattern, err), err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_experiment_1_rows(still, tmp_path):
    """``--experiment 1``: the rows whose id the identifiers map gives shot-1 (here id 0: the map is swapped)."""
    src, expt, *_ = still
    record = read_experiments(expt)[1]
    table = read_reflections(src / "strong.refl")
    swapped = table_from_columns({k: table[k] for k in table.columns}, identifiers={0: "shot-1", 1: "shot-0"})
    rows = rows_of_experiment(swapped, 1, record.identifier)
    np.testing.assert_array_equal(rows["id"], 0)
    assert rows.nrows == 12
