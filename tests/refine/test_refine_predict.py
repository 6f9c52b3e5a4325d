"""Prediction: make_predict equals simulate + the background plane, renders only the pixels asked for, and the
objective's memory follows its chunks, not the detector."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import jacfwd

import nbtorch
import refine.model.predict as predict_mod
from refine.model.parameters import parameterise
from refine.model.predict import make_predict, pixel_index, plane_basis, predict_image
from refine.targets import Objective, make_target

from .refine_cases import model, observe


def _par(extra="-detpixels 24", free=("distance", "beam_center", "orientation", "scale", "background")):
    p, s, _ = model(extra)
    par = parameterise(p, s, list(free), background=(3.0, 1.0, -2.0))
    x = par.zeros()
    x[par.index("distance")[0]] = 0.3
    x[par.index("background.fast")[0]] = 0.5
    return p, s, par, x


def test_predict_equals_simulate_plus_plane():
    p, s, par, x = _par()
    img = nbtorch.simulate(par.unpack(x), s) + (par.plane(x) @ plane_basis(s)).reshape(24, 24)
    torch.testing.assert_close(predict_image(par, x), img, rtol=1e-13, atol=0)
    rng = np.random.default_rng(0)
    idx = rng.choice(24 * 24, size=50, replace=False)  # any order
    torch.testing.assert_close(make_predict(par, s, idx)(x), img.reshape(-1)[torch.as_tensor(idx)], rtol=1e-13,
                               atol=0)
    mask = np.zeros((24, 24), bool)
    mask[3:9, 5:20] = True
    torch.testing.assert_close(make_predict(par, s, mask)(x), img[torch.as_tensor(mask)], rtol=1e-13, atol=0)
    m = make_predict(par, s, idx)
    torch.testing.assert_close(m.bragg(x) + m.background(x), m(x))


def test_predict_jacobian_equals_the_jacobian_of_simulate_plus_plane():
    p, s, par, x = _par("-detpixels 12")
    idx = np.arange(0, 144, 7)

    def reference(xx):
        full = nbtorch.simulate(par.unpack(xx), s).reshape(-1) + par.plane(xx) @ plane_basis(s)
        return full[torch.as_tensor(idx)]

    torch.testing.assert_close(jacfwd(make_predict(par, s, idx))(x), jacfwd(reference)(x), rtol=1e-10, atol=1e-12)


def test_predict_image_respects_roi_and_has_no_plane_when_none_is_free():
    p, s, _ = model("-detpixels 20 -roi 2 9 4 15")
    par = parameterise(p, s, ["distance"])
    assert not par.has_plane() and make_predict(par).basis is None
    img = predict_image(par, par.zeros())
    torch.testing.assert_close(img, nbtorch.simulate(p, s))
    assert float(img[:4].abs().max()) == 0.0 and float(img[:, 10:].abs().max()) == 0.0


@pytest.mark.parametrize("pixels,match", [(np.zeros((5, 5), bool), "shape"), (np.array([0, 400]), "within"),
                                          (np.array([-1]), "within")])
def test_bad_pixel_choices_are_refused(pixels, match):
    p, s, _ = model("-detpixels 20")
    with pytest.raises(ValueError, match=match):
        pixel_index(pixels, s)


def test_objective_renders_chunks_only(monkeypatch):
    """Normal equations and gradients never render more than one chunk of pixels at a time: memory follows
    chunk_pixels × parameters, not the detector."""
    p, s, _ = model("-detpixels 40")
    obs = observe(p, s)
    par = parameterise(p, s, ["distance", "beam_center", "scale"])
    sizes = []
    real = predict_mod.simulate_pixels

    def spy(params, setup, index, check=True, fused=None):
        sizes.append(int(index.shape[0]))
        return real(params, setup, index, check=check, fused=fused)

    monkeypatch.setattr(predict_mod, "simulate_pixels", spy)
    obj = Objective(par, obs, np.ones((40, 40), bool), make_target("poisson"), chunk_pixels=300)
    obj.normal_equations(par.zeros())
    obj.loss_and_grad(par.zeros())
    assert sizes and max(sizes) <= 300 and sum(sizes) == 2 * 1600
