"""Targets (derivatives, curvature), masks, spot selection and the chunked objective."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nbtorch
from refine.model.parameters import parameterise
from refine.targets import Objective, make_target, plane_basis, select_pixels, usable_mask

from .refine_cases import model, observe


@pytest.mark.parametrize("name", ["poisson", "gaussian", "lsq", "anscombe"])
def test_dloss_is_the_derivative_of_the_loss(name):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(200, generator=g, dtype=torch.float64) * 50 + 0.1
    o = torch.poisson(m, generator=g)
    t = make_target(name, read_noise=2.0)
    mm = m.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(t.loss(mm, o), mm)
    torch.testing.assert_close(t.dloss(m, o), auto)


def test_fisher_is_the_expected_curvature():
    """W = E[∂²L/∂m²] over the noise model: exact for Poisson (E[o] = m), Monte Carlo for the Gaussian."""
    m = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)
    p = make_target("poisson", eps=0.0)
    mm = m.clone().requires_grad_(True)
    # ∂²L/∂m² = o/m², expectation 1/m
    o = m.clone()
    (d1,) = torch.autograd.grad(p.loss(mm, o), mm, create_graph=True)
    d2 = torch.stack([torch.autograd.grad(d1[i], mm, retain_graph=True)[0][i] for i in range(3)])
    torch.testing.assert_close(d2.detach(), p.fisher(m, o))
    gauss = make_target("gaussian", read_noise=3.0)
    g = torch.Generator().manual_seed(1)
    v = m + 9.0
    samples = m + torch.randn(200000, 3, generator=g, dtype=torch.float64) * v.sqrt()
    r = samples - m
    # ∂²/∂m² of ½[(o−m)²/v + ln v] with v = m + σ²
    curv = 1 / v + 2 * r / v**2 + r**2 / v**3 - 0.5 / v**2
    torch.testing.assert_close(curv.mean(0), gauss.fisher(m, m), rtol=0.02, atol=0)
    assert make_target("lsq").fisher(m, m).tolist() == [1.0, 1.0, 1.0]


def test_poisson_loss_is_half_deviance_and_guards_non_positive_models():
    t = make_target("poisson", eps=0.0)
    o = torch.tensor([0.0, 3.0, 10.0], dtype=torch.float64)
    assert float(t.loss(o.clamp_min(1e-300), o)) == pytest.approx(1e-300, abs=1e-12)
    m = torch.tensor([1.0, 2.0, 12.0], dtype=torch.float64)
    expect = sum(mi - oi + (oi * math.log(oi / mi) if oi > 0 else 0.0) for mi, oi in zip(m.tolist(), o.tolist()))
    assert float(t.loss(m, o)) == pytest.approx(expect)
    assert math.isinf(float(t.loss(torch.tensor([-1.0, 2.0, 3.0], dtype=torch.float64), o)))  # even where o = 0
    assert math.isinf(float(t.loss(torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64), o)))
    assert float(make_target("anscombe").loss(o, o)) == 0.0
    with pytest.raises(ValueError, match="target"):
        make_target("l2")
    with pytest.raises(ValueError, match="read_noise"):
        make_target("gaussian", read_noise=-1)


def test_usable_mask_excludes_gaps_overloads_user_mask_and_roi():
    p, s, _ = model("-detpixels 8 -roi 0 6 0 7")
    obs = np.full((8, 8), 5.0)
    obs[0, 0] = -1.0  # gap
    obs[1, 1] = np.nan
    obs[2, 2] = 70000.0  # overload
    user = np.ones((8, 8), bool)
    user[3, 3] = False
    keep = usable_mask(obs, s, user, overload=65535)
    assert not keep[0, 0] and not keep[1, 1] and not keep[2, 2] and not keep[3, 3]
    assert not keep[:, 7].any()  # outside the ROI (fast 0..6)
    assert keep.sum() == 8 * 7 - 4
    with pytest.raises(ValueError, match="shape"):
        usable_mask(np.zeros((4, 4)), s)


def test_select_pixels_keeps_spots_and_a_background_sample():
    p, s, _ = model()
    img = nbtorch.simulate(p, s).numpy()
    obs = observe(p, s).numpy()
    usable = np.ones_like(obs, bool)
    sel = select_pixels(obs, img, usable, dilate=2, background_fraction=0.1)
    spots = img > 0.02 * np.percentile(img, 99.9)  # well above the relative threshold (1 %)
    assert sel[spots].all()
    frac = sel.mean()
    assert 0.1 < frac < 0.95
    far = ~select_pixels(obs, img, usable, dilate=2, background_fraction=0.0) & usable
    assert 0.05 < sel[far].mean() < 0.15  # the background sample


def test_chunked_normal_equations_equal_unchunked_and_mask_renders_selected_pixels():
    p, s, _ = model("-detpixels 40")
    obs = observe(p, s)
    par = parameterise(p, s, ["distance", "beam_center", "orientation", "scale", "background"])
    pixels = np.zeros((40, 40), bool)
    pixels[5:35, 3:37] = True
    pixels[::7, :] = True
    one = Objective(par, obs, pixels, make_target("poisson"), chunk_pixels=10**6)
    many = Objective(par, obs, pixels, make_target("poisson"), chunk_pixels=97)
    assert len(many.groups[0].chunks) > 5
    x = par.zeros()
    x[par.index("background.constant")[0]] = 2.0
    L1, g1, H1, m1 = one.normal_equations(x)
    L2, g2, H2, m2 = many.normal_equations(x)
    assert L1 == pytest.approx(L2, rel=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(H1, H2, rtol=1e-10, atol=1e-8)
    # the masked render equals the full image (plus the plane) at the selected pixels
    full = nbtorch.simulate(par.unpack(x), s).reshape(-1) + (par.plane(x) @ plane_basis(s)).reshape(-1)
    torch.testing.assert_close(m1, full[torch.as_tensor(np.flatnonzero(pixels))])
    # the gradient is the derivative of the loss
    L_auto, g_auto = many.loss_and_grad(x)
    assert L_auto == pytest.approx(L1, rel=1e-12)
    torch.testing.assert_close(g_auto, g1, rtol=1e-8, atol=1e-6)
