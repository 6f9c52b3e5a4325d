"""Uncertainties: the LM covariance equals the inverse Hessian of the NLL, and ESDs cover the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import hessian

import nbtorch
import refine
from refine.pipeline.strategy import DegeneracyWarning
from refine.targets import make_target

from .refine_cases import model, observe

FREE = ["cell", "orientation", "distance", "beam_center", "scale"]


def _nll_hessian(res, obs):
    par, s = res.par, res.setup
    o = obs.reshape(-1)
    t = make_target("poisson")

    def nll(x):
        return t.loss(nbtorch.simulate(par.unpack(x), s, check=False).reshape(-1), o)

    return hessian(nll)(res.x.detach())


def test_esd_equals_inverse_hessian_of_the_nll_at_an_exact_fit():
    """With noise-free data the fit reproduces the data exactly, where the Hessian of the Poisson NLL equals the
    Fisher matrix JᵀWJ that LM inverts: the covariances must agree to rounding."""
    p, s, _ = model("-detpixels 48")
    obs = nbtorch.simulate(p, s)
    res = refine.fit(obs, p, s, free=FREE, crystal_system="orthorhombic", coarse_to_fine=False)
    assert res.converged
    assert float(res.x.abs().max()) < 1e-6
    cov_h = torch.linalg.inv(_nll_hessian(res, obs))
    sd = cov_h.diagonal().sqrt()
    assert float(((res.covariance - cov_h) / sd[:, None] / sd[None, :]).abs().max()) < 1e-4
    assert res.esd_factor == 1.0


def test_esd_close_to_inverse_hessian_with_noise():
    p, s, _ = model("-detpixels 48")
    obs = observe(p, s, seed=11)
    res = refine.fit(obs, p, s, free=FREE, crystal_system="orthorhombic", coarse_to_fine=False)
    assert res.converged
    esd_h = torch.sqrt(torch.linalg.inv(_nll_hessian(res, obs)).diagonal())
    torch.testing.assert_close(res.x_esd, esd_h, rtol=0.1, atol=0)


@pytest.mark.slow
def test_coverage_over_noise_realisations():
    """|error|/ESD < 3 in at least 90 % of (realisation, parameter) cases, and the ESDs are not inflated either
    (median |z| close to the normal 0.67)."""
    p, s, _ = model("-detpixels 64")
    z = []
    for seed in range(12):
        obs = observe(p, s, seed=100 + seed)
        res = refine.fit(obs, p, s, free=FREE, crystal_system="orthorhombic", coarse_to_fine=False)
        assert res.converged, res.message
        # the start is the truth, so x (increments about it) is the error
        z.extend((res.x / res.x_esd).abs().tolist())
    z = np.asarray(z)
    assert len(z) == 12 * 10
    assert np.mean(z < 3) >= 0.9, np.sort(z)[-15:]
    assert 0.4 < np.median(z) < 1.0, np.median(z)


def test_least_squares_esd_scaled_by_reduced_chi2():
    p, s, _ = model("-detpixels 48")
    obs = observe(p, s, seed=2)
    res = refine.fit(obs, p, s, free=["distance", "beam_center", "scale"], target="lsq", coarse_to_fine=False)
    assert res.converged
    assert res.esd_factor == pytest.approx(res.chi2_reduced)
    assert res.chi2_reduced > 1.0  # photons: the variance of Poisson data is the mean
    res_none = refine.fit(obs, p, s, free=["distance", "beam_center", "scale"], target="lsq", coarse_to_fine=False,
                          esd_scale="none")
    torch.testing.assert_close(res.x_esd, res_none.x_esd * res.chi2_reduced ** 0.5, rtol=1e-6, atol=0)


def test_degenerate_combination_is_reported():
    """A crystal rotation about the beam and an in-plane detector rotation move the pattern identically."""
    p, s, _ = model("-detpixels 32")
    obs = observe(p, s)
    with pytest.warns(DegeneracyWarning, match="orientation.x and detector_rotation.x"):  # said before the fit
        res = refine.fit(obs, p, s, free=["orientation.x", "detector_rotation.x", "scale"], coarse_to_fine=False,
                         max_iter=3)
    assert "undetermined combination of orientation.x, detector_rotation.x" in res.message
    assert np.isfinite(res.x_esd.numpy()).all()
