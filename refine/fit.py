"""``refine.fit``: observed image + starting model → refined model with uncertainties.

    result = refine.fit(observed, params, setup, free=["cell", "orientation", "distance", "beam_center", "scale"])
    print(result.summary()); result.to_json("fit.json"); flags = result.to_nanobragg_args()

The pieces (see docs/refine.md): :mod:`refine.parameters` (what is free, increments about the start),
:mod:`refine.targets` (loss over the usable pixels), :mod:`refine.lm` / :mod:`refine.optim` (minimisers),
:mod:`refine.strategy` (coarse-to-fine stages), :mod:`refine.result` (values, ESDs, flags, JSON, plots).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from nbtorch.simulate import simulate
from nbtorch.types import Params, Setup

from .lm import MinimizeResult, levenberg_marquardt
from .optim import adam, lbfgs
from .parameters import DEFAULT_FREE, parameterise
from .result import Result, correlation_from_covariance, propagate
from .strategy import (POSITION_GROUPS, Stage, apply_stage, default_stages, prefit_scale, search_geometry,
                       trust_bounds)
from .targets import Objective, make_target, select_pixels, usable_mask

METHODS = ("lm", "lbfgs", "adam")
_DEFAULT_MAX_ITER = {"lm": 30, "lbfgs": 100, "adam": 300}


def _observed_array(observed, setup: Setup):
    """observed (tensor / array / ObservedImage / path) → (float64 array [slow, fast], mask or None)."""
    from nbtorch.io.images import RAW_EXTENSIONS, ObservedImage, read_image

    if isinstance(observed, str) or hasattr(observed, "__fspath__"):
        raw = os.path.splitext(os.fspath(observed))[1].lower() in RAW_EXTENSIONS
        observed = read_image(observed, shape=(setup.spixels, setup.fpixels) if raw else None)
    if isinstance(observed, ObservedImage):
        return np.asarray(observed.data, dtype=np.float64), np.asarray(observed.mask, dtype=bool)
    if torch.is_tensor(observed):
        return observed.detach().cpu().double().numpy(), None
    return np.asarray(observed, dtype=np.float64), None


def covariance(objective: Objective, x: torch.Tensor, esd_scale: str = "auto", rcond: float = 1e-10, normal=None):
    """Covariance of the increments at ``x``: ``H⁻¹·k`` (see :mod:`refine.result`).

    H is inverted through its correlation form C = D^-½·H·D^-½ (D = diag H); eigenvalues of C below ``rcond`` times
    the largest mark combinations of free parameters that the data do not determine (e.g. a crystal rotation about
    the beam together with an in-plane detector rotation): they are left out (pseudo-inverse) and named.

    ``normal``: optional (H [n, n], model [n_pixels]) already computed at ``x`` (by the last LM iteration).

    Returns ``(cov [n, n], chi2_reduced, k, loss, degenerate)`` with ``degenerate`` a list of lists of scalar names
    (empty when H is well conditioned)."""
    if esd_scale not in ("auto", "chi2", "none"):
        raise ValueError(f"esd_scale must be 'auto', 'chi2' or 'none'; got {esd_scale!r}")
    n = objective.par.n
    if normal is not None:
        H, m = normal
        L = objective.loss(x)
    else:
        L, g, H, m = objective.normal_equations(x)
    chi2 = objective.chi2_reduced(m, n)
    k = chi2 if (esd_scale == "chi2" or (esd_scale == "auto" and not objective.target.likelihood)) else 1.0
    d = torch.sqrt(torch.clamp(torch.diagonal(H), min=1e-300))
    C = H / d[:, None] / d[None, :]
    w, V = torch.linalg.eigh(C)
    bad = w < rcond * float(w.max())
    degenerate = []
    for j in torch.nonzero(bad).flatten().tolist():
        v = V[:, j].abs()
        degenerate.append([objective.par.names[i] for i in torch.nonzero(v > 0.2 * float(v.max())).flatten().tolist()])
    winv = torch.where(bad, torch.zeros_like(w), 1.0 / torch.where(bad, torch.ones_like(w), w))
    Cinv = (V * winv) @ V.T
    cov = Cinv / d[:, None] / d[None, :]
    return cov * k, chi2, k, L, degenerate


def fit(
    observed,
    params: Params,
    setup: Setup,
    free: Union[str, Iterable[str]] = DEFAULT_FREE,
    method: str = "lm",
    target: str = "poisson",
    *,
    mask=None,
    overload: Optional[float] = None,
    read_noise: float = 1.0,
    weights=None,
    crystal_system: str = "triclinic",
    ncells_mode: str = "auto",
    background: Optional[Sequence[float]] = None,
    bounds: Optional[Mapping[str, Tuple[Optional[float], Optional[float]]]] = None,
    priors: Optional[Mapping[str, Tuple[float, float]]] = None,
    max_iter: Optional[int] = None,
    coarse_to_fine: Union[bool, Sequence[Stage]] = True,
    coarse_iter: int = 8,
    robust_iter: int = 10,
    max_shift: int = 8,
    search_distance: float = 0.05,
    spots_only: bool = False,
    prelim_pixels: Optional[int] = 65536,
    spot_dilate: int = 3,
    background_fraction: float = 0.05,
    chunk_pixels: int = 16384,
    ftol: float = 1e-3,
    lr: float = 0.05,
    schedule: str = "cosine",
    esd_scale: str = "auto",
    callback: Optional[Callable[[dict], None]] = None,
    nanobragg_args=None,
    matrix_path: Optional[str] = None,
) -> Result:
    """Refine a starting model against an observed image.

    Args:
        observed: observed image [slow, fast] (photons; tensor, array, :class:`nbtorch.io.images.ObservedImage` or a
            path read with :func:`nbtorch.io.images.read_image`, raw files taking their shape from ``setup``).
        params, setup: the starting model (e.g. from :func:`nbtorch.from_nanobragg_args`); float64 recommended.
        free: groups to refine (:data:`refine.parameters.GROUPS`, sub-groups or single scalars).
        method: 'lm' (Levenberg–Marquardt, default), 'lbfgs' or 'adam'.
        target: 'poisson' (default), 'gaussian' (with ``read_noise`` σ in photons) or 'lsq' (optional ``weights``
            image).
        mask: bool image [slow, fast], True = use; combined with the observed image's own mask, ``overload``
            (values ≥ it are excluded), negative/non-finite pixels (gaps) and the set-up's ROI/mask.
        crystal_system, ncells_mode, background, bounds, priors: see :func:`refine.parameters.parameterise`.
        max_iter: iterations of the final stage (default 30 LM, 100 L-BFGS, 300 Adam).
        coarse_to_fine: True (default) for :func:`refine.strategy.default_stages`, False for a single stage, or a
            list of :class:`~refine.strategy.Stage`.
        coarse_iter: iterations of each broadened stage; robust_iter: iterations of the robust stage; max_shift: translation-search radius (pixels);
            search_distance: relative range of the distance grid search (±, 1 % steps; 0 = off).
        spots_only: fit only pixels near predicted/observed spots plus a ``background_fraction`` sample (re-selected
            at every stage, ``spot_dilate`` pixels around spots); the model is rendered only there (Setup.mask).
        prelim_pixels: at most this many pixels (a fixed random subset of the usable or selected ones) in the
            preliminary stages, which only have to bring the model into the final stage's basin (None: all).
        chunk_pixels: pixels per Jacobian/gradient chunk (memory bound).
        ftol: convergence tolerance in log-likelihood units; lr, schedule: Adam's learning rate and schedule.
        esd_scale: 'auto', 'chi2' or 'none' (see :mod:`refine.result`).
        callback: called with a dict per iteration (stage, iteration, loss, step, damping, accepted, seconds).
        nanobragg_args: the starting model's flags (string or list), used by ``Result.to_nanobragg_args``.
        matrix_path: where ``Result.to_nanobragg_args`` writes the refined matrix for ``-mat`` models.

    Returns:
        :class:`refine.result.Result`.
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    max_iter = _DEFAULT_MAX_ITER[method] if max_iter is None else int(max_iter)
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0; got {max_iter}")
    obs_np, obs_mask = _observed_array(observed, setup)
    usable = usable_mask(obs_np, setup, mask, overload)
    if obs_mask is not None:
        usable &= obs_mask
    tgt = make_target(target, read_noise=read_noise, weights=weights)
    observed_t = torch.as_tensor(np.nan_to_num(obs_np, nan=0.0, posinf=0.0, neginf=0.0),
                                 dtype=params.crystal.cell.dtype, device=params.crystal.cell.device)

    if coarse_to_fine is True:
        stages = default_stages(coarse_iter, robust_iter)
    elif coarse_to_fine is False or coarse_to_fine is None:
        stages = [Stage("fine")]
    else:
        stages = list(coarse_to_fine)
        if not stages or not all(isinstance(s, Stage) for s in stages):
            raise ValueError("coarse_to_fine must be True, False or a non-empty list of refine.strategy.Stage")

    spec = dict(free=free, crystal_system=crystal_system, ncells_mode=ncells_mode, background=background,
                bounds=bounds, priors=priors)
    final_par = parameterise(params, setup, **spec)
    x = final_par.zeros()
    history: List[dict] = []
    stage_info: List[dict] = []
    iterations = evaluations = 0
    last: Optional[MinimizeResult] = None
    final_run: Optional[MinimizeResult] = None
    objective = None
    for k, stage in enumerate(stages):
        is_last = k == len(stages) - 1
        sp, ss = apply_stage(params, setup, stage)
        par = parameterise(sp, ss, **spec) if (sp is not params or ss is not setup) else final_par
        if stage.active is None:
            active = list(range(par.n))
        else:
            active = sorted({i for g in stage.active for i in par.index(g)})
        if stage.broadened and stage.max_iter != 0 and not is_last and not any(
                par.index(g) for g in POSITION_GROUPS):
            continue
        needs_model = stage.search_beam_center or stage.prefit_scale or spots_only
        if not is_last and not active and not needs_model:
            continue
        if not is_last and stage.max_iter != 0 and not active:
            continue
        t0 = time.perf_counter()
        info = dict(stage=stage.name, iterations=0, loss=None, message="")
        pixels = usable
        if needs_model:
            with torch.no_grad():
                model_img = simulate(par.unpack(x), ss)
                if par.has_plane():
                    from .targets import plane_basis

                    model_img = model_img + (par.plane(x) @ plane_basis(ss, par.dtype, par.device)).reshape(
                        model_img.shape)
            model_np = model_img.detach().cpu().numpy()
            if stage.prefit_scale:
                sel = torch.as_tensor(usable.reshape(-1))
                x = prefit_scale(par, x, observed_t.reshape(-1)[sel], model_img.reshape(-1)[sel])
                with torch.no_grad():
                    model_np = simulate(par.unpack(x), ss).detach().cpu().numpy()
            if stage.search_beam_center and (par.index("beam_center") or par.index("distance")):
                x, sinfo = search_geometry(par, x, obs_np, usable, max_shift, search_distance, 0.01)
                info.update(sinfo)
                if spots_only:
                    with torch.no_grad():
                        model_np = simulate(par.unpack(x), ss).detach().cpu().numpy()
            if spots_only:
                pixels = select_pixels(obs_np, model_np, usable, dilate=spot_dilate,
                                       background_fraction=background_fraction)
        if not is_last and prelim_pixels and int(pixels.sum()) > prelim_pixels:
            # preliminary stages only have to reach the basin: a fixed random subset of pixels is enough
            flat = np.flatnonzero(pixels.reshape(-1))
            keep = np.random.default_rng(k).choice(flat, size=int(prelim_pixels), replace=False)
            pixels = np.zeros(pixels.size, dtype=bool)
            pixels[keep] = True
            pixels = pixels.reshape(usable.shape)
        run_iter = max_iter if (stage.max_iter is None) else int(stage.max_iter)
        stage_target = tgt if (stage.target is None or is_last) else make_target(stage.target)
        objective = Objective(par, observed_t, pixels, stage_target, chunk_pixels)
        if run_iter > 0 and active:

            def cb(h, _name=stage.name):
                h = dict(h, stage=_name)
                history.append(h)
                if callback:
                    callback(h)

            if not is_last and not math.isfinite(objective.loss(x)):
                info.update(message="skipped: infinite loss at the start of the stage")
                stage_info.append(info)
                continue
            lo, hi = trust_bounds(par, x, stage.trust)
            kw = dict(max_iter=run_iter, ftol=ftol if stage.ftol is None or is_last else stage.ftol, callback=cb,
                      lower=lo, upper=hi)
            if method == "lm":
                last = levenberg_marquardt(objective, x, active, **kw)
            elif method == "lbfgs":
                last = lbfgs(objective, x, active, **kw)
            else:
                last = adam(objective, x, active, lr=lr, schedule=schedule, **kw)
            x = last.x
            if is_last:
                final_run = last
            iterations += last.iterations
            evaluations += last.evaluations
            info.update(iterations=last.iterations, loss=last.loss, message=last.message,
                        converged=bool(last.converged))
        info["seconds"] = time.perf_counter() - t0
        info["pixels"] = int(pixels.sum())
        stage_info.append(info)

    # ---- final statistics on the real model
    par = final_par
    if objective is None or objective.par is not final_par or objective.target.name != tgt.name:
        objective = Objective(par, observed_t, usable, tgt, chunk_pixels)
    if final_run is not None:
        converged, message = final_run.converged, final_run.message
    elif par.n == 0:
        converged, message = True, "nothing to refine"
    else:
        converged, message = False, "the final stage did not run (max_iter = 0)"
    if par.n:
        normal = None
        if (final_run is not None and final_run.normal is not None and final_run.normal[0] == list(range(par.n))
                and objective.par is par and torch.equal(final_run.x, x)):
            normal = final_run.normal[1:]
        cov, chi2, k, L, degenerate = covariance(objective, x, esd_scale, normal=normal)
        for combo in degenerate:
            message += f" (undetermined combination of {', '.join(combo)}: fix one of them; their ESDs omit it)"
    else:
        cov = torch.zeros(0, 0, dtype=par.dtype)
        m = objective.model(x)
        L = float(objective.target.loss(m, objective.o))
        chi2, k = objective.chi2_reduced(m, 0), 1.0
    x_esd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
    values = {s.name: float(s.value(x[i])) for i, s in enumerate(par.scalars)}
    esd = {s.name: abs(s.dvalue_dx(float(x[i]))) * float(x_esd[i]) for i, s in enumerate(par.scalars)}
    parameters, parameter_esd = propagate(par, x, cov)
    loss_history = [h["loss"] for h in history]
    result = Result(
        converged=bool(converged), message=message, method=method, target=tgt.name, names=list(par.names), x=x,
        x_esd=x_esd, values=values, esd=esd, parameters=parameters, parameter_esd=parameter_esd, covariance=cov,
        correlation=correlation_from_covariance(cov), loss=float(L), loss_history=loss_history, history=history,
        iterations=iterations, evaluations=evaluations, seconds=time.perf_counter() - t_start,
        chi2_reduced=float(chi2), esd_factor=float(k), n_pixels=objective.n_pixels, stages=stage_info,
        params=par.unpack(x), setup=setup, par=par, observed=observed_t, pixels=objective.pixels,
        nanobragg_base=None, matrix_path=matrix_path,
    )
    if nanobragg_args is not None:
        import shlex

        result.nanobragg_base = shlex.split(nanobragg_args) if isinstance(nanobragg_args, str) else [
            str(t) for t in nanobragg_args]
    return result
