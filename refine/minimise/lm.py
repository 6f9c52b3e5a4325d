"""Levenberg–Marquardt (Fisher scoring) on forward-mode Jacobians, chunked over pixels, for N ≥ 1 images.

Each iteration builds the normal equations at the current point from :meth:`refine.targets.Objective.normal`
(J = ∂model/∂x by ``torch.func.jacfwd`` over pixel chunks, so memory stays bounded: H = JᵀWJ and g = Jᵀ·∂L/∂m are
accumulated chunk by chunk and J is discarded; block form, shared + per image), then solves

    (H + μ·diag(H)) δ = −g                       (Marquardt's scaling: invariant to the units of x)

with the linear solve passed in (:mod:`refine.minimise.solve`: dense for one image or few scalars, the Schur
complement for shared + per-image blocks, whose cost grows linearly with the number of images), projects x + δ onto
the bounds and accepts the step when the loss decreases.  The damping follows Nielsen's rule:
after an accepted step with gain ratio ρ = actual / predicted decrease, μ ← μ·max(⅓, 1 − (2ρ − 1)³); after a rejected
step μ ← μ·ν, ν ← 2ν.

Stopping rules (first that holds):

* converged: the undamped Gauss–Newton step would lower the loss by less than ``ftol`` log-likelihood units
  (½·gᵀH⁻¹g < ftol; for least squares one unit is σ̂² = 2L/(n − p)), i.e. every parameter is within about
  sqrt(2·ftol) standard errors of the optimum;
* converged: an accepted step moved every parameter by less than ``xtol`` standard errors and lowered the loss by less
  than ``ftol`` units;
* not converged: ``max_iter`` accepted steps, or the damping grew beyond ``max_damping`` (no downhill step found).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from ..targets.normal import BlockNormal
from .solve import LinearSolve, choose_solve, decrement

#: Default convergence threshold (log-likelihood units) of every minimiser, and LM's initial damping.
DEFAULT_FTOL = 1e-3
DEFAULT_DAMPING = 1e-3


@dataclasses.dataclass
class MinimizeResult:
    """Outcome of a minimiser run.

    ``x`` [n] final increments (best point seen); ``loss`` (data + priors); ``converged``; ``message``; ``iterations``
    (accepted steps for LM, optimiser steps otherwise); ``evaluations`` (loss evaluations, Jacobians count as one);
    ``history``: one dict per iteration with ``iteration``, ``loss``, ``step`` (largest |Δx|/σ), ``damping`` (μ for LM,
    the learning rate otherwise), ``accepted``, ``seconds``.
    """

    x: torch.Tensor
    loss: float
    converged: bool
    message: str
    iterations: int
    evaluations: int
    history: List[dict]
    normal: Optional[tuple] = None  # (active, BlockNormal, models per image) at x, when computed there (LM)


def _free_at_bounds(x, g, lo, hi):
    """Scalars sitting on a bound with the gradient pushing outwards (excluded from the Gauss–Newton test)."""
    return ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))


def clipped_bounds(objective, lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None):
    """The objective's bounds on x [n] intersected with extra ``lower``/``upper`` [n] (None: none)."""
    lo, hi = objective.bounds()
    if lower is not None:
        lo = torch.maximum(lo, lower)
    if upper is not None:
        hi = torch.minimum(hi, upper)
    return lo, hi


class _Step(NamedTuple):
    accepted: bool
    x: torch.Tensor
    loss: float
    delta: Optional[torch.Tensor]
    rho: float
    mu: float
    nu: float
    evaluations: int


def _damped_step(objective, x, act, lo, hi, L: float, blk: BlockNormal, solve: LinearSolve, mu: float, nu: float,
                 max_damping: float) -> _Step:
    """Solve (H + μ·diag H)δ = −g, project x + δ on the bounds, and raise μ (×ν, ν ← 2ν) until the loss falls or μ
    exceeds ``max_damping``."""
    evals = 0
    while True:
        try:
            delta = solve.step(blk, mu)
        except RuntimeError:
            delta = None
        if delta is not None and bool(torch.isfinite(delta).all()):
            xa = torch.maximum(torch.minimum(x[act] + delta, hi), lo)
            delta = xa - x[act]
            pred = blk.predicted_decrease(delta)
            x_new = x.index_put((act,), xa)
            L_new = objective.loss(x_new)
            evals += 1
            if math.isfinite(L_new) and L_new < L:
                rho = (L - L_new) / pred if pred > 0 else 1.0
                return _Step(True, x_new, L_new, delta, rho, mu, nu, evals)
        mu, nu = mu * nu, nu * 2.0
        if mu > max_damping:
            return _Step(False, x, L, None, -1.0, mu, nu, evals)


def _step_sigma(objective, blk: BlockNormal, solve: LinearSolve, delta, loss: float, k: int) -> float:
    """Largest |δ|/σ of a step, σ from the normal matrix in likelihood units."""
    try:
        var = solve.inverse_diagonal(blk).clamp_min(1e-300)
        return float((delta.abs() / torch.sqrt(var * objective.likelihood_unit(loss, k))).max())
    except RuntimeError:
        return math.inf


class IterationLog:
    """The history of a minimisation: one dict per accepted iteration (iteration, loss, step, damping, accepted,
    seconds since ``t0``), each passed to ``callback`` as it is written."""

    def __init__(self, t0: float, callback: Optional[Callable[[dict], None]] = None):
        self.t0, self.callback, self.rows = t0, callback, []

    def add(self, it: int, loss: float, step: float, mu: float) -> None:
        self.rows.append(dict(iteration=it, loss=loss, step=step, damping=mu, accepted=True,
                              seconds=time.perf_counter() - self.t0))
        if self.callback:
            self.callback(self.rows[-1])


def next_damping(mu: float, rho: float) -> float:
    """Nielsen's damping update after an accepted step with gain ratio ``rho``."""
    return mu * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)


def levenberg_marquardt(
    objective,
    x0: torch.Tensor,
    active: Optional[Sequence[int]] = None,
    *,
    max_iter: int = 30,
    ftol: float = DEFAULT_FTOL,
    xtol: float = 1e-2,
    damping: float = DEFAULT_DAMPING,
    max_damping: float = 1e10,
    callback: Optional[Callable[[dict], None]] = None,
    lower: Optional[torch.Tensor] = None,
    upper: Optional[torch.Tensor] = None,
    solve: Optional[LinearSolve] = None,
) -> MinimizeResult:
    """Minimise ``objective`` from ``x0`` [n] over the ``active`` scalars (default all) by Levenberg–Marquardt.

    ``objective``: :class:`~refine.targets.Objective` (N ≥ 1 images); ``x0`` [n] (projected onto the bounds);
    ``active``: positions that move; ``max_iter``: accepted steps (each one Jacobian, ≈ one forward pass per active
    scalar); ``ftol`` (log-likelihood units) and ``xtol`` (standard errors): see the module docstring; ``damping``:
    initial μ (relative to diag H), given up above ``max_damping``; ``callback(history dict)`` after every
    iteration; ``lower``/``upper`` [n]: extra bounds (a trust region); ``solve``: a
    :class:`~refine.minimise.solve.LinearSolve` (default :func:`~refine.minimise.solve.choose_solve`).
    Returns a :class:`MinimizeResult` whose ``normal`` holds the active positions, the normal equations and the
    models at the final x.
    """
    t0 = time.perf_counter()
    active = list(range(objective.n)) if active is None else sorted(active)
    lo_all, hi_all = clipped_bounds(objective, lower, upper)
    x = torch.maximum(torch.minimum(x0.detach().clone(), hi_all), lo_all)
    if not active:
        L = objective.loss(x)
        return MinimizeResult(x, L, True, "nothing to refine", 0, 1,
                              [dict(iteration=0, loss=L, step=0.0, damping=0.0, accepted=True, seconds=0.0)])
    act = torch.as_tensor(active, dtype=torch.long)
    lo, hi, k = lo_all[act], hi_all[act], len(active)
    L, blk, models = objective.normal(x, active)
    if not math.isfinite(L):
        raise ValueError("the starting model gives an infinite or NaN loss (a non-positive model where photons were "
                         "observed?): check the starting model, the background and the mask")
    solve = choose_solve(blk) if solve is None else solve
    log = IterationLog(t0, callback)
    mu, nu, evals, it = float(damping), 2.0, 1, 0
    log.add(0, L, 0.0, mu)
    converged, message = False, f"reached max_iter = {max_iter}"

    def gn(blk, x, L):  # the Gauss–Newton decrement in likelihood units
        blocked = _free_at_bounds(x[act], blk.g, lo, hi)
        return decrement(blk, solve, blocked) / objective.likelihood_unit(L, k)

    if gn(blk, x, L) < ftol:
        converged, message = True, "converged at the start (Gauss–Newton decrement below ftol)"
    while not converged and it < max_iter:
        it += 1
        st = _damped_step(objective, x, act, lo, hi, L, blk, solve, mu, nu, max_damping)
        evals += st.evaluations
        if not st.accepted:
            dec = gn(blk, x, L)
            converged = dec < 10 * ftol
            message = (f"converged (no downhill step; Gauss–Newton decrement {dec:.3g})" if converged
                       else f"stopped: damping above {max_damping:g} without a downhill step")
            break
        decrease = (L - st.loss) / objective.likelihood_unit(st.loss, k)
        step_sig = _step_sigma(objective, blk, solve, st.delta, st.loss, k)
        x, mu, nu = st.x, next_damping(st.mu, st.rho), 2.0
        L, blk, models = objective.normal(x, active)
        evals += 1
        log.add(it, L, step_sig, mu)
        dec = gn(blk, x, L)
        if dec < ftol:
            converged, message = True, f"converged: Gauss–Newton decrement {dec:.3g} < ftol = {ftol:g}"
        elif decrease < ftol and step_sig < xtol:
            converged, message = True, f"converged: step {step_sig:.3g} σ < xtol and decrease below ftol"
    return MinimizeResult(x, L, converged, message, it, evals, log.rows, normal=(list(active), blk, models))
