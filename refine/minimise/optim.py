"""Gradient-based drivers over ``torch.optim``: L-BFGS and Adam, with schedules, bounds, callbacks and progress.

Both minimise the same :class:`~refine.targets.Objective` as Levenberg–Marquardt, with reverse-mode gradients
accumulated over pixel chunks (bounded memory).  The optimisers see the *scaled* increments z = (x − x0)/typical
(``typical`` from the parameterisation: 2 mrad for orientation, 0.5 mm for distance, one pixel for the beam centre,
0.5 % of a cell length …), so one learning rate suits every group.  After each step z is clipped to the bounds.

Stopping: the best loss seen has improved by less than ``ftol`` log-likelihood units over the last ``patience``
iterations (converged), or ``max_iter`` iterations.  The best point seen is returned.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import torch

from .lm import DEFAULT_FTOL, MinimizeResult, clipped_bounds
from ..targets.objective import Objective

SCHEDULES = ("constant", "cosine", "exponential", "plateau")


def _setup(objective: Objective, x0: torch.Tensor, active, lower=None, upper=None):
    active = list(range(objective.n)) if active is None else list(active)
    act = torch.as_tensor(active, dtype=torch.long)
    lo, hi = clipped_bounds(objective, lower, upper)
    x0 = torch.maximum(torch.minimum(x0.detach().clone(), hi), lo)
    typ = objective.typical()[act]
    zlo, zhi = (lo[act] - x0[act]) / typ, (hi[act] - x0[act]) / typ
    z = torch.zeros(len(active), dtype=x0.dtype, device=x0.device, requires_grad=True)

    def to_x(zz):
        return x0.index_put((act,), x0[act] + zz.detach() * typ)

    return active, act, typ, z, zlo, zhi, x0, to_x


def _run(objective, x0, active, make_opt, step_fn, max_iter, ftol, patience, callback, lr_of, lower=None,
         upper=None):
    t0 = time.perf_counter()
    active, act, typ, z, zlo, zhi, x0, to_x = _setup(objective, x0, active, lower, upper)
    history: List[dict] = []
    evals = [0]
    if not active:
        L = objective.loss(x0)
        return MinimizeResult(x0, L, True, "nothing to refine", 0, 1, [])

    def closure():
        L, g = objective.loss_and_grad(to_x(z))
        evals[0] += 1
        z.grad = (g[act] * typ).detach().clone() if math.isfinite(L) else torch.zeros_like(z)
        return torch.tensor(L if math.isfinite(L) else 1e300, dtype=z.dtype)

    opt, sched = make_opt(z)
    L0 = objective.loss(x0)
    if not math.isfinite(L0):
        raise ValueError("the starting model gives an infinite or NaN loss: check the starting model and the mask")
    best_L, best_x = L0, x0.clone()
    history.append(dict(iteration=0, loss=L0, step=0.0, damping=lr_of(opt), accepted=True, seconds=0.0))
    if callback:
        callback(history[-1])
    converged, message = False, f"reached max_iter = {max_iter}"
    prev_z = z.detach().clone()
    for it in range(1, max_iter + 1):
        step_fn(opt, closure)
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, zhi), zlo))
        x = to_x(z)
        L = objective.loss(x)
        evals[0] += 1
        if sched is not None:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(L)
            else:
                sched.step()
        step = float((z.detach() - prev_z).abs().max())
        prev_z = z.detach().clone()
        if L < best_L:
            best_L, best_x = L, x.clone()
        history.append(dict(iteration=it, loss=L, step=step, damping=lr_of(opt), accepted=L <= best_L,
                            seconds=time.perf_counter() - t0))
        if callback:
            callback(history[-1])
        unit = objective.likelihood_unit(best_L, len(active))
        if it > patience:
            old_best = min(h["loss"] for h in history[: len(history) - patience])
            if old_best - best_L < ftol * unit:
                converged = True
                message = f"converged: best loss improved by < ftol = {ftol:g} over {patience} iterations"
                break
    return MinimizeResult(best_x, best_L, converged, message, len(history) - 1, evals[0], history)


def lbfgs(
    objective: Objective,
    x0: torch.Tensor,
    active: Optional[Sequence[int]] = None,
    *,
    max_iter: int = 100,
    ftol: float = DEFAULT_FTOL,
    patience: int = 3,
    history_size: int = 20,
    callback: Optional[Callable[[dict], None]] = None,
    lower: Optional[torch.Tensor] = None,
    upper: Optional[torch.Tensor] = None,
) -> MinimizeResult:
    """Minimise with ``torch.optim.LBFGS`` (strong-Wolfe line search), one quasi-Newton step per iteration.

    Args as :func:`refine.minimise.lm.levenberg_marquardt` (``lower``/``upper``: extra bounds on x); ``history_size`` is
    L-BFGS' memory; ``patience`` the number of iterations over which the improvement must stay below ``ftol`` to
    stop."""

    def make(z):
        return torch.optim.LBFGS([z], lr=1.0, max_iter=1, max_eval=25, history_size=history_size,
                                 line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15), None

    def step(opt, closure):
        opt.step(closure)

    return _run(objective, x0, active, make, step, max_iter, ftol, patience, callback,
                lambda opt: float(opt.param_groups[0]["lr"]), lower, upper)


def adam(
    objective: Objective,
    x0: torch.Tensor,
    active: Optional[Sequence[int]] = None,
    *,
    max_iter: int = 300,
    lr: float = 0.05,
    schedule: str = "cosine",
    ftol: float = DEFAULT_FTOL,
    patience: int = 30,
    callback: Optional[Callable[[dict], None]] = None,
    lower: Optional[torch.Tensor] = None,
    upper: Optional[torch.Tensor] = None,
) -> MinimizeResult:
    """Minimise with ``torch.optim.Adam`` on the scaled increments.

    ``lr``: initial learning rate (in units of the typical error per step); ``schedule``: 'constant', 'cosine'
    (cosine annealing to 0 over ``max_iter``), 'exponential' (lr falls 100× over ``max_iter``) or 'plateau' (halve
    when the loss stalls for 10 iterations)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")

    def make(z):
        opt = torch.optim.Adam([z], lr=lr)
        if schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_iter))
        elif schedule == "exponential":
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / max(1, max_iter)))
        elif schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=10)
        else:
            sched = None
        return opt, sched

    def step(opt, closure):
        opt.zero_grad()
        closure()
        opt.step()

    return _run(objective, x0, active, make, step, max_iter, ftol, patience, callback,
                lambda opt: float(opt.param_groups[0]["lr"]), lower, upper)
