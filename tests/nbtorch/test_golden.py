"""Parity with the C program: every golden case, float64 and float32, and the geometry it dumped (geom.txt)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.detector import detector_frame
from nbtorch.rotation import rot_axis
from tests.golden import CASES, command, geometry, in_case_dir, reference_image

_cache: dict = {}


def _simulate(case: str, dtype):
    key = (case, dtype)
    if key not in _cache:
        with in_case_dir(case):
            params, setup = nbtorch.from_nanobragg_args(command(case), dtype=dtype)
        _cache[key] = (params, setup, nbtorch.simulate(params, setup).numpy().astype(np.float64))
    return _cache[key]


@pytest.mark.parametrize("case", CASES)
def test_image_matches_c_program_float64(case):
    _, setup, img = _simulate(case, torch.float64)
    ref = reference_image(case, img.shape)
    rel = np.abs(img - ref).max() / np.abs(ref).max()
    corr = np.corrcoef(img.ravel(), ref.ravel())[0, 1]
    assert rel <= 1e-5, f"{case}: max|Δ|/max = {rel:.3g}"
    assert corr >= 0.999999, f"{case}: correlation {corr:.9f}"


#: Relative shift of the top-hat edge (ρ²·fudge = limit) that brackets float32's rounding of ρ² near the edge.
EDGE_SHIFT = 1e-3


def _float64_bounds(case: str):
    """Per-pixel lower and upper float64 images that float32 may round to.  Smooth lattice factors: the float64 image
    itself.  Top-hat spots are a step in ρ²: a sample within float32 rounding of the edge may fall on either side, so
    the edge is moved by ±EDGE_SHIFT (through ``fudge``) and the pixel may take any value between the two images."""
    params, setup, img64 = _simulate(case, torch.float64)
    if setup.shape != "tophat":
        return img64, img64
    inner, outer = (nbtorch.simulate(params, setup.replace(fudge=setup.fudge * f), fused=False).numpy()
                    for f in (1 + EDGE_SHIFT, 1 - EDGE_SHIFT))
    return np.minimum(inner, outer), np.maximum(inner, outer)


@pytest.mark.parametrize("case", CASES)
def test_float32_within_1e3_of_float64(case):
    img32 = _simulate(case, torch.float32)[2]
    lo, hi = _float64_bounds(case)
    scale = np.abs(hi).max()
    excess = np.maximum(lo - img32, img32 - hi).clip(min=0)
    rel = excess.max() / scale
    assert rel <= 1e-3, f"{case}: float32 outside float64 by max|Δ|/max = {rel:.3g}"
    if case == "08_shape_tophat":  # the bracket is narrow: few pixels sit on the edge
        assert np.count_nonzero(hi - lo > 1e-3 * scale) < 0.01 * img32.size


@pytest.mark.parametrize("case", CASES)
def test_geometry_matches_c_program(case):
    params, setup, _ = _simulate(case, torch.float64)
    g = geometry(case)
    assert (setup.fpixels, setup.spixels) == (int(g["fpixels"][0]), int(g["spixels"][0]))
    assert setup.pixel_size == pytest.approx(g["pixel_size_m"][0] * 1e3, rel=1e-12)
    frame = detector_frame(params.detector, setup)
    np.testing.assert_allclose(frame.pix0.numpy(), np.array(g["pix0_vector_m"]) * 1e3, atol=1e-9)
    for name, got in (("fdet_vector", frame.fdet), ("sdet_vector", frame.sdet), ("odet_vector", frame.odet)):
        np.testing.assert_allclose(got.numpy(), g[name], atol=1e-12, err_msg=name)
    np.testing.assert_allclose(setup.beam, g["beam_vector"], atol=1e-12)
    np.testing.assert_allclose(setup.polar_axis, g["polar_vector"], atol=1e-12)
    np.testing.assert_allclose(setup.spindle, g["spindle_vector"], atol=1e-12)
    np.testing.assert_allclose(frame.close.item(), g["close_distance_m"][0] * 1e3, rtol=1e-12)
    np.testing.assert_allclose(frame.distance.item(), g["distance_m"][0] * 1e3, rtol=1e-12)
    # crystal: phi-0, mosaic-0 real vectors (m → Å) and reciprocal vectors
    xtal = nbtorch.crystal_orientations(params, setup)
    first = xtal.A[0].numpy()  # rows a, b, c of the first orientation (phi0, identity domain)
    if setup.phi0 == 0:
        for row, name in enumerate(("a0_m", "b0_m", "c0_m")):
            np.testing.assert_allclose(first[row], np.array(g[name]) * 1e10, rtol=0, atol=1e-9, err_msg=name)
    for col, name in enumerate(("a_star_invA", "b_star_invA", "c_star_invA")):
        np.testing.assert_allclose(xtal.B0[:, col].numpy(), g[name], atol=1e-14, err_msg=name)
    np.testing.assert_allclose(params.crystal.ncells.numpy(), [g["Na"][0], g["Nb"][0], g["Nc"][0]])
    assert setup.oversample == int(g["oversample"][0])
    assert setup.steps == int(g["steps"][0])
    assert setup.thicksteps == int(g["thicksteps"][0])
    assert setup.interpolate == bool(g["interpolate"][0])
    assert setup.phisteps == int(g["phisteps"][0])
    np.testing.assert_allclose(np.radians(setup.phistep), g["phistep_rad"][0], atol=1e-15)
    np.testing.assert_allclose(params.beam.fluence.item(), g["fluence"][0], rtol=1e-12)
    # sources: geom.txt stores the direction towards the source (= −incident) and λ in metres
    assert setup.n_sources == int(g["sources"][0])
    for k, (direction, lam_m) in g["source"].items():
        inc, factor = setup.sources[k]
        np.testing.assert_allclose(-np.array(inc), direction, atol=1e-12)
        np.testing.assert_allclose(params.beam.wavelength.item() * factor, lam_m * 1e10, rtol=1e-12)
    # mosaic domain matrices (spec §6 generator)
    assert setup.n_domains == int(g["mosaic_domains"][0])
    axes = torch.tensor(setup.mosaic_axes, dtype=torch.float64)
    fr = torch.tensor(setup.mosaic_fractions, dtype=torch.float64)
    U = rot_axis(axes, torch.deg2rad(params.crystal.mosaic_spread) * fr).numpy()
    for m, ref in g["umat"].items():
        np.testing.assert_allclose(U[m], ref, atol=1e-8, err_msg=f"umat {m}")
