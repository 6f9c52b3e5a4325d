"""Many images: ``refine.fit_many`` refines what images share (detector geometry, cell, …) jointly with what each has
of its own (orientation, scale, …).

    result = refine.fit_many(observed_list, params_list, setup_list,
                             shared=["distance", "beam_center", "detector_rotation.y", "detector_rotation.z"],
                             per_image=["orientation", "scale"])
    print(result.summary()); result.to_json("joint.json")
    result.images[0].to_nanobragg_args()          # image 1's refined model as nanoBragg flags

The normal equations have one block per image plus the shared block and are solved through the Schur complement
(:mod:`refine.schur`), so time and memory grow linearly with the number of images; images of equal shape are
simulated together under ``torch.func.vmap`` (:mod:`refine.joint`).  Stages as in :func:`refine.fit` but without
the search: spots broadened (N × 0.3 then × 0.6, geometry only), then every free scalar with the real model; so the
starting models must be within the broadened stages' reach (beam centre a few pixels, distance ~1 mm, orientation a
few tenths of a degree; refine the images independently first when they are not).  ESDs and correlations of every
value come from the joint normal matrix at the solution.  Independent per-image fits at scale: :mod:`refine.scaleout`.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import time
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nbtorch.validate import check_params

from ..model.degeneracy import degenerate_pairs
from .fit import fit_options
from ..minimise.lm import levenberg_marquardt
from ..model.layout import Layout, align_shared, make_layout
from ..model.predict import make_predict
from .many_result import ImageResult, JointResult  # noqa: F401  (re-exported)
from .options import FitOptions
from ..model.parameters import Parameterisation, expand_free, parameterise
from .search import prefit_scale
from .stages import Stage, apply_stage, default_stages
from .strategy import DegeneracyWarning, trust_bounds
from ..model.table import POSITION_GROUPS
from ..targets import Objective, Target, make_target, observed_array, usable_mask

#: FitOptions a joint fit does not support, with their neutral values.
UNSUPPORTED = {"method": "lm", "priors": None, "weights": None, "spots_only": False}


@dataclasses.dataclass(frozen=True, eq=False)
class JointProblem:
    """What a joint fit is about: ``pars`` (one parameterisation per image, about its aligned starting model),
    ``layout``, ``observed`` (tensors [slow, fast]), ``usable`` (flat pixel indices per image), ``target``,
    ``options``, ``shared``/``per_image`` (the groups as given), ``notes``, ``paths`` and ``flags`` (the starting
    flags per image, or None), ``progress`` (None or ``progress(what, done, total)``: see :func:`fit_many`)."""

    pars: Tuple[Parameterisation, ...]
    layout: Layout
    observed: Tuple[torch.Tensor, ...]
    usable: Tuple[np.ndarray, ...]
    target: Target
    options: FitOptions
    shared: Tuple[str, ...]
    per_image: Tuple[str, ...]
    notes: Tuple[str, ...] = ()
    paths: Tuple[Optional[str], ...] = ()
    flags: Tuple[Optional[List[str]], ...] = ()
    progress: Optional[Callable[[str, int, int], None]] = None

    def reporter(self, prefix: str) -> Optional[Callable[[str, int, int], None]]:
        """``progress`` with ``prefix: `` before each ``what`` (None without progress)."""
        if self.progress is None:
            return None
        return lambda what, done, total: self.progress(f"{prefix}: {what}", done, total)


def joint_stages(options: FitOptions) -> List[Stage]:
    """The joint fit's stages: the default schedule (:func:`refine.pipeline.stages.default_stages`) without its
    search, or only the final stage when ``coarse_to_fine`` is False; a sequence of
    :class:`~refine.pipeline.stages.Stage` is used as given."""
    ctf = options.coarse_to_fine
    if isinstance(ctf, tuple):
        if any(s.search_beam_center for s in ctf):
            raise ValueError("fit_many has no search stage: give stages without search_beam_center")
        return list(ctf)
    if ctf is False or ctf is None:
        return [Stage("fine", preliminary=False)]
    return [s for s in default_stages(options.coarse_iter, options.robust_iter) if not s.search_beam_center]


def _joint_options(options, shared, per_image, kwargs) -> Tuple[FitOptions, Tuple[str, ...], Tuple[str, ...]]:
    """FitOptions of a joint fit (free = shared + per-image), ValueError for options it does not support or a group
    named both shared and per image."""
    split = (lambda g: g.replace(",", " ").split() if isinstance(g, str) else [str(v) for v in g])
    shared, per_image = tuple(split(shared)), tuple(split(per_image))
    both = set(expand_free(shared)) & set(expand_free(per_image))
    if both:
        raise ValueError(f"{sorted(both)[0]} is named both shared and per image")
    if not shared and not per_image:
        raise ValueError("fit_many needs at least one shared or per-image group")
    opts = fit_options(options, free=shared + per_image, **kwargs)
    for name, neutral in UNSUPPORTED.items():
        if getattr(opts, name) != neutral:
            raise ValueError(f"fit_many does not support {name}={getattr(opts, name)!r} (joint Levenberg–Marquardt "
                             "without priors, weights or spot selection)")
    return opts, shared, per_image


def _inputs(observed_list, params_list, setup_list, paths, flags):
    """Checked lists (observed, params, setups, paths, flags) of equal length."""
    n = len(observed_list)
    if n == 0:
        raise ValueError("fit_many needs at least one image")
    setups = list(setup_list) if isinstance(setup_list, (list, tuple)) else [setup_list] * n
    if len(params_list) != n or len(setups) != n:
        raise ValueError(f"fit_many: {n} observed images but {len(params_list)} models and {len(setups)} set-ups")
    paths = list(paths) if paths is not None else [os.fspath(o) if isinstance(o, (str, os.PathLike)) else None
                                                   for o in observed_list]
    flags = [None] * n if flags is None else ([flags] * n if isinstance(flags, str) else list(flags))
    flags = [None if f is None else (shlex.split(f) if isinstance(f, str) else [str(t) for t in f]) for f in flags]
    if len(paths) != n or len(flags) != n:
        raise ValueError(f"fit_many: {n} images but {len(paths)} paths and {len(flags)} flag lists")
    return list(observed_list), list(params_list), setups, paths, flags


def prepare_many(observed_list, params_list, setup_list, shared, per_image, options: FitOptions,
                 paths=None, nanobragg_args=None, progress=None) -> JointProblem:
    """The joint problem: observed images and usable pixels, aligned starting models, one parameterisation per
    image, the layout of X, the target; degenerate pairs as in :func:`refine.fit`.  ``progress('preparing', k, N)``
    after each image (when given)."""
    obs, params, setups, paths, flags = _inputs(observed_list, params_list, setup_list, paths, nanobragg_args)
    params, notes = align_shared(params, shared)
    o, pars, observed, usable = options, [], [], []
    for k, (ob, p, s) in enumerate(zip(obs, params, setups), start=1):
        try:
            arr, own_mask = observed_array(ob, s)
            keep = usable_mask(arr, s, o.mask, o.overload)
        except (ValueError, OSError) as exc:
            raise type(exc)(f"image {k}{f' ({paths[k - 1]})' if paths[k - 1] else ''}: {exc}") from None
        keep = keep & own_mask if own_mask is not None else keep
        if not keep.any():
            raise ValueError(f"image {k}: no usable pixels")
        par = parameterise(p, s, o.free, crystal_system=o.crystal_system, ncells_mode=o.ncells_mode,
                           background=o.background, bounds=o.bounds)
        check_params(par.ref, s)
        pars.append(par)
        observed.append(torch.as_tensor(np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0), dtype=par.dtype,
                                        device=par.device))
        usable.append(np.flatnonzero(keep.reshape(-1)))
        if progress is not None:
            progress("preparing", k, len(obs))
    degs = degenerate_pairs(pars[0])
    if degs and not o.allow_degenerate:
        raise ValueError(f"{degs[0].message()} (or allow it: allow_degenerate=True)")
    for d in degs:
        warnings.warn(d.message(), DegeneracyWarning, stacklevel=3)
    notes = tuple(n for n in (pars[0].crystal_system_note,) if n) + tuple(notes) + tuple(d.message() for d in degs)
    target = make_target(o.target, read_noise=o.read_noise)
    return JointProblem(tuple(pars), make_layout(pars, shared), tuple(observed), tuple(usable), target, o,
                        tuple(shared), tuple(per_image), notes, tuple(paths), tuple(flags), progress)


def start_point(pb: JointProblem) -> torch.Tensor:
    """X at the start: zeros, with each image's scale (and constant background) pre-fitted linearly when free
    (:func:`refine.search.prefit_scale`); a shared scale starts at the images' mean."""
    xs = []
    for k, (par, o, idx) in enumerate(zip(pb.pars, pb.observed, pb.usable), start=1):
        x = par.zeros()
        if par.index("scale") or par.index("background.constant"):
            model = make_predict(par, par.setup, idx, pb.options.fused)
            with torch.no_grad():
                x = prefit_scale(par, x, o.reshape(-1)[model.index], model.bragg(x), model.background(x))
            if pb.progress is not None:
                pb.progress("starting scales", k, len(pb.pars))
        xs.append(x)
    X = pb.layout.pack(xs)
    ns = len(pb.layout.shared)
    if ns:
        X[:ns] = torch.stack([x[list(p)] for x, p in zip(xs, pb.layout.shared_pos)]).mean(0)
    return X


def _stage_pars(pb: JointProblem, stage: Stage) -> List[Parameterisation]:
    """Every image's parameterisation for the stage (the same scalars about the stage's broadened model)."""
    out, o = [], pb.options
    for par in pb.pars:
        sp, ss = apply_stage(par.ref, par.setup, stage)
        out.append(par if (sp is par.ref and ss is par.setup) else parameterise(
            sp, ss, o.free, crystal_system=par.crystal_system, ncells_mode=o.ncells_mode, background=o.background,
            bounds=o.bounds))
    return out


def _stage_active(pb: JointProblem, stage: Stage):
    """(active shared positions, active own positions per image) of a stage."""
    lay = pb.layout

    def on(name):
        return stage.active is None or name.split(".")[0] in stage.active or name in stage.active

    act_s = [j for j, n in enumerate(lay.shared) if on(n)]
    return act_s, [[j for j, n in enumerate(lay.own_names(i)) if on(n)] for i in range(len(pb.pars))]


def _bounds(pb: JointProblem, pars, X: torch.Tensor, trust) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bounds on X [n]: each parameterisation's, intersected with the stage's trust region about X."""
    lay = pb.layout
    xs = [lay.image_x(X, i) for i in range(len(pars))]
    los, his = [], []
    for par, x in zip(pars, xs):
        lo, hi = par.bounds()
        tlo, thi = trust_bounds(par, x, trust)
        los.append(lo if tlo is None else torch.maximum(lo, tlo))
        his.append(hi if thi is None else torch.minimum(hi, thi))
    return lay.pack(los), lay.pack(his)


def _stage_pixels(pb: JointProblem, stage: Stage, position: int) -> List[np.ndarray]:
    """Pixels of each image for a stage: all usable ones, or at most ``prelim_pixels`` of them (a fixed random
    subset per image; images with the same usable pixels get the same subset) in a preliminary stage."""
    n = pb.options.prelim_pixels
    out = []
    for idx in pb.usable:
        if stage.preliminary and n and len(idx) > n:
            idx = np.sort(np.random.default_rng(position).choice(idx, size=int(n), replace=False))
        out.append(idx)
    return out


def run_joint_stage(pb: JointProblem, X: torch.Tensor, stage: Stage, position: int = 0, batch: bool = True):
    """Run one stage from X: (X, stage summary dict, iteration records, MinimizeResult or None)."""
    o, t0 = pb.options, time.perf_counter()
    pars = _stage_pars(pb, stage)
    act_s, act_own = _stage_active(pb, stage)
    n_act = len(act_s) + sum(len(a) for a in act_own)
    info = dict(stage=stage.name, iterations=0, loss=None, message="")
    moves = any(pars[0].index(g) for g in POSITION_GROUPS)
    if stage.preliminary and (n_act == 0 or stage.max_iter == 0 or (stage.broadened and not moves)):
        info.update(message="skipped: nothing to do", seconds=0.0)
        return X, info, [], None
    target = pb.target if stage.target in (None, pb.target.name) else make_target(stage.target,
                                                                                  read_noise=o.read_noise)
    obj = Objective(pars, pb.observed, _stage_pixels(pb, stage, position), target, o.chunk_pixels, o.fused,
                    layout=pb.layout, batch=batch, progress=pb.reporter(stage.name))
    lo, hi = _bounds(pb, pars, X, stage.trust)
    records: List[dict] = []

    def record(h):
        records.append(dict(h, stage=stage.name))
        if o.callback:
            o.callback(records[-1])

    active = list(act_s) + [pb.layout.offset[i] + j for i, own in enumerate(act_own) for j in own]
    run = levenberg_marquardt(
        obj, X, active, max_iter=o.final_max_iter if stage.max_iter is None else int(stage.max_iter),
        ftol=o.ftol if stage.ftol is None else stage.ftol, damping=getattr(o, "damping", 1e-3), lower=lo, upper=hi,
        callback=record)
    info.update(iterations=run.iterations, evaluations=run.evaluations, loss=run.loss, message=run.message,
                converged=bool(run.converged), seconds=time.perf_counter() - t0)
    return run.x, info, records, run


def fit_many(observed_list: Sequence, params_list: Sequence, setup_list, shared=(), per_image=(), *,
             options: Optional[FitOptions] = None, paths: Optional[Sequence[str]] = None, nanobragg_args=None,
             batch: bool = True, progress: Optional[Callable[[str, int, int], None]] = None,
             **kwargs) -> JointResult:
    """Refine N images jointly: ``shared`` groups take one value for all images, ``per_image`` groups one per image.

    Args:
        observed_list: N observed images [slow, fast] (photons; tensors, arrays, ObservedImage or paths).
        params_list, setup_list: the N starting models (a single Setup is used for every image); the shared parts
            start from the first model's values (the others are overwritten and a note says so).
        shared, per_image: groups, sub-groups or scalars (:data:`refine.table.GROUPS`; e.g. shared ``distance``,
            ``beam_center``, ``detector_rotation.y``; per image ``orientation``, ``scale``).
        options / keyword arguments: as :func:`refine.fit` (target, crystal_system, max_iter, coarse_to_fine,
            coarse_iter, robust_iter, mask, overload, bounds, ftol, chunk_pixels, esd_scale, callback,
            allow_degenerate, …); method must be 'lm'; priors, weights and spots_only are not supported.
        paths: a label per image for the result (default: the observed paths, when given as paths).
        nanobragg_args: the starting flags per image (a list of N strings or token lists; one string is used for
            every image), so that each image's refined model can be written back as flags.
        batch: simulate images of equal shape together under vmap (False: one at a time; same numbers).
        progress: None, or ``progress(what, done, total)`` called as the work on the images proceeds (``done`` of
            ``total`` images): 'preparing', 'starting scales', then per stage '<stage>: simulating' and
            '<stage>: Jacobians' (every pixel chunk), and 'ESDs: …' (a counter to show on a terminal; the
            per-iteration records go to ``callback``).

    Returns:
        :class:`refine.many_result.JointResult` (shared values and ESDs, and per image its values, ESDs,
        correlations and refined flags).
    """
    t0 = time.perf_counter()
    opts, shared, per_image = _joint_options(options, shared, per_image, kwargs)
    pb = prepare_many(observed_list, params_list, setup_list, shared, per_image, opts, paths, nanobragg_args,
                      progress)
    X = start_point(pb)
    stages, history, final = [], [], None
    for k, stage in enumerate(joint_stages(opts)):
        X, info, records, run = run_joint_stage(pb, X, stage, k, batch)
        stages.append(info)
        history += records
        if run is not None and not stage.preliminary:  # its normal equations serve the ESDs if on the real model
            real = stage.target in (None, pb.target.name) and not stage.broadened
            final = run if real else dataclasses.replace(run, normal=None)
    return JointResult.build(pb, X, final, stages, history, time.perf_counter() - t0, batch)

