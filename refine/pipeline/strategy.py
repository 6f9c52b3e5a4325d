"""Running a stage: ``run_stage(state, stage) -> state``, the same for one image and for many.

    state = refine.prepare(observed, params, setup, options)      # the problem and the starting point
    for stage in refine.default_stages():
        state = refine.run_stage(state, stage)                      # pure: the old state stays valid
    result = refine.finish(state)

A sharp still has a narrow basin, so a fit runs the coarse-to-fine stages of
:func:`~refine.pipeline.stages.default_stages` (docs/refine.md, "Stages", says why each exists): search (broadened
spots, linear pre-fits, distance × beam-centre search), coarse and medium (geometry only, broadened), robust, and the
final stage (the real model and the fit's target).  A preliminary stage fits at most ``prelim_pixels`` random pixels
with its own target, trust region and tolerance, and is skipped when it has nothing to do (:func:`skip_reason`).
Every iteration is recorded with the loss on its stage's pixels, model and target; every stage records ``loss_all``,
its end point's loss with the fit's target and real model on all usable pixels, comparable between stages.  With
several images the pre-fit and the search act per image (the search only where an image's distance and beam centre
are its own; a shared scale starts at the images' mean), pixels are chosen per image, and Levenberg–Marquardt solves
the shared + per-image blocks (:mod:`refine.minimise.solve`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..minimise import MINIMISERS
from ..minimise.lm import InfiniteStart, MinimizeResult
from ..model.parameters import Parameterisation, parameterise
from ..model.predict import make_predict, predict_image
from ..model.table import GEOMETRY_GROUPS, GROUPS, POSITION_GROUPS  # noqa: F401  (re-exported)
from ..targets import Objective, make_target, select_pixels
from .options import FitOptions
from .problem import DegeneracyWarning, FinalRun, FitState, Problem, prepare  # noqa: F401  (re-exported)
from .search import prefit_scale, search_geometry, translation_search  # noqa: F401  (re-exported)
from .stages import PRELIMINARY_FTOL, TRUST, Stage, apply_stage, default_stages, spots_close  # noqa: F401


def schedule(options: FitOptions, resuming: bool = False) -> List[Stage]:
    """The stages a fit runs: ``coarse_to_fine`` resolved ('auto': the default stages, or only the final stage when
    ``resuming`` from a Result; False: only the final stage), all but the last marked preliminary unless a stage
    says otherwise; ``max_iter=0``: only the final stage, which evaluates the start)."""
    ctf = options.coarse_to_fine
    if options.max_iter == 0:  # no iterations at all: the starting model evaluated, with its ESDs
        return [Stage("fine", preliminary=False)]
    if ctf is True or (ctf == "auto" and not resuming):
        return default_stages(options.coarse_iter, options.robust_iter)
    stages = [Stage("fine")] if ctf in (False, None, "auto") else list(ctf)
    out = [s if s.preliminary is not None else dataclasses.replace(s, preliminary=True) for s in stages[:-1]]
    last = stages[-1]
    return out + [last if last.preliminary is not None else dataclasses.replace(last, preliminary=False)]


# ---------------------------------------------------------------------------------------------------------------
# one stage


def _stage_pars(pb: Problem, stage: Stage) -> Tuple[Parameterisation, ...]:
    """Every image's parameterisation for the stage: the same scalars about the stage's broadened model (the fit's
    own when the stage does not broaden)."""
    o, out = pb.options, []
    for par in pb.pars:
        sp, ss = apply_stage(par.ref, par.setup, stage)
        out.append(par if (sp is par.ref and ss is par.setup) else parameterise(
            sp, ss, o.free, crystal_system=par.crystal_system, ncells_mode=o.ncells_mode,
            background=par.background_ref, bounds=o.bounds, priors=o.priors, psf=par.psf, boxes=par.boxes))
    return pb.pars if all(a is b for a, b in zip(out, pb.pars)) else tuple(out)


def _active(pb: Problem, pars: Sequence[Parameterisation], stage: Stage) -> List[int]:
    """Positions in X refined by the stage.  A spot-ROI fit's per-region planes stay fixed in the preliminary stages:
    with spots broadened or still a few pixels off, a box's plane would take up the observed spot (or sink below the
    background to make room for the model's), and the geometry would not move; the final stage frees them."""
    groups = None if stage.active is None else list(stage.active)
    if stage.preliminary and any(par.boxes is not None for par in pars):
        every = list(GROUPS if groups is None else groups)
        groups = [g for g in every if g != "background"] + (["background.water"] if "background" in every else [])
    if groups is None:
        return list(range(pb.layout.n))
    return sorted({pb.layout.position(i, j) for i, par in enumerate(pars) for g in groups for j in par.index(g)})


def skip_reason(pb: Problem, stage: Stage, par: Parameterisation, active: List[int]) -> str:
    """Why a preliminary stage has nothing to do ('' when it runs; a non-preliminary stage always runs): it would
    minimise but none of its groups is free, or it broadens spots while nothing that moves spots is free, or it does
    not minimise and has no search, pre-fit or spot selection to do."""
    if not stage.preliminary:
        return ""
    if stage.max_iter != 0:
        if not active:
            return "none of its groups is free"
        if stage.broadened and not any(par.index(g) for g in POSITION_GROUPS):
            return "broadened spots help only when something that moves spots is free"
        return ""
    if not (stage.search_beam_center or stage.prefit_scale or pb.options.spots_only):
        return "nothing to do"
    return ""


def spots_in_place(pb: Problem, x: torch.Tensor) -> bool:
    """Every image's real model at X already has its spots on the observed ones (:func:`~refine.pipeline.stages.
    spots_close`, the background being the model's plane plus the median of the rest): broadened spots would not
    widen a basin the fit is already in.  The models come from the last loss on every usable pixel (no pass)."""
    _, models = pb.objective.loss_models(x)
    for i, par in enumerate(pb.pars):
        idx = pb.usable_index[i]
        with torch.no_grad():
            plane = make_predict(par, par.setup, idx, pb.options.fused).background(pb.layout.image_x(x, i))
        m, b = models[i].detach().cpu().numpy(), plane.detach().cpu().numpy()
        b = b + float(np.median(m - b))
        if not spots_close(pb.observed[i].reshape(-1)[idx].detach().cpu().numpy(), m, b):
            return False
    return True


def _searchable(pb: Problem, i: int, par: Parameterisation) -> bool:
    """The geometry search moves image ``i``'s distance and beam centre: only when they are free and its own, on
    nanoBragg's one-panel detector (the search correlates one [slow, fast] image), and not in a spot-ROI fit (its
    boxes sit on the observed spots: a start whose spots lie outside them is beyond the search anyway, and the
    search would render the whole image)."""
    own = [j for g in ("distance", "beam_center") for j in par.index(g)]
    return (bool(own) and par.setup.panels is None and par.boxes is None
            and not any(j in pb.layout.shared_pos[i] for j in own))


def _prefit_and_search(pb: Problem, stage: Stage, pars, x: torch.Tensor, what: str = "") -> Tuple[torch.Tensor, dict]:
    """The stage's linear pre-fit of scale and constant background, and its geometry search, image by image; a
    shared value starts at the images' mean; ``progress(what, k, N)`` after each image when ``what`` is given.
    Returns (X, what the search found)."""
    o, lay = pb.options, pb.layout
    xs, found = [lay.image_x(x, i) for i in range(len(pars))], []
    for i, par in enumerate(pars):
        if stage.prefit_scale:
            model = make_predict(par, par.setup, pb.usable_index[i], o.fused)
            with torch.no_grad():
                o_px = pb.observed[i].reshape(-1)[model.index]
                xs[i] = prefit_scale(par, xs[i], o_px, model.bragg(xs[i]), model.background(xs[i]))
        if stage.search_beam_center and _searchable(pb, i, par):
            xs[i], info = search_geometry(par, xs[i], pb.observed[i].detach().cpu().numpy(), pb.usable[i],
                                          o.max_shift, o.search_distance, 0.01)
            found.append(info)
        if what and pb.progress is not None:
            pb.progress(what, i + 1, len(pars))
    X = lay.pack(xs)
    if len(pars) > 1 and lay.shared:
        X[:len(lay.shared)] = torch.stack([x_i[list(p)] for x_i, p in zip(xs, lay.shared_pos)]).mean(0)
    return X, (found[0] if len(found) == 1 else ({"search": found} if found else {}))


def start_scales(pb: Problem, x: torch.Tensor) -> torch.Tensor:
    """X with every image's free scale (and constant background) pre-fitted linearly on its usable pixels with the
    real model (progress 'starting scales'): how a joint fit starts."""
    if not any(par.index("scale") or par.index("background.constant") for par in pb.pars):
        return x
    return _prefit_and_search(pb, Stage("start", prefit_scale=True), pb.pars, x, "starting scales")[0]


def _stage_pixels(state: FitState, stage: Stage, pars, x: torch.Tensor) -> Tuple[np.ndarray, ...]:
    """Each image's pixels for the stage: spots and a background sample when ``spots_only``; a random subset of at
    most ``prelim_pixels`` in a preliminary stage (fixed per stage position: images with the same pixels get the
    same subset)."""
    pb, o, out = state.problem, state.problem.options, []
    for i, par in enumerate(pars):
        idx = pb.usable_index[i]
        if o.spots_only:
            model_np = predict_image(par, pb.layout.image_x(x, i), fused=o.fused).cpu().numpy()
            sel = select_pixels(pb.observed[i].detach().cpu().numpy(), model_np, pb.usable[i], dilate=o.spot_dilate,
                                background_fraction=o.background_fraction)
            idx = np.flatnonzero(sel.reshape(-1))
        if stage.preliminary and o.prelim_pixels and len(idx) > o.prelim_pixels:
            rng = np.random.default_rng(len(state.stages))
            idx = np.sort(rng.choice(idx, size=int(o.prelim_pixels), replace=False))
        out.append(idx)
    return tuple(out)


def _bounds(pb: Problem, pars, x: torch.Tensor, trust: Optional[float]):
    """The stage's trust region on X: every scalar but the linear background within ``trust`` typical errors of
    where the stage starts (None, None without one)."""
    if trust is None:
        return None, None
    width = pb.layout.pack([par.typical() for par in pars]) * float(trust)
    free = pb.layout.pack([torch.tensor([s.group == "background" and s.kind == "linear" for s in par.scalars])
                           for par in pars]).to(x.device)
    width = torch.where(free, torch.full_like(width, float("inf")), width)
    return x - width, x + width


def _minimise(objective: Objective, pb: Problem, pars, x: torch.Tensor, active: List[int], stage: Stage,
              record) -> MinimizeResult:
    """Run the fit's minimiser on one stage's objective (trust region, iterations and tolerance of the stage)."""
    o = pb.options
    lo, hi = _bounds(pb, pars, x, stage.trust)
    kw = dict(max_iter=o.final_max_iter if stage.max_iter is None else int(stage.max_iter),
              ftol=o.ftol if stage.ftol is None else stage.ftol, callback=record, lower=lo, upper=hi)
    method = MINIMISERS[o.method]
    kw.update({name: getattr(o, name) for name in method.options})
    return method.minimise(objective, x, active, **kw)


def _recorder(state: FitState, stage: Stage, n_pixels: int):
    """(records, record): the stage's iteration records and the callback that adds one (and tells the user's)."""
    records: List[dict] = []
    callback = state.problem.options.callback

    def record(h):
        records.append(dict(h, stage=stage.name, pixels=n_pixels))
        if callback:
            callback(records[-1])

    return records, record


def run_stage(state: FitState, stage: Stage) -> FitState:
    """Run one stage from ``state`` and return the new state (``state`` is unchanged, so a saved state can be run
    again and continues exactly).  See :class:`~refine.pipeline.stages.Stage` for what a stage does."""
    pb, o, t0 = state.problem, state.problem.options, time.perf_counter()
    pars = _stage_pars(pb, stage)
    active = _active(pb, pars, stage)
    info = dict(stage=stage.name, iterations=0, loss=None, message="")
    reason = skip_reason(pb, stage, pars[0], active)
    if (not reason and stage.skip_in_place and stage.broadened and stage.preliminary and stage.max_iter != 0
            and spots_in_place(pb, state.x)):
        reason = "the spots are already in place"
    if reason:
        info.update(message=f"skipped: {reason}", seconds=0.0, pixels=0, loss_all=None)
        return dataclasses.replace(state, stages=state.stages + (info,))
    x, found = _prefit_and_search(pb, stage, pars, state.x) if (
        stage.prefit_scale or stage.search_beam_center) else (state.x, {})
    info.update(found)
    pixels = _stage_pixels(state, stage, pars, x)
    n_pixels = sum(len(p) for p in pixels)
    target = pb.target if stage.target in (None, pb.target.name) else make_target(stage.target,
                                                                                  read_noise=o.read_noise)
    objective = pb.objective_on(pars, pixels, target, stage.name)
    records, record = _recorder(state, stage, n_pixels)
    run, final = None, state.final
    if stage.max_iter != 0 and active:
        try:
            run = _minimise(objective, pb, pars, x, active, stage, record)
        except InfiniteStart:
            if not stage.preliminary:
                raise
            info.update(message="skipped: infinite loss at the start of the stage")
        else:
            x = run.x
            info.update(iterations=run.iterations, evaluations=run.evaluations, loss=run.loss, message=run.message,
                        converged=bool(run.converged))
    if run is not None and not stage.preliminary:
        real = pars is pb.pars and target is pb.target
        final = FinalRun(x, bool(run.converged), run.message, pixels, target.name, run.normal if real else None)
    loss_all = pb.objective.loss(x)
    if stage.preliminary and not math.isfinite(loss_all) and math.isfinite(pb.objective.loss(state.x)):
        # a robust target tolerates a model ≤ 0 where photons were seen; the fit's own target does not
        x, loss_all = state.x, pb.objective.loss(state.x)
        info.update(message=info["message"] + " (discarded: the model it reached is not positive where photons were "
                    "observed)")
    info.update(seconds=time.perf_counter() - t0, pixels=n_pixels, loss_all=loss_all)
    return dataclasses.replace(
        state, x=x, history=state.history + tuple(records), stages=state.stages + (info,), final=final,
        iterations=state.iterations + (run.iterations if run else 0),
        evaluations=state.evaluations + (run.evaluations if run else 0), seconds=state.seconds + info["seconds"])
