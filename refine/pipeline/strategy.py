"""Stages as data, the state of a fit, and ``run_stage(state, stage) -> state``.

    state = refine.prepare(observed, params, setup, options)      # the problem and the starting point
    for stage in refine.default_stages():
        state = refine.run_stage(state, stage)                      # pure: the old state stays valid
    result = refine.finish(state)

A sharp still has a narrow basin: spots a pixel or two wide, a beam centre 2–3 pixels off leaves model and observed
spots without overlap, and the cell/distance pair (almost degenerate on a small detector) drifts when everything is
free at once.  :func:`default_stages` therefore refines in stages:

1. ``search`` — spots broadened (N × 0.5, fluence × 2³ so integrated intensities are unchanged); scale (and constant
   background) pre-fitted linearly, then a distance grid with a translation search (:mod:`refine.search`).
2. ``coarse`` (N × 0.3) and ``medium`` (N × 0.6) — the geometry only (orientation, distance, beam centre, tilts,
   two-theta, scale, background); cell, wavelength, N and mosaic fixed so nearly degenerate directions cannot drift.
3. ``robust`` — every free group with the real spot model.
4. ``fine`` — every free group with the real model and the fit's target (Poisson by default), to convergence.

Stages 1–4 are *preliminary*: they only have to bring the model into the final stage's basin.  They use at most
``prelim_pixels`` randomly chosen pixels, stages 2–3 the ``anscombe`` target (bounded where the Poisson NLL of
point-sampled sinc spots is singular), a trust region of :data:`TRUST` typical errors and a loose tolerance; a
preliminary stage is skipped when it has nothing to do (:func:`skip_reason`).  N is broadened in log space, so the
increments x carry over between stages unchanged.

Every iteration is recorded with the loss on the stage's own pixels, model and target; every stage also records
``loss_all``, the loss of its end point with the fit's target and the real model on all usable pixels, which is
comparable from stage to stage.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from typing import List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from nbtorch.types import Params, Setup
from nbtorch.validate import check_params

from ..model.degeneracy import Degeneracy, degenerate_pairs
from ..minimise import MINIMISERS
from ..minimise.lm import MinimizeResult
from .options import FitOptions
from ..model.parameters import Parameterisation, parameterise, total_rotation
from ..model.table import GEOMETRY_GROUPS, POSITION_GROUPS  # noqa: F401  (re-exported)
from .stages import PRELIMINARY_FTOL, TRUST, Stage, apply_stage, default_stages  # noqa: F401  (re-exported)
from ..model.predict import make_predict, predict_image
from .search import prefit_scale, search_geometry, translation_search  # noqa: F401  (re-exported)
from ..targets import Objective, Target, make_target, observed_array, select_pixels, usable_mask


class DegeneracyWarning(UserWarning):
    """A free combination of parameters the image cannot determine (see :mod:`refine.degeneracy`)."""


def schedule(options: FitOptions, resuming: bool = False) -> List[Stage]:
    """The stages :func:`refine.fit` runs: ``coarse_to_fine`` resolved ('auto': the default stages, or only the
    final stage when ``resuming`` from a Result; False: only the final stage), all but the last marked preliminary
    unless a stage says otherwise; ``max_iter=0``: only the final stage, which evaluates the start)."""
    ctf = options.coarse_to_fine
    if options.max_iter == 0:  # no iterations at all: the starting model evaluated, with its ESDs
        return [Stage("fine", preliminary=False)]
    if ctf is True or (ctf == "auto" and not resuming):
        return default_stages(options.coarse_iter, options.robust_iter)
    stages = [Stage("fine")] if ctf in (False, None, "auto") else list(ctf)
    out = [s if s.preliminary is not None else dataclasses.replace(s, preliminary=True) for s in stages[:-1]]
    last = stages[-1]
    return out + [last if last.preliminary is not None else dataclasses.replace(last, preliminary=False)]


def trust_bounds(par: Parameterisation, x: torch.Tensor, trust: Optional[float]):
    """(lower, upper) [n] confining every scalar except the linear background to x ± trust·typical (None, None when
    ``trust`` is None)."""
    if trust is None:
        return None, None
    width = par.typical() * float(trust)
    lin_bg = torch.tensor([s.group == "background" and s.kind == "linear" for s in par.scalars], device=x.device)
    width = torch.where(lin_bg, torch.full_like(width, float("inf")), width)
    return x - width, x + width


# ---------------------------------------------------------------------------------------------------------------
# the problem and the state


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What a fit is about, the same for all its stages: ``observed`` [slow, fast] (photons, non-finite values
    zeroed), ``usable`` (bool [slow, fast]), ``par`` (the parameterisation about the starting model), ``target``
    (the fit's), ``options`` (:class:`~refine.options.FitOptions`), ``notes`` (what a summary should say: the
    crystal system chosen automatically, degenerate pairs), ``degeneracies``."""

    observed: torch.Tensor
    usable: np.ndarray
    par: Parameterisation
    target: Target
    options: FitOptions
    notes: Tuple[str, ...] = ()
    degeneracies: Tuple[Degeneracy, ...] = ()

    @functools.cached_property
    def objective(self) -> Objective:
        """The fit's target on every usable pixel with the real model (what ``loss_all`` evaluates)."""
        o = self.options
        return Objective(self.par, self.observed, self.usable, self.target, o.chunk_pixels, fused=o.fused)

    @functools.cached_property
    def usable_index(self) -> np.ndarray:
        """Flat slow-major indices of the usable pixels."""
        return np.flatnonzero(self.usable.reshape(-1))


class FinalRun(NamedTuple):
    """The last minimisation of a non-preliminary stage: ``x``, ``converged``, ``message``, ``pixels`` (flat
    indices it fitted), ``target`` (name), ``normal`` ((active, H, model) at x when the minimiser computed them on
    the real model, else None)."""

    x: torch.Tensor
    converged: bool
    message: str
    pixels: np.ndarray
    target: str
    normal: Optional[tuple]


@dataclasses.dataclass(frozen=True, eq=False)
class FitState:
    """A fit between stages (immutable; :func:`run_stage` returns a new one).

    ``problem``; ``x`` [n] increments about the starting model; ``history`` (one dict per iteration: stage,
    iteration, loss on the stage's own pixels, step, damping, accepted, seconds, pixels); ``stages`` (one dict per
    stage run or skipped, with ``loss_all`` on all usable pixels); ``iterations``, ``evaluations`` (totals);
    ``start_loss`` (``loss_all`` at the start); ``final`` (:class:`FinalRun` or None); ``seconds`` (stage time).
    """

    problem: Problem
    x: torch.Tensor
    history: Tuple[dict, ...] = ()
    stages: Tuple[dict, ...] = ()
    iterations: int = 0
    evaluations: int = 0
    start_loss: float = math.nan
    final: Optional[FinalRun] = None
    seconds: float = 0.0


def _differing(a: Params, b: Params) -> List[str]:
    """Leaves (and the crystal rotation) in which two models differ beyond rounding."""
    out = []
    for part in ("crystal", "beam", "detector", "background"):
        for name, u in getattr(a, part)._asdict().items():
            v = getattr(getattr(b, part), name)
            if name not in ("misset", "orientation") and (
                    u.shape != v.shape or not torch.allclose(u, v.to(u), rtol=1e-9, atol=1e-12)):
                out.append(f"{part}.{name}")
    if not torch.allclose(total_rotation(a), total_rotation(b).to(a.crystal.cell), rtol=0, atol=1e-12):
        out.append("crystal orientation")
    return out


def start_point(par: Parameterisation, start=None) -> torch.Tensor:
    """Starting increments [n]: zeros (None), the given increments, or a previous :class:`refine.Result`'s refined
    model packed about ``par``'s reference (ValueError when it was fitted on another set-up or differs from the
    reference in parameters that are not free here)."""
    if start is None:
        return par.zeros()
    if hasattr(start, "params") and hasattr(start, "setup"):
        if start.setup != par.setup:
            raise ValueError("start: the Result was fitted with a different Setup than this fit's")
        plane = torch.as_tensor(start.parameters["background"], dtype=par.dtype, device=par.device)
        x = par.pack(start.params, plane)
        bad = _differing(par.unpack(x), start.params)
        if bad:
            raise ValueError(f"start: the Result's model differs from the starting model in {', '.join(bad)}, which "
                             "are not free here: pass result.params as the starting model, or free them")
        return x
    x = torch.as_tensor(start, dtype=par.dtype, device=par.device).reshape(-1)
    if x.shape != (par.n,) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"start must be {par.n} finite increments ({', '.join(par.names) or 'none'}) or a "
                         f"refine.Result; got shape {tuple(x.shape)}")
    return x.clone()


def prepare(observed, params: Params, setup: Setup, options: FitOptions, start=None) -> FitState:
    """The state before the first stage: observed image (tensor, array, ObservedImage or path) and usable pixels,
    parameterisation, target, degenerate pairs (a ``DegeneracyWarning``, or ``ValueError`` unless
    ``options.allow_degenerate``), starting point (:func:`start_point`) and its loss on all usable pixels."""
    check_params(params, setup)  # types, dtype, device and values first: one-line errors before any work
    obs_np, obs_mask = observed_array(observed, setup)
    usable = usable_mask(obs_np, setup, options.mask, options.overload)
    if obs_mask is not None:
        usable &= obs_mask
    if usable.any() and not (np.nan_to_num(obs_np[usable]) > 0).any():
        raise ValueError("the observed image is zero (or negative) in every usable pixel: nothing to fit (a blank or "
                         "wrong file, or an ADC offset (adc) larger than the counts)")
    par = parameterise(params, setup, options.free, crystal_system=options.crystal_system,
                       ncells_mode=options.ncells_mode, background=options.background, bounds=options.bounds,
                       priors=options.priors)
    degs = tuple(degenerate_pairs(par))
    if degs and not options.allow_degenerate:
        raise ValueError(f"{degs[0].message()} (or allow it: allow_degenerate=True)")
    for d in degs:
        warnings.warn(d.message(), DegeneracyWarning, stacklevel=3)
    target = make_target(options.target, read_noise=options.read_noise, weights=options.weights)
    observed_t = torch.as_tensor(np.nan_to_num(obs_np, nan=0.0, posinf=0.0, neginf=0.0), dtype=par.dtype,
                                 device=par.device)
    notes = tuple(n for n in (par.crystal_system_note,) if n) + tuple(d.message() for d in degs)
    problem = Problem(observed_t, usable, par, target, options, notes, degs)
    x0 = start_point(par, start)
    check_params(par.unpack(x0), setup)
    return FitState(problem, x0, start_loss=problem.objective.loss(x0))


# ---------------------------------------------------------------------------------------------------------------
# one stage


def _stage_par(pb: Problem, stage: Stage) -> Parameterisation:
    """The stage's parameterisation (same scalars as the fit's, about the stage's broadened model)."""
    sp, ss = apply_stage(pb.par.ref, pb.par.setup, stage)
    if sp is pb.par.ref and ss is pb.par.setup:
        return pb.par
    o = pb.options
    return parameterise(sp, ss, o.free, crystal_system=pb.par.crystal_system, ncells_mode=o.ncells_mode,
                        background=o.background, bounds=o.bounds, priors=o.priors)


def _active(par: Parameterisation, stage: Stage) -> List[int]:
    """Positions in x refined by the stage."""
    if stage.active is None:
        return list(range(par.n))
    return sorted({i for g in stage.active for i in par.index(g)})


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


def _stage_pixels(state: FitState, stage: Stage, par: Parameterisation):
    """(x, pixel indices, info): the stage's pre-fit and search applied to x, and the pixels it fits (spots and a
    background sample when ``spots_only``; a random subset of at most ``prelim_pixels`` in a preliminary stage)."""
    pb, o, x, info = state.problem, state.problem.options, state.x, {}
    obs_np = pb.observed.detach().cpu().numpy()
    if stage.prefit_scale:
        model = make_predict(par, par.setup, pb.usable_index, o.fused)
        with torch.no_grad():
            o_px = pb.observed.reshape(-1)[model.index]
            x = prefit_scale(par, x, o_px, model.bragg(x), model.background(x))
    if stage.search_beam_center and (par.index("beam_center") or par.index("distance")):
        x, found = search_geometry(par, x, obs_np, pb.usable, o.max_shift, o.search_distance, 0.01)
        info.update(found)
    idx = pb.usable_index
    if o.spots_only:
        model_np = predict_image(par, x, fused=o.fused).cpu().numpy()
        sel = select_pixels(obs_np, model_np, pb.usable, dilate=o.spot_dilate,
                            background_fraction=o.background_fraction)
        idx = np.flatnonzero(sel.reshape(-1))
    if stage.preliminary and o.prelim_pixels and len(idx) > o.prelim_pixels:
        rng = np.random.default_rng(len(state.stages))  # the stage's position: a fixed subset per schedule
        idx = np.sort(rng.choice(idx, size=int(o.prelim_pixels), replace=False))
    return x, idx, info


def _minimise(objective: Objective, x: torch.Tensor, active: List[int], stage: Stage, options: FitOptions,
              record) -> MinimizeResult:
    """Run the fit's minimiser on one stage's objective (trust region, iterations and tolerance of the stage)."""
    lo, hi = trust_bounds(objective.par, x, stage.trust)
    kw = dict(max_iter=options.final_max_iter if stage.max_iter is None else int(stage.max_iter),
              ftol=options.ftol if stage.ftol is None else stage.ftol, callback=record, lower=lo, upper=hi)
    method = MINIMISERS[options.method]
    kw.update({name: getattr(options, name) for name in method.options})
    return method.minimise(objective, x, active, **kw)


def run_stage(state: FitState, stage: Stage) -> FitState:
    """Run one stage from ``state`` and return the new state (``state`` is unchanged, so a saved state can be run
    again and continues exactly).  See :class:`Stage` for what a stage does."""
    pb, o, t0 = state.problem, state.problem.options, time.perf_counter()
    par = _stage_par(pb, stage)
    active = _active(par, stage)
    info = dict(stage=stage.name, iterations=0, loss=None, message="")
    reason = skip_reason(pb, stage, par, active)
    if reason:
        info.update(message=f"skipped: {reason}", seconds=0.0, pixels=0, loss_all=None)
        return dataclasses.replace(state, stages=state.stages + (info,))
    x, idx, found = _stage_pixels(state, stage, par)
    info.update(found)
    target = pb.target if stage.target in (None, pb.target.name) else make_target(stage.target,
                                                                                  read_noise=o.read_noise)
    objective = Objective(par, pb.observed, idx, target, o.chunk_pixels, fused=o.fused)
    records: List[dict] = []

    def record(h):
        records.append(dict(h, stage=stage.name, pixels=len(idx)))
        if o.callback:
            o.callback(records[-1])

    run, final = None, state.final
    if stage.max_iter != 0 and active:
        if stage.preliminary and not math.isfinite(objective.loss(x)):
            info.update(message="skipped: infinite loss at the start of the stage")
        else:
            run = _minimise(objective, x, active, stage, o, record)
            x = run.x
            info.update(iterations=run.iterations, loss=run.loss, message=run.message, converged=bool(run.converged))
    if run is not None and not stage.preliminary:
        real = par is pb.par and target is pb.target
        final = FinalRun(x, bool(run.converged), run.message, idx, target.name, run.normal if real else None)
    info.update(seconds=time.perf_counter() - t0, pixels=len(idx), loss_all=pb.objective.loss(x))
    return dataclasses.replace(
        state, x=x, history=state.history + tuple(records), stages=state.stages + (info,), final=final,
        iterations=state.iterations + (run.iterations if run else 0),
        evaluations=state.evaluations + (run.evaluations if run else 0), seconds=state.seconds + info["seconds"])
