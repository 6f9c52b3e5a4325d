"""Results: nanoBragg flags that re-simulate the fit, JSON, plots, summaries."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import nbtorch
import refine
from nbtorch.io.matrix import write_mosflm_matrix
from nbtorch.lattice import reciprocal_matrix
from refine.model.parameters import total_rotation

from .refine_cases import WATER, model, observe, rotate_crystal, with_crystal, with_detector


def _resimulate(res, **kw):
    flags = res.to_nanobragg_args(**kw)
    p2, s2 = nbtorch.from_nanobragg_args(flags)
    return flags, p2, s2, nbtorch.simulate(p2, s2), nbtorch.simulate(res.params, res.setup)


def _moved(res):
    """The fit changed the model (so the round trip is not trivially the starting flags)."""
    assert float(res.x.abs().max()) > 1e-3


def test_flags_round_trip_mosflm_cell_model():
    truth_flags = (f"-cell 40 50 60 90 90 90 -misset 10 20 30 -Na 5 -Nb 6 -Nc 7 -mosaic 0.2 -mosaic_domains 3 "
                   f"-water {WATER}")
    p, s, _ = model(truth_flags + " -detpixels 48")
    obs = observe(p, s)
    start_flags = (f"{model()[2]} -detpixels 48 -cell 40.2 49.8 60.3 90 90 90 -misset 10.2 19.9 30.1 -Na 5.5 "
                   f"-Nb 6 -Nc 7 -mosaic 0.25 -mosaic_domains 3 -water {WATER} -distance 60.5 -Xbeam 4.9 "
                   f"-floatfile out.bin -noisefile noise.img")
    p0, s0 = nbtorch.from_nanobragg_args(start_flags)
    res = refine.fit(obs, p0, s0, free=["cell", "orientation", "distance", "beam_center", "ncells", "mosaic", "scale",
                                        "detector_rotation.y", "background.water"],
                     ncells_mode="anisotropic", coarse_to_fine=False, max_iter=3, nanobragg_args=start_flags)
    _moved(res)
    flags, p2, s2, img2, img1 = _resimulate(res)
    assert "-floatfile" not in flags and "-noisefile" not in flags
    assert flags.count("-cell") == 1 and "-misset" in flags and "-Na" in flags and "-oversample" in flags
    assert s2 == res.setup
    assert float((img2 - img1).abs().max()) <= 1e-6 * float(img1.abs().max())
    # non-integer N is written with decimals
    assert float(flags[flags.index("-Na") + 1]) == pytest.approx(float(res.params.crystal.ncells[0]), rel=1e-15)


def test_flags_round_trip_xds_with_tilts_and_twotheta():
    extra = "-xds -ORGX 50.5 -ORGY 45.5 -detector_rotx 0.3 -twotheta 2 -detpixels 48"
    p, s, flags0 = model(extra)
    obs = observe(p, s)
    start = with_detector(p, distance=p.detector.distance + 0.4, twotheta=p.detector.twotheta + 0.1,
                          beam_center=p.detector.beam_center + 0.7 * s.pixel_size)  # mm: 0.7 px
    res = refine.fit(obs, start, s, free=["distance", "beam_center", "twotheta", "detector_rotation.x", "scale"],
                     coarse_to_fine=False, max_iter=3, nanobragg_args=flags0)
    _moved(res)
    flags, p2, s2, img2, img1 = _resimulate(res)
    assert "-ORGX" in flags and "-Xbeam" not in flags
    # the JSON reports the beam centre in mm and as ORGX/ORGY pixels, each with its ESD
    d = res.to_dict()
    mm, px = d["parameters"]["beam_center"], d["parameters"]["beam_center_px"]
    assert d["parameters"]["beam_center_unit"] == "mm" and res.values["beam_center.x"] == pytest.approx(mm[0])
    assert px == pytest.approx([v / 0.2 + 0.5 for v in mm], rel=1e-14)
    assert float(flags[flags.index("-ORGX") + 1]) == pytest.approx(px[0], rel=1e-14)
    assert d["esd"]["beam_center_px"] == pytest.approx([e / 0.2 for e in d["esd"]["beam_center"]], rel=1e-12)
    assert min(d["esd"]["beam_center"]) > 0
    assert float((img2 - img1).abs().max()) <= 1e-6 * float(img1.abs().max())


def test_flags_round_trip_custom_sample_pivot_close_distance():
    extra = ("-detpixels 40 -fdet_vector 0 0 1 -sdet_vector 0 -1 0 -odet_vector 1 0 0 -beam_vector 1 0 0 "
             "-close_distance 60 -Xclose 4 -Yclose 4.2 -detector_roty 0.5")
    p, s, flags0 = model(extra)
    assert s.convention == "CUSTOM" and s.pivot == "sample" and s.distance_is_close
    obs = observe(p, s)
    start = with_detector(p, distance=p.detector.distance - 0.3)
    res = refine.fit(obs, start, s, free=["distance", "beam_center", "scale"], coarse_to_fine=False, max_iter=3,
                     nanobragg_args=flags0)
    flags, p2, s2, img2, img1 = _resimulate(res)
    assert "-close_distance" in flags and flags[flags.index("-pivot") + 1] == "sample"
    assert s2.pivot == "sample"
    assert float((img2 - img1).abs().max()) <= 1e-6 * float(img1.abs().max())


def test_flags_without_starting_flags_come_from_the_setup():
    p, s, _ = model("-detpixels 40 -round_xtal -polar 0.9")
    obs = observe(p, s)
    res = refine.fit(obs, rotate_crystal(p, (0, 0, 1), 0.05), s, free=["orientation", "scale"],
                     coarse_to_fine=False, max_iter=3)
    flags, p2, s2, img2, img1 = _resimulate(res)
    assert "-round_xtal" in flags and "-mosflm" in flags
    assert s2 == s
    assert float((img2 - img1).abs().max()) <= 1e-6 * float(img1.abs().max())


def test_flags_of_a_matrix_model_write_a_new_matrix(tmp_path):
    lam = 1.0
    R = total_rotation(rotate_crystal(model()[0], (1, 2, 3), 25.0))
    A = (lam * R @ reciprocal_matrix(torch.tensor([40.0, 50.0, 60.0, 90.0, 90.0, 90.0], dtype=torch.float64)))
    write_mosflm_matrix(tmp_path / "start.mat", A.numpy())
    flags0 = (f"-mat {tmp_path / 'start.mat'} -default_F 100 -N 6 -lambda 1 -distance 60 -pixel 0.2 -detpixels 48 "
              "-oversample 1 -fluence 1e30")
    p, s = nbtorch.from_nanobragg_args(flags0)
    assert not s.nanobragg_cell
    truth = rotate_crystal(p, (0, 1, 0), 0.1)
    truth = with_crystal(truth, cell=truth.crystal.cell * torch.tensor([1.002, 1, 1, 1, 1, 1], dtype=torch.float64),
                         orientation=total_rotation(truth), misset=torch.zeros(3, dtype=torch.float64))
    obs = observe(truth, s)
    res = refine.fit(obs, p, s, free=["cell", "orientation", "scale"], crystal_system="orthorhombic",
                     coarse_to_fine=False, nanobragg_args=flags0)
    assert res.converged
    with pytest.raises(ValueError, match="matrix_path"):
        res.to_nanobragg_args()
    out = tmp_path / "refined.mat"
    flags, p2, s2, img2, img1 = _resimulate(res, matrix_path=str(out))
    assert out.exists() and flags[flags.index("-mat") + 1] == str(out)
    assert "-misset" not in flags and "-cell" not in flags
    # the MOSFLM format keeps 8 decimals of λ·a*: the re-simulation agrees to that precision
    assert float((img2 - img1).abs().max()) <= 1e-4 * float(img1.abs().max())
    torch.testing.assert_close(p2.crystal.cell, res.params.crystal.cell, rtol=1e-6, atol=1e-5)


def test_json_has_the_required_keys(tmp_path):
    p, s, flags0 = model("-detpixels 40")
    obs = observe(p, s)
    res = refine.fit(obs, with_detector(p, distance=p.detector.distance + 0.3), s, free=["distance", "scale"],
                     coarse_to_fine=False, nanobragg_args=flags0)
    text = res.to_json(str(tmp_path / "fit.json"))
    d = json.loads((tmp_path / "fit.json").read_text())
    assert d == json.loads(text)
    for key in ("converged", "parameters", "esd", "loss", "iterations", "seconds", "nanobragg_args", "correlation",
                "loss_history", "chi2_reduced", "free", "values", "value_esd"):
        assert key in d, key
    assert d["converged"] is True and d["free"] == ["distance", "scale"]
    assert set(d["esd"]) == set(d["parameters"]) - {"beam_center_unit"}
    assert d["parameters"]["distance_mm"] == pytest.approx(60.0, abs=0.05)
    assert d["esd"]["distance_mm"] == pytest.approx(d["value_esd"]["distance"])
    assert d["esd"]["cell"] == [0.0] * 6  # fixed
    assert isinstance(d["nanobragg_args"], list) and "-distance" in d["nanobragg_args"]
    assert len(d["correlation"]) == 2 and d["correlation"][0][0] == pytest.approx(1.0)
    assert math.isfinite(d["loss"]) and d["iterations"] >= 1 and d["seconds"] > 0


def test_plots_and_summary(tmp_path):
    pytest.importorskip("matplotlib")
    p, s, _ = model("-detpixels 32")
    obs = observe(p, s)
    res = refine.fit(obs, with_detector(p, distance=p.detector.distance + 0.3), s, free=["distance", "scale"],
                     coarse_to_fine=False)
    res.plot(str(tmp_path / "fit.png"))
    res.plot_loss(str(tmp_path / "loss.png"))
    assert (tmp_path / "fit.png").stat().st_size > 1000 and (tmp_path / "loss.png").stat().st_size > 1000
    # every figure goes through the safe-output rule: through a symlink to its target, never onto a directory
    from refine.pipeline import plots

    os.symlink(tmp_path / "fit.png", tmp_path / "link.png")
    plots.plot_loss(res, str(tmp_path / "link.png"))
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(OSError, match="is a directory"):
        plots.plot_fit(res, str(tmp_path / "dir.png"))
    text = res.summary()
    assert "distance" in text and "converged" in text
    r = res.residual_image()
    assert r.shape == (32, 32) and bool(torch.isfinite(r).all())
