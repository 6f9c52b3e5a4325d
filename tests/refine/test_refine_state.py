"""A fit you can drive: FitOptions, prepare/run_stage/finish, start= and the history."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import refine
from refine.pipeline.strategy import Stage, default_stages, prepare, run_stage, schedule
from refine.targets import Objective, make_target

from .refine_cases import model, observe, with_detector

FREE = ("distance", "beam_center", "scale")
OPTIONS = refine.FitOptions(free=FREE, coarse_iter=3, robust_iter=3)


@pytest.fixture(scope="module")
def case():
    p, s, _ = model("-detpixels 40")
    obs = observe(p, s, seed=5)
    start = with_detector(p, distance=p.detector.distance + 0.6,
                          beam_center=p.detector.beam_center + torch.tensor([0.1, -0.1], dtype=torch.float64))
    return p, s, obs, start


@pytest.fixture(scope="module")
def fitted(case):
    """The default coarse-to-fine fit of the case (shared: fits are the slow part)."""
    p, s, obs, start = case
    return refine.fit(obs, start, s, options=OPTIONS)


def test_options_are_frozen_validated_and_overridable():
    o = refine.FitOptions(free="distance, scale", max_iter=5, bounds={"distance": (59, 61)})
    assert o.free == ("distance", "scale") and o.final_max_iter == 5 and o.bounds["distance"] == (59, 61)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.max_iter = 3
    with pytest.raises(TypeError):
        o.bounds["cell"] = (1, 2)
    assert o.replace(method="adam").final_max_iter == 5 and refine.FitOptions(method="adam").final_max_iter == 300
    with pytest.raises(TypeError, match="unknown fit option 'maxiter'"):
        o.replace(maxiter=3)
    for kw, match in [(dict(method="newton"), "method must be one of lm"), (dict(max_iter=-1), "max_iter must be"),
                      (dict(chunk_pixels=0), "chunk_pixels must be an integer >= 1"), (dict(ftol=0), "ftol"),
                      (dict(crystal_system="rhombic"), "crystal_system must be one of auto"),
                      (dict(search_distance=2.0), r"search_distance must be within \[0, 0.5\]"),
                      (dict(free=["cel"]), "unknown parameter group"),
                      (dict(coarse_to_fine=["fine"]), "coarse_to_fine"),
                      (dict(background=(1, 2)), "background must be 3 numbers")]:
        with pytest.raises(ValueError, match=match):
            refine.FitOptions(**kw)


def test_schedule_marks_all_but_the_last_stage_preliminary():
    o = refine.FitOptions()
    assert [s.preliminary for s in schedule(o)] == [True, True, True, True, False]
    assert [s.name for s in schedule(o, resuming=True)] == ["fine"]
    assert [s.name for s in schedule(o.replace(coarse_to_fine=True), resuming=True)][-1] == "fine"
    custom = schedule(o.replace(coarse_to_fine=[Stage("a"), Stage("b", preliminary=True), Stage("c")]))
    assert [s.preliminary for s in custom] == [True, True, False]


def test_fit_is_prepare_run_stage_finish(case, fitted):
    """refine.fit equals the same stages run one by one, and a saved state continues exactly (states are values)."""
    p, s, obs, start = case
    res = fitted
    state = prepare(obs, start, s, OPTIONS)
    saved = None
    for stage in default_stages(3, 3):
        if stage.name == "robust":
            saved = state
        state = run_stage(state, stage)
    assert torch.equal(state.x, res.x)
    again = run_stage(run_stage(saved, default_stages(3, 3)[3]), default_stages(3, 3)[4])
    assert torch.equal(again.x, state.x)
    key = [(h["stage"], h["iteration"], h["loss"]) for h in again.history]
    assert key == [(h["stage"], h["iteration"], h["loss"]) for h in state.history]
    assert len(saved.stages) == 3  # the saved state was not changed by running on from it
    out = refine.finish(state)
    torch.testing.assert_close(out.x_esd, res.x_esd)
    assert [h["stage"] for h in res.history][-1] == "fine" and all("pixels" in h for h in res.history)


def test_keywords_equal_options(case):
    p, s, obs, start = case
    a = refine.fit(obs, start, s, free=list(FREE), coarse_to_fine=False, max_iter=4)
    b = refine.fit(obs, start, s, options=refine.FitOptions(free=FREE, coarse_to_fine=False, max_iter=4))
    assert torch.equal(a.x, b.x)
    merged = refine.fit_options(refine.FitOptions(free=FREE, max_iter=30), coarse_to_fine=False, max_iter=4,
                                method=None)
    assert (merged.free, merged.max_iter, merged.coarse_to_fine, merged.method) == (FREE, 4, False, "lm")
    with pytest.raises(TypeError, match="unknown fit option"):
        refine.fit(obs, start, s, free=list(FREE), maxiter=3)


def test_start_from_a_converged_result_converges_at_once(case, fitted):
    p, s, obs, start = case
    res = fitted
    assert res.converged
    again = refine.fit(obs, start, s, free=list(FREE), start=res)
    assert again.converged and again.iterations <= 2 and [st["stage"] for st in again.stages] == ["fine"]
    torch.testing.assert_close(again.x, res.x, rtol=0, atol=0.05 * float(res.x_esd.min()))
    # increments work as well, and a Result whose model differs in a fixed parameter is refused
    inc = refine.fit(obs, start, s, free=list(FREE), start=res.x, coarse_to_fine=False)
    assert inc.iterations <= 2
    moved = refine.fit(obs, start, s, free=["distance", "scale"], coarse_to_fine=False, max_iter=2)
    with pytest.raises(ValueError, match="differs from the starting model in .*detector.distance"):
        refine.fit(obs, start, s, free=["beam_center"], start=moved)
    with pytest.raises(ValueError, match="start must be 4 finite increments"):
        refine.fit(obs, start, s, free=list(FREE), start=[0.0, 1.0])


def test_history_losses_are_per_stage_and_comparable_on_all_pixels(fitted, tmp_path):
    res = fitted
    ran = [st for st in res.stages if not st["message"].startswith("skipped")]
    assert [st["stage"] for st in ran] in (["search", "robust", "fine"], [s.name for s in default_stages()])
    # each stage's iterations are monotone (LM accepts only downhill steps) on its own pixels and target
    for st in ran:
        L = [h["loss"] for h in res.history if h["stage"] == st["stage"]]
        assert all(b <= a for a, b in zip(L, L[1:])), st["stage"]
    # the comparable loss (fit's target, real model, all usable pixels) ends where the result says
    assert res.stages[-1]["loss_all"] == pytest.approx(res.loss_all, rel=1e-12)
    assert res.loss_all == pytest.approx(res.loss, rel=1e-12)
    assert res.loss_all < res.start_loss
    assert all(math.isfinite(st["loss_all"]) for st in ran)
    pytest.importorskip("matplotlib")
    res.plot_loss(str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_targets_are_immutable_and_invalid_models_are_rejected_explicitly(case):
    p, s, obs, start = case
    t = make_target("lsq", weights=np.ones((40, 40)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.weights = None
    par = refine.parameterise(p, s, ["cell"], crystal_system="triclinic")
    obj = Objective(par, obs, np.ones((40, 40), bool), t)
    assert obj.groups[0].w is not None and t.weights is not None and obj.groups[0].w.shape == (1600,)
    bad = par.zeros()
    bad[par.index("cell.alpha")[0]] = 80.0  # α = β = 170°, γ = 90°: no such cell, the lattice is NaN
    bad[par.index("cell.beta")[0]] = 80.0
    assert obj.loss(bad) == math.inf
    assert obj.loss_and_grad(bad)[0] == math.inf
    assert obj.normal_equations(bad)[0] == math.inf
    assert math.isfinite(obj.loss(par.zeros()))
