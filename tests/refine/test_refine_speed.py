"""What makes a refinement cheaper without changing its result (issue 24, item 4): the log scale's Jacobian column in
closed form, chord steps in Levenberg–Marquardt, the loss memo shared by a problem's objectives, and broadened stages
skipped when the spots are already in place."""
from __future__ import annotations

import numpy as np
import torch

import refine
from refine.minimise import lm
from refine.model.parameters import parameterise
from refine.pipeline.stages import spots_close
from refine.targets import Objective, make_target, usable_mask
from refine.targets import objective as objective_module

from .refine_cases import model, observe, rotate_crystal, with_detector

FREE = ["orientation", "distance", "beam_center", "scale", "background"]


def _problem(extra: str = "-detpixels 40", free=FREE, target: str = "poisson"):
    p, s, _ = model(extra)
    obs = observe(p, s, plane=(3.0, 1.0, -1.0))
    start = with_detector(rotate_crystal(p, [1, 1, 0], 0.05), distance=p.detector.distance + 0.2)
    par = parameterise(start, s, free, background=(2.0, 0.0, 0.0))
    return par, Objective(par, obs, usable_mask(obs.numpy(), s), make_target(target), chunk_pixels=500)


def test_scale_column_in_closed_form_equals_forward_mode(monkeypatch):
    """∂m/∂x_scale = scale·(m − plane) (Bragg photons ∝ fluence) gives the normal equations forward mode gives,
    several chunks and the plane included."""
    par, obj = _problem()
    x = par.zeros() + 0.01
    L, blk, ms = obj.normal(x)
    monkeypatch.setattr(objective_module.ImageGroup, "_closed_scale", lambda self, spec: False)
    L2, blk2, ms2 = obj.normal(x)
    H, g = blk.dense()
    H2, g2 = blk2.dense()
    assert L == L2
    torch.testing.assert_close(H, H2, rtol=1e-9, atol=1e-9 * float(H2.abs().max()))
    torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-9 * float(g2.abs().max()))


def test_scale_column_with_water_stays_forward_mode():
    """With water (∝ fluence²) the scale's column is not scale·(m − plane): forward mode is kept."""
    par, obj = _problem("-detpixels 32 -water 0.005")
    spec = [s.spec for s in par.scalars if s.spec.leaf == "beam.fluence"][0]
    assert not obj.groups[0]._closed_scale(spec)


def test_chord_gradient_at_the_kept_point_is_the_gradient():
    """A chord step's normal equations at the point the Jacobian was kept are the normal equations there; elsewhere
    they keep H and take the new gradient J₀ᵀ·∂L/∂m."""
    par, obj = _problem()
    x0 = par.zeros()
    L, blk, ms = obj.normal(x0, keep=True)
    Lc, blk_c, _ = obj.chord(x0, ms)
    assert Lc == L
    torch.testing.assert_close(blk_c.dense()[1], blk.dense()[1], rtol=1e-12, atol=0.0)
    x1 = x0 + 1e-4
    L1, ms1 = obj.loss_models(x1)
    L1c, blk1c, _ = obj.chord(x1, ms1)
    exact = obj.normal(x1)[1]
    assert L1c == L1
    torch.testing.assert_close(blk1c.dense()[0], blk.dense()[0])
    g1, g1c = exact.dense()[1], blk1c.dense()[1]
    assert 0 < float((g1 - g1c).norm()) < 0.2 * float(g1.norm())  # near: close to the gradient, not equal
    torch.testing.assert_close(g1c[-3:], g1[-3:], rtol=1e-10, atol=0.0)  # the plane's columns are constant


def test_lm_with_chord_steps_reaches_the_same_minimum(monkeypatch):
    """Levenberg–Marquardt with chord steps converges (decided on a new Jacobian) to the minimum it reaches with a
    Jacobian every step, within a small fraction of a standard error, in fewer Jacobians."""
    par, obj = _problem()
    calls = []
    normal = Objective.normal
    monkeypatch.setattr(Objective, "normal", lambda self, *a, **k: calls.append(1) or normal(self, *a, **k))
    with_chords = lm.levenberg_marquardt(obj, par.zeros(), max_iter=30)
    n_chords = len(calls)
    monkeypatch.setattr(lm, "MAX_CHORDS", 0)
    calls.clear()
    plain = lm.levenberg_marquardt(obj, par.zeros(), max_iter=30)
    assert with_chords.converged and plain.converged and with_chords.normal is not None
    sigma = torch.sqrt(torch.diagonal(torch.linalg.inv(plain.normal[1].dense()[0])))
    assert float(((with_chords.x - plain.x).abs() / sigma).max()) < 0.05
    assert abs(with_chords.loss - plain.loss) < 2e-3
    assert n_chords <= len(calls)


def test_a_loss_is_computed_once_per_problem_and_point(monkeypatch):
    """The loss at X after the normal equations at X, or from another objective of the same problem, is the one
    already computed (no model pass); another point, target or observed image computes its own."""
    p, s, _ = model("-detpixels 40")
    obs = observe(p, s)
    par = parameterise(p, s, ["distance", "scale"])
    usable, target = usable_mask(obs.numpy(), s), make_target("poisson")
    obj = Objective(par, obs, usable, target)
    x = par.zeros()
    L = obj.normal(x)[0]
    passes = []
    models = Objective.models
    monkeypatch.setattr(Objective, "models", lambda self, X, *a: passes.append(1) or models(self, X, *a))
    assert obj.loss(x) == L and not passes
    twin = Objective(par, obs, usable, target)  # another objective of the same problem
    assert twin.loss(x) == L and not passes
    assert twin.loss(x + 1e-3) != L and len(passes) == 1
    Objective(par, obs, usable, make_target("anscombe")).loss(x)
    Objective(par, obs.clone(), usable, target).loss(x)
    assert len(passes) == 3


def test_spots_close_tells_spots_in_place_from_displaced_ones():
    """The observed spots against the true model: in place; against the model a pixel off: not; no spots: not
    (nothing to tell)."""
    p, s, _ = model("-detpixels 64")
    truth = refine.model.predict.predict_image(parameterise(p, s, ["scale"]), torch.zeros(1)).numpy().ravel()
    obs = observe(p, s).numpy().ravel()
    bg = np.zeros_like(obs)
    assert spots_close(obs, truth, bg)
    far = with_detector(p, beam_center=p.detector.beam_center + torch.tensor([0.2, 0.2], dtype=torch.float64))
    moved = refine.model.predict.predict_image(parameterise(far, s, ["scale"]), torch.zeros(1)).numpy().ravel()
    assert not spots_close(obs, moved, bg)
    assert not spots_close(np.zeros_like(obs), np.zeros_like(obs), bg)


def test_broadened_stages_are_skipped_when_the_spots_are_in_place():
    """A start within a fraction of a pixel skips coarse and medium (and says why) and reaches what the full schedule
    reaches; a start twice the spots' angular width off runs them."""
    p, s, _ = model("-detpixels 64")
    obs = observe(p, s)
    near = with_detector(p, distance=p.detector.distance + 0.1)
    fast = refine.fit(obs, near, s, free=["distance", "beam_center", "scale"])
    msgs = {st["stage"]: st["message"] for st in fast.stages}
    assert "in place" in msgs["coarse"] and "in place" in msgs["medium"]
    full = refine.fit(obs, near, s, free=["distance", "beam_center", "scale"], coarse_to_fine=tuple(
        __import__("dataclasses").replace(st, skip_in_place=False) for st in refine.default_stages()))
    assert all("in place" not in st["message"] for st in full.stages)
    for k in ("distance", "beam_center.x", "beam_center.y", "scale"):
        assert abs(fast.values[k] - full.values[k]) < 0.1 * fast.esd[k]
    far = rotate_crystal(p, [1, 0, 0], 2.0)  # twice the spots' angular width, which the search does not correct
    slow = refine.fit(obs, far, s, free=["orientation", "scale"], max_iter=3)
    coarse = [st for st in slow.stages if st["stage"] == "coarse"][0]
    assert coarse["iterations"] > 0 and "in place" not in coarse["message"]  # (medium may find them in place)


def test_the_loss_memo_does_not_keep_a_problem_alive():
    """The memo holds a problem's objects weakly: once they are gone, so are its entries."""
    import gc
    import weakref

    p, s, _ = model("-detpixels 32")
    obs = observe(p, s)
    par = parameterise(p, s, ["distance", "scale"])
    obj = Objective(par, obs, usable_mask(obs.numpy(), s), make_target("poisson"))
    obj.normal(par.zeros())
    key, ref = obj._problem, weakref.ref(par)
    assert any(k[0] == key for k in objective_module._LOSSES)
    del obj, par
    gc.collect()
    assert ref() is None
    with objective_module._LOCK:
        objective_module._memo_get(None)
    assert not any(k[0] == key for k in objective_module._LOSSES)
