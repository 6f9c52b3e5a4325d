"""L-BFGS and Adam over ``torch.optim`` (docs/refine.md, "Minimisers"), on the same objective as Levenberg–Marquardt
with reverse-mode gradients accumulated over pixel chunks.  They move the scaled increments z = (x − x0)/typical (one
learning rate suits every group), clipped to the bounds after each step, and stop when the best loss has improved by
less than ``ftol`` log-likelihood units over the last ``patience`` iterations, or after ``max_iter``; the best point
seen is returned."""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import torch

from .lm import DEFAULT_FTOL, InfiniteStart, IterationLog, MinimizeResult, clipped_bounds
from ..targets.objective import Objective

SCHEDULES = ("constant", "cosine", "exponential", "plateau")


def _run(objective, x0, active, make_opt, max_iter, ftol, patience, callback, lower, upper) -> MinimizeResult:
    """Minimise over the scaled increments z of the ``active`` scalars with the (optimiser, scheduler or None) that
    ``make_opt(z)`` gives, one ``optimiser.step(closure)`` per iteration."""
    t0 = time.perf_counter()
    active = list(range(objective.n)) if active is None else list(active)
    act = torch.as_tensor(active, dtype=torch.long)
    lo, hi = clipped_bounds(objective, lower, upper)
    x0 = torch.maximum(torch.minimum(x0.detach().clone(), hi), lo)
    typ = objective.typical()[act]
    zlo, zhi = (lo[act] - x0[act]) / typ, (hi[act] - x0[act]) / typ
    z = torch.zeros(len(active), dtype=x0.dtype, device=x0.device, requires_grad=True)
    if not active:
        return MinimizeResult(x0, objective.loss(x0), True, "nothing to refine", 0, 1, [])

    def to_x(zz):
        return x0.index_put((act,), x0[act] + zz.detach() * typ)

    def closure():
        L, g = objective.loss_and_grad(to_x(z))
        evals[0] += 1
        z.grad = (g[act] * typ).detach().clone() if math.isfinite(L) else torch.zeros_like(z)
        return torch.tensor(L if math.isfinite(L) else 1e300, dtype=z.dtype)

    evals = [0]
    opt, sched = make_opt(z)
    L0 = objective.loss(x0)
    if not math.isfinite(L0):
        raise InfiniteStart("the starting model gives an infinite or NaN loss: check the starting model and the mask")
    best_L, best_x = L0, x0.clone()
    log = IterationLog(t0, callback)
    log.add(0, L0, 0.0, float(opt.param_groups[0]["lr"]))
    converged, message = False, f"reached max_iter = {max_iter}"
    prev_z = z.detach().clone()
    for it in range(1, max_iter + 1):
        opt.step(closure)
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, zhi), zlo))
        x = to_x(z)
        L = objective.loss(x)
        evals[0] += 1
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(L)
        elif sched is not None:
            sched.step()
        step = float((z.detach() - prev_z).abs().max())
        prev_z = z.detach().clone()
        if L < best_L:
            best_L, best_x = L, x.clone()
        log.add(it, L, step, float(opt.param_groups[0]["lr"]), accepted=L <= best_L)
        if it > patience:
            old_best = min(h["loss"] for h in log.rows[: len(log.rows) - patience])
            if old_best - best_L < ftol * objective.likelihood_unit(best_L, len(active)):
                converged = True
                message = f"converged: best loss improved by < ftol = {ftol:g} over {patience} iterations"
                break
    return MinimizeResult(best_x, best_L, converged, message, len(log.rows) - 1, evals[0], log.rows)


def lbfgs(objective: Objective, x0: torch.Tensor, active: Optional[Sequence[int]] = None, *, max_iter: int = 100,
          ftol: float = DEFAULT_FTOL, patience: int = 3, history_size: int = 20,
          callback: Optional[Callable[[dict], None]] = None, lower: Optional[torch.Tensor] = None,
          upper: Optional[torch.Tensor] = None) -> MinimizeResult:
    """Minimise with ``torch.optim.LBFGS`` (strong-Wolfe line search), one quasi-Newton step per iteration.

    Args as :func:`refine.minimise.lm.levenberg_marquardt` (``lower``/``upper``: extra bounds on x); ``history_size`` is
    L-BFGS' memory; ``patience`` the number of iterations over which the improvement must stay below ``ftol`` to
    stop."""

    def make(z):
        return torch.optim.LBFGS([z], lr=1.0, max_iter=1, max_eval=25, history_size=history_size,
                                 line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15), None

    return _run(objective, x0, active, make, max_iter, ftol, patience, callback, lower, upper)


def adam(objective: Objective, x0: torch.Tensor, active: Optional[Sequence[int]] = None, *, max_iter: int = 300,
         lr: float = 0.05, schedule: str = "cosine", ftol: float = DEFAULT_FTOL, patience: int = 30,
         callback: Optional[Callable[[dict], None]] = None, lower: Optional[torch.Tensor] = None,
         upper: Optional[torch.Tensor] = None) -> MinimizeResult:
    """Minimise with ``torch.optim.Adam`` on the scaled increments.

    ``lr``: initial learning rate (in units of the typical error per step); ``schedule``: 'constant', 'cosine'
    (cosine annealing to 0 over ``max_iter``), 'exponential' (lr falls 100× over ``max_iter``) or 'plateau' (halve
    when the loss stalls for 10 iterations)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr}")
    schedulers = {
        "constant": lambda opt: None,
        "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, max_iter)),
        "exponential": lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.01 ** (1.0 / max(1, max_iter))),
        "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=10),
    }

    def make(z):
        opt = torch.optim.Adam([z], lr=lr)
        return opt, schedulers[schedule](opt)

    return _run(objective, x0, active, make, max_iter, ftol, patience, callback, lower, upper)
