"""Minimisers and fit options: L-BFGS, Adam, spot-only pixels, Gaussian target, bounds, priors, callbacks."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import refine
from refine.minimise import MINIMISERS, Minimiser
from refine.minimise.lm import MinimizeResult, levenberg_marquardt
from refine.minimise.solve import DENSE, LinearSolve, dense_inverse_diagonal
from refine.model.parameters import parameterise
from refine.pipeline.strategy import Stage, translation_search
from refine.targets import Objective, make_target, usable_mask

from .refine_cases import beam_center_error_px, indexing_start, misorientation_deg, model, observe, with_detector


def _small_start(p, s):
    return with_detector(p, distance=p.detector.distance + 0.5,
                         beam_center=p.detector.beam_center + torch.tensor([0.2, -0.2], dtype=torch.float64))


@pytest.mark.parametrize("method,kw", [("lbfgs", {}), ("adam", {})])
def test_gradient_methods_recover_detector_and_scale(method, kw):
    p, s, _ = model("-detpixels 48")
    obs = observe(p, s)
    calls = []
    res = refine.fit(obs, _small_start(p, s), s, free=["distance", "beam_center", "scale"], method=method,
                     callback=calls.append, **kw)
    assert res.method == method
    assert abs(float(res.params.detector.distance - p.detector.distance)) < 0.15
    assert beam_center_error_px(res.params, p, s) < 0.15
    assert abs(res.values["scale"] - 1) < 0.02
    assert calls and {"iteration", "loss", "step", "damping", "stage"} <= set(calls[0])
    assert res.loss_history[-1] <= res.loss_history[0]


def test_lm_stops_on_its_rules_and_reports_history():
    p, s, _ = model("-detpixels 48")
    obs = observe(p, s)
    par = parameterise(_small_start(p, s), s, ["distance", "beam_center", "scale"])
    # the variance-stabilised target is smooth enough for LM from this start without the coarse-to-fine stages
    obj = Objective(par, obs, usable_mask(obs.numpy(), s), make_target("anscombe"))
    r = levenberg_marquardt(obj, par.zeros(), max_iter=50)
    assert abs(float(r.x[0]) + 0.5) < 0.05
    assert r.converged and "converged" in r.message and r.iterations < 15
    losses = [h["loss"] for h in r.history]
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # LM only accepts downhill steps
    r1 = levenberg_marquardt(obj, par.zeros(), max_iter=1)
    assert not r1.converged and r1.iterations == 1 and "max_iter" in r1.message


def test_a_new_solve_is_one_linear_solve_value():
    """A new linear solve for LM is one LinearSolve: here by eigen-decomposition of the damped dense matrix; LM with
    it takes the same path as with the default dense solve."""
    def eigen_step(blocks, mu):
        H, g = blocks.dense()
        w, V = torch.linalg.eigh(H + mu * torch.diag(torch.diagonal(H)))
        return -(V @ ((V.T @ g) / w))

    eigen = LinearSolve("eigen", eigen_step, dense_inverse_diagonal)
    p, s, _ = model("-detpixels 32")
    obs = observe(p, s)
    par = parameterise(_small_start(p, s), s, ["distance", "beam_center", "scale"])
    obj = Objective(par, obs, usable_mask(obs.numpy(), s), make_target("anscombe"))
    a = levenberg_marquardt(obj, par.zeros(), max_iter=20, solve=eigen)
    b = levenberg_marquardt(obj, par.zeros(), max_iter=20, solve=DENSE)
    assert a.converged and b.converged and a.iterations == b.iterations
    torch.testing.assert_close(a.x, b.x, rtol=1e-6, atol=1e-6)


def test_a_new_minimiser_is_one_function_and_one_table_entry(monkeypatch):
    """A fit method is an entry of refine.minimise.MINIMISERS: a plain gradient descent registered there is accepted
    by FitOptions, run by refine.fit with its own option, and reported as the result's method."""
    seen = {}

    def descent(objective, x0, active=None, *, max_iter=50, ftol=1e-3, callback=None, lower=None, upper=None,
                lr=0.05):
        seen["lr"] = lr
        active = list(range(objective.n)) if active is None else list(active)
        x, typ = x0.clone(), objective.typical()
        L, g = objective.loss_and_grad(x)
        step, it = lr, 0
        while it < max_iter and step > 1e-9:  # steepest descent in typical-error units, step halved when uphill
            trial = x.clone()
            trial[active] -= step * typ[active] ** 2 * g[active] / (g[active] * typ[active]).norm()
            L_new, g_new = objective.loss_and_grad(trial)
            if L_new < L:
                x, L, g, it = trial, L_new, g_new, it + 1
            else:
                step /= 2
        return MinimizeResult(x, L, True, "descended", it, it + 1, [])

    monkeypatch.setitem(MINIMISERS, "descent", Minimiser(descent, ("lr",), 20))
    p, s, _ = model("-detpixels 32")
    obs = observe(p, s)
    start = with_detector(p, distance=p.detector.distance + 0.3)
    res = refine.fit(obs, start, s, free=["distance"], method="descent", lr=0.5, coarse_to_fine=False)
    assert res.method == "descent" and seen["lr"] == 0.5
    assert res.loss_all < res.start_loss and abs(float(res.params.detector.distance - p.detector.distance)) < 0.3
    with pytest.raises(ValueError, match="method must be one of"):
        refine.FitOptions(method="newton")


def test_spots_only_matches_the_full_fit_with_fewer_pixels():
    p, s, _ = model()
    obs = observe(p, s)
    start = indexing_start(p, s, seed=7)
    free = ["cell", "orientation", "distance", "beam_center", "scale"]
    full = refine.fit(obs, start, s, free=free, crystal_system="orthorhombic")
    sub = refine.fit(obs, start, s, free=free, crystal_system="orthorhombic", spots_only=True)
    assert sub.converged and full.converged
    assert sub.n_pixels < 0.8 * full.n_pixels
    assert misorientation_deg(sub.params, p) < 0.02
    z = ((sub.x - full.x) / full.x_esd).abs().max()
    assert float(z) < 1.0  # the same answer within the uncertainties
    assert float((sub.x_esd / full.x_esd).max()) < 1.5


def test_gaussian_target_with_read_noise():
    p, s, _ = model("-detpixels 48")
    g = torch.Generator().manual_seed(3)
    obs = observe(p, s) + torch.randn(48, 48, generator=g, dtype=torch.float64) * 3.0
    res = refine.fit(obs, _small_start(p, s), s, free=["distance", "beam_center", "scale"], target="gaussian",
                     read_noise=3.0)
    assert res.converged and res.target == "gaussian"
    assert abs(float(res.params.detector.distance - p.detector.distance)) < 0.15
    assert 0.7 < res.chi2_reduced < 1.3


def test_bounds_and_priors_act():
    p, s, _ = model("-detpixels 48")
    obs = observe(p, s)
    start = with_detector(p, distance=p.detector.distance + 1.0)
    # the truth (60) is outside the bounds: the fit stops on the bound
    res = refine.fit(obs, start, s, free=["distance"], bounds={"distance": (60.5, 62.0)}, coarse_to_fine=False)
    assert float(res.params.detector.distance) == pytest.approx(60.5)
    # a prior combines with the data as the inverse-variance weighted mean (the data are nearly linear this close)
    free = dict(free=["distance"], coarse_to_fine=False)
    data = refine.fit(obs, start, s, **free)
    mu, sd_data = float(data.params.detector.distance), data.esd["distance"]
    for sigma in (0.3 * sd_data, sd_data, 3 * sd_data):
        mean = mu + 2 * sd_data
        fit = refine.fit(obs, start, s, priors={"distance": (mean, sigma)}, **free)
        w = sd_data**-2 / (sd_data**-2 + sigma**-2)
        assert float(fit.params.detector.distance) == pytest.approx(w * mu + (1 - w) * mean, abs=0.05 * sd_data)
        assert fit.esd["distance"] == pytest.approx((sd_data**-2 + sigma**-2) ** -0.5, rel=0.02)


def test_custom_stages_and_input_validation():
    p, s, _ = model("-detpixels 48")
    obs = observe(p, s)
    stages = [Stage("blurred", ncells_factor=0.5, active=("distance",), max_iter=5), Stage("final")]
    res = refine.fit(obs, _small_start(p, s), s, free=["distance", "scale"], coarse_to_fine=stages)
    assert [st["stage"] for st in res.stages] == ["blurred", "final"]
    assert abs(float(res.params.detector.distance - p.detector.distance)) < 0.15
    with pytest.raises(ValueError, match="method"):
        refine.fit(obs, p, s, method="newton")
    with pytest.raises(ValueError, match="shape"):
        refine.fit(obs[:10], p, s)
    with pytest.raises(ValueError, match="coarse_to_fine"):
        refine.fit(obs, p, s, coarse_to_fine=["fine"])


def test_translation_search_finds_a_shift():
    p, s, _ = model()
    import nbtorch

    img = nbtorch.simulate(p, s).numpy()
    shifted = np.roll(np.roll(img, 3, axis=1), -2, axis=0)
    df, ds, score = translation_search(shifted, img, np.ones_like(img, bool), max_shift=6)
    assert (round(df), round(ds)) == (3, -2) and score > 0.5
