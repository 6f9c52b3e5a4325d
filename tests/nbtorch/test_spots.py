"""The spot predictor (:mod:`nbtorch.spots`) in the frames of :func:`nbtorch.simulate`: the intensity-weighted
centroid of every strong isolated spot of a simulated still lies on its prediction (one nanoBragg panel, a tilted and
rotated one, a two-panel layout with a turned and tilted panel); a reflection in exact Bragg condition lands where
the kernel's own Miller indices are that reflection; |s1| = 1/λ; rays that miss, h = 0, bad input."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.detector import detector_frame, panel_frames, with_panels
from nbtorch.panels import PanelSpec, make_layout
from nbtorch.rotation import rot_axis
from nbtorch.simulate import crystal_orientations, crystal_rotation
from nbtorch.spots import diffracted_beams, predict_spots, reciprocal_basis

#: A big cubic cell and small round (Gaussian) domains: spots ~0.8 px r.m.s. wide, ~10 px apart on a 128² detector.
STILL = ("-cell 100 100 100 90 90 90 -misset 10 20 30 -N 8 -gauss_xtal -default_F 100 -distance 100 -detpixels 128 "
         "-pixel 0.1 -lambda 1 -oversample 2 -fluence 1e24")
HALF = 4  # half side of the centroid box (px)


def _model(extra: str = ""):
    return nbtorch.from_nanobragg_args((STILL + " " + extra).split(), dtype=torch.float64)


def _indices(n: int = 8) -> torch.Tensor:
    r = range(-n, n + 1)
    return torch.tensor(list(itertools.product(r, r, r)))


def _excitation(params, setup, hkl) -> torch.Tensor:
    """|(|s0 + r| − |s0|)| (Å⁻¹): how far each reflection lies off the Ewald sphere."""
    lam = params.beam.wavelength
    v = torch.tensor(setup.beam, dtype=torch.float64) / lam + hkl.double() @ _basis(params, setup).T
    return (torch.linalg.vector_norm(v, dim=-1) - 1 / lam).abs()


def _basis(params, setup) -> torch.Tensor:
    """The reciprocal basis from the kernel's own real vectors (rows of ``crystal_orientations(...).A[0]``)."""
    return torch.linalg.inv(crystal_orientations(params, setup).A[0])


def _centroids(image: np.ndarray, spots, rows, sizes):
    """(predicted, centroid) [k, 2] (fast, slow px, centres at i + ½) of the spots ``rows`` whose box lies inside
    their panel, and the fraction of the image's maximum in each box."""
    pred, got, peak = [], [], []
    stack = image if image.ndim == 3 else image[None]
    for i in rows:
        p = int(spots.panel[i])
        f, s = float(spots.fast_px[i]), float(spots.slow_px[i])
        fi, si = int(f), int(s)
        nf, ns = sizes[p]
        if not (HALF <= fi < nf - HALF and HALF <= si < ns - HALF):
            continue
        box = stack[p, si - HALF:si + HALF + 1, fi - HALF:fi + HALF + 1]
        ys, xs = np.mgrid[si - HALF:si + HALF + 1, fi - HALF:fi + HALF + 1] + 0.5
        tot = box.sum()
        pred.append((f, s))
        got.append(((box * xs).sum() / tot, (box * ys).sum() / tot))
        peak.append(box.max() / image.max())
    return np.array(pred), np.array(got), np.array(peak)


def _check_centroids(params, setup, min_spots: int):
    image = nbtorch.simulate(params, setup, fused=False).numpy()
    hkl = _indices()
    spots = predict_spots(params, setup, hkl)
    strong = spots.valid & (_excitation(params, setup, hkl) < 6e-4)
    sizes = [(setup.fpixels, setup.spixels)] if setup.panels is None else \
        [(p.fpixels, p.spixels) for p in setup.panels.panels]
    pred, got, peak = _centroids(image, spots, torch.nonzero(strong)[:, 0].tolist(), sizes)
    assert len(pred) >= min_spots
    assert peak.min() > 0.2  # a strong spot is where it was predicted (a miss would give a box of background)
    np.testing.assert_allclose(got, pred, rtol=0, atol=0.05)  # px (~1e-5 here; the brief asks 0.3)
    return spots, strong


def test_centroids_of_a_still_on_one_panel():
    params, setup = _model()
    spots, strong = _check_centroids(params, setup, min_spots=15)
    assert (spots.panel[spots.valid] == 0).all() and (spots.panel[~spots.valid] == -1).all()
    np.testing.assert_array_equal(spots.x_mm.numpy(), spots.fast_px.numpy() * 0.1)
    np.testing.assert_array_equal(spots.y_mm.numpy(), spots.slow_px.numpy() * 0.1)


@pytest.mark.parametrize("extra", ["-detector_rotx 4 -detector_roty -3 -detector_rotz 20 -twotheta 2",
                                   "-detector_rotz 30 -pivot sample -xds -detector_rotx 5 -ORGX 40 -ORGY 70"])
def test_centroids_on_a_tilted_rotated_detector(extra):
    params, setup = _model(extra)
    _check_centroids(params, setup, min_spots=8)


def _two_panels(params, setup):
    """The nanoBragg panel cut in two halves of 64 fast pixels, the second moved 10 px away, then turned 5° in its
    plane and tilted 8° about its slow axis about its centre (a two-panel layout in the same lab frame; the panels
    do not overlap as seen from the sample)."""
    fr = detector_frame(params.detector, setup)
    pix0, f, s = (fr.pix0.numpy(), fr.fdet.numpy() * 0.1, fr.sdet.numpy() * 0.1)
    n = np.cross(f, s) / 0.01
    turn = rot_axis(torch.tensor(n), torch.tensor(math.radians(5.0))).numpy()
    tilt = rot_axis(torch.tensor(s / 0.1), torch.tensor(math.radians(8.0))).numpy()
    R = tilt @ turn
    corner = pix0 + 74 * f
    centre = corner + 32 * f + 64 * s
    panels = [PanelSpec("left", tuple(pix0), tuple(f), tuple(s), 64, 128),
              PanelSpec("right", tuple(centre + R @ (corner - centre)), tuple(R @ f), tuple(R @ s), 64, 128)]
    return with_panels(params, setup, make_layout(panels, {"root": ["left", "right"]}, "root", setup.beam))


def test_centroids_on_a_two_panel_layout():
    params, setup = _two_panels(*_model())
    spots, strong = _check_centroids(params, setup, min_spots=10)
    on = [int((spots.panel[strong] == k).sum()) for k in (0, 1)]
    assert min(on) >= 5, on  # both panels hold strong spots
    step = torch.linalg.vector_norm(panel_frames(params.detector, setup).fdet[1]) * setup.pixel_size
    k = spots.valid & (spots.panel == 1)
    torch.testing.assert_close(spots.x_mm[k], spots.fast_px[k] * step, rtol=1e-15, atol=0)
    # a ray through the gap between the panels (fast 64–67 px of the left panel's plane) lands on neither
    hkl = _indices()
    plane = predict_spots(params, setup, hkl, panel=0)
    gap = plane.valid & (plane.fast_px > 64.1) & (plane.fast_px < 66.9) & (plane.slow_px > 0) & (plane.slow_px < 128)
    assert gap.sum() > 5 and (spots.panel[gap] == -1).all() and not spots.valid[gap].any()


def test_given_panel_gives_that_panels_plane():
    """With ``panel`` the ray meets that panel's plane: the same coordinates where it lands on it, and coordinates
    outside the panel's range where it lands on the other."""
    params, setup = _two_panels(*_model())
    hkl = _indices(5)
    free = predict_spots(params, setup, hkl)
    for k in (0, 1):
        on = predict_spots(params, setup, hkl, panel=k)
        same = free.valid & (free.panel == k)
        torch.testing.assert_close(on.fast_px[same], free.fast_px[same], rtol=0, atol=1e-9)
        torch.testing.assert_close(on.slow_px[same], free.slow_px[same], rtol=0, atol=1e-9)
        other = free.valid & (free.panel == 1 - k) & on.valid
        assert other.any() and ((on.fast_px[other] < 0) | (on.fast_px[other] >= 64)).all()


def test_reflection_in_exact_bragg_condition():
    """λ chosen so that h = (2, 3, -1) lies on the Ewald sphere: s1 − s0 = r exactly, the kernel's Miller indices
    at the predicted point of the detector are h, and the spot's centroid is there."""
    params, setup = _model()
    h = torch.tensor([[2, 3, -1]])
    r = h.double() @ _basis(params, setup).T
    beam = torch.tensor(setup.beam, dtype=torch.float64)
    lam = float(-2 * (beam * r).sum() / (r * r).sum())
    assert 0.9 < lam < 1.1
    params = params._replace(beam=params.beam._replace(wavelength=torch.tensor(lam, dtype=torch.float64)))
    spots = predict_spots(params, setup, h)
    assert bool(spots.valid[0])
    torch.testing.assert_close(spots.s1 - beam / lam, r, rtol=0, atol=1e-13)
    fr = detector_frame(params.detector, setup)
    point = fr.pix0 + (spots.fast_px[0] * fr.fdet + spots.slow_px[0] * fr.sdet) * setup.pixel_size
    d = point / torch.linalg.vector_norm(point)
    hk = crystal_orientations(params, setup).A[0] @ ((d - beam) / lam)  # the kernel's h = a·(d − i)/λ
    torch.testing.assert_close(hk, h[0].double(), rtol=0, atol=1e-9)
    image = nbtorch.simulate(params, setup, fused=False).numpy()
    pred, got, peak = _centroids(image, spots, [0], [(setup.fpixels, setup.spixels)])
    assert peak[0] > 0.5
    np.testing.assert_allclose(got, pred, rtol=0, atol=0.05)


def test_s1_has_length_one_over_lambda_and_zero_h_is_not_a_spot():
    params, setup = _model("-lambda 1.3 -misset 1 2 3")
    hkl = _indices(4)
    s1 = diffracted_beams(params, setup, hkl)
    torch.testing.assert_close(torch.linalg.vector_norm(s1, dim=-1), torch.full((len(hkl),), 1 / 1.3,
                                                                                 dtype=torch.float64),
                               rtol=1e-14, atol=0)
    spots = predict_spots(params, setup, hkl)
    zero = (hkl == 0).all(-1)
    assert not spots.valid[zero].any() and (spots.panel[zero] == -1).all()
    assert (spots.fast_px[~spots.valid] == 0).all() and (spots.x_mm[~spots.valid] == 0).all()


def test_spindle_rotation_phi0():
    """φ0 turns the crystal about the spindle: predictions at φ0 = 25° equal those of the crystal whose orientation
    is turned by 25° about the spindle at φ0 = 0 (and differ from φ0 = 0's)."""
    params, setup = _model("-phi 25")
    assert setup.phi0 == 25.0
    hkl = _indices(4)
    at_phi = predict_spots(params, setup, hkl)
    c = params.crystal
    R = rot_axis(torch.tensor(setup.spindle, dtype=torch.float64), torch.tensor(math.radians(25.0),
                                                                                 dtype=torch.float64))
    turned = params._replace(crystal=c._replace(misset=torch.zeros(3, dtype=torch.float64),
                                                orientation=R @ crystal_rotation(c)))
    at_zero = predict_spots(turned, setup.replace(phi0=0.0), hkl)
    assert at_phi.valid.sum() > 20 and torch.equal(at_phi.valid, at_zero.valid)
    torch.testing.assert_close(at_phi.fast_px, at_zero.fast_px, rtol=0, atol=1e-9)
    torch.testing.assert_close(at_phi.slow_px, at_zero.slow_px, rtol=0, atol=1e-9)
    B0, B = reciprocal_basis(params, setup.replace(phi0=0.0)), reciprocal_basis(params, setup)
    torch.testing.assert_close(B, R @ B0, rtol=0, atol=1e-15)
    assert (B - B0).abs().max() > 1e-3


def test_differentiable_and_bad_input():
    params, setup = _model("-detpixels 64")
    hkl = _indices(3)
    hkl = hkl[predict_spots(params, setup, hkl).valid][:12]

    def fast(misset):
        p = params._replace(crystal=params.crystal._replace(misset=misset))
        out = predict_spots(p, setup, hkl)
        return torch.cat([out.fast_px, out.y_mm])

    assert torch.autograd.gradcheck(fast, (params.crystal.misset.clone().requires_grad_(),))
    with pytest.raises(ValueError, match=r"hkl must have shape \[n, 3\]; got \(4,\)"):
        predict_spots(params, setup, [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"panel must be within \[0, 0\]; got 1\.\.1"):
        predict_spots(params, setup, hkl, panel=1)
    with pytest.raises(ValueError, match="curved detector"):
        predict_spots(params, setup.replace(curved_det=True), hkl)
