"""Levenberg–Marquardt (Fisher scoring) for N ≥ 1 images; the algorithm and its stopping rules are described in
docs/refine.md ("Minimisers").

Each iteration takes the normal equations at x from :meth:`refine.targets.Objective.normal` (block form, shared + per
image), solves (H + μ·diag H)δ = −g with the :class:`~refine.minimise.solve.LinearSolve` passed in, projects x + δ on
the bounds and accepts the step when the loss falls; μ follows Nielsen's rule.  Converged when the undamped
Gauss–Newton decrement ½·gᵀH⁻¹g (scalars held on a bound left out) is below ``ftol`` log-likelihood units, or when an
accepted step moved every scalar by < ``xtol`` standard errors and lowered the loss by < ``ftol``.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, List, Optional, Sequence

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


#: Chord steps in a row (each reusing the last Jacobian); a chord step follows a step whose gain ratio was within
#: CHORD_RHO of 1 at a damping μ ≤ CHORD_DAMPING (the quadratic model holds: the Jacobian barely changes).
MAX_CHORDS = 2
CHORD_RHO = 0.25
CHORD_DAMPING = 1e-2


class InfiniteStart(ValueError):
    """The starting model gives an infinite or NaN loss (raised by :func:`levenberg_marquardt`)."""


def clipped_bounds(objective, lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None):
    """The objective's bounds on x [n] intersected with extra ``lower``/``upper`` [n] (None: none)."""
    lo, hi = objective.bounds()
    if lower is not None:
        lo = torch.maximum(lo, lower)
    if upper is not None:
        hi = torch.minimum(hi, upper)
    return lo, hi


def _damped_step(evaluate, x, act, lo, hi, L: float, blk: BlockNormal, solve: LinearSolve, mu: float, nu: float,
                 max_damping: float):
    """Solve (H + μ·diag H)δ = −g, project x + δ on the bounds, and raise μ (×ν, ν ← 2ν) until the loss falls or μ
    exceeds ``max_damping``: (x, loss, δ (None: no downhill step), gain ratio ρ, μ, ν, loss evaluations, what
    ``evaluate(x)`` → (loss, what) gave at the new x)."""
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
            L_new, extra = evaluate(x_new)
            evals += 1
            if math.isfinite(L_new) and L_new < L:
                rho = (L - L_new) / pred if pred > 0 else 1.0
                return x_new, L_new, delta, rho, mu, nu, evals, extra
        mu, nu = mu * nu, nu * 2.0
        if mu > max_damping:
            return x, L, None, -1.0, mu, nu, evals, None


class IterationLog:
    """The history of a minimisation (:attr:`MinimizeResult.history` rows, ``seconds`` since ``t0``), each row passed
    to ``callback`` as it is written."""

    def __init__(self, t0: float, callback: Optional[Callable[[dict], None]] = None):
        self.t0, self.callback, self.rows = t0, callback, []

    def add(self, it: int, loss: float, step: float, damping: float, accepted: bool = True) -> None:
        self.rows.append(dict(iteration=it, loss=loss, step=step, damping=damping, accepted=accepted,
                              seconds=time.perf_counter() - self.t0))
        if self.callback:
            self.callback(self.rows[-1])


def _step_sigma(solve: LinearSolve, blk: BlockNormal, delta: torch.Tensor, unit: float) -> float:
    """The largest |δ|/σ of a step, σ from the normal matrix in likelihood units (inf when it is singular)."""
    try:
        var = solve.inverse_diagonal(blk).clamp_min(1e-300)
        return float((delta.abs() / torch.sqrt(var * unit)).max())
    except RuntimeError:
        return math.inf


def _chord_hooks(objective):
    """(chord steps possible, normal()'s keyword arguments, x → (loss, what a chord step needs)) of ``objective``."""
    if hasattr(objective, "chord"):
        return True, {"keep": True}, objective.loss_models
    return False, {}, (lambda z: (objective.loss(z), None))


def levenberg_marquardt(objective, x0: torch.Tensor, active: Optional[Sequence[int]] = None, *, max_iter: int = 30,
                        ftol: float = DEFAULT_FTOL, xtol: float = 1e-2, damping: float = DEFAULT_DAMPING,
                        max_damping: float = 1e10, callback: Optional[Callable[[dict], None]] = None,
                        lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None,
                        solve: Optional[LinearSolve] = None) -> MinimizeResult:
    """Minimise ``objective`` (:class:`~refine.targets.Objective`) from ``x0`` [n] (projected onto the bounds) over
    the ``active`` positions (default all) by Levenberg–Marquardt.

    ``max_iter``: accepted steps on a new Jacobian; ``ftol``, ``xtol``: see the module docstring; ``damping``:
    initial μ (relative to diag H), given up above ``max_damping``; ``callback(history row)`` after every step;
    ``lower``/``upper`` [n]: extra bounds (a trust region); ``solve``: a :class:`~refine.minimise.solve.LinearSolve`
    (default :func:`~refine.minimise.solve.choose_solve`).  After a near Gauss–Newton step the quadratic model
    predicted well (:data:`CHORD_RHO`, :data:`CHORD_DAMPING`), the next may be a chord step (the objective's
    :meth:`~refine.targets.Objective.chord`: the last Jacobian with the gradient at the new point, at no derivative
    cost; at most :data:`MAX_CHORDS` in a row, not counted in ``max_iter``); convergence is only ever decided on a
    new Jacobian.  The result's ``normal`` holds the active positions, the normal equations and the models at the
    final x (None when the last step was a chord step)."""
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
    chords, kw, evaluate = _chord_hooks(objective)
    L, blk, models = objective.normal(x, active, **kw)
    if not math.isfinite(L):
        raise InfiniteStart("the starting model gives an infinite or NaN loss (a non-positive model where photons "
                            "were observed?): check the starting model, the background and the mask")
    solve = choose_solve(blk) if solve is None else solve
    log = IterationLog(t0, callback)
    mu, nu, evals, it, chord, steps = float(damping), 2.0, 1, 0, 0, 0  # chord: chord steps since the Jacobian

    def gn(blk, x, L):  # the Gauss–Newton decrement in likelihood units
        xa, g = x[act], blk.g  # scalars on a bound with the gradient pushing outwards are left out
        blocked = ((xa <= lo) & (g > 0)) | ((xa >= hi) & (g < 0))
        return decrement(blk, solve, blocked) / objective.likelihood_unit(L, k)

    log.add(0, L, 0.0, mu)
    converged, message = gn(blk, x, L) < ftol, f"reached max_iter = {max_iter}"
    message = "converged at the start (Gauss–Newton decrement below ftol)" if converged else message
    while not converged and it < max_iter:
        it += 0 if chord else 1  # iterations: steps on a new Jacobian (the chord steps between them are extra)
        mu0, nu0 = mu, nu  # a chord step tries μ and 2μ only, then a new Jacobian takes over from μ
        x_new, L_new, delta, rho, mu, nu, n_eval, ms_new = _damped_step(evaluate, x, act, lo, hi, L, blk, solve, mu,
                                                                        nu, 4 * mu if chord else max_damping)
        evals += n_eval
        if delta is None and chord:  # the chord's model has no downhill step: a new Jacobian, and try again
            chord, evals, mu, nu = 0, evals + 1, mu0, nu0
            L, blk, models = objective.normal(x, active, **kw)
            continue
        if delta is None:
            dec = gn(blk, x, L)
            converged = dec < 10 * ftol
            message = (f"converged (no downhill step; Gauss–Newton decrement {dec:.3g})" if converged
                       else f"stopped: damping above {max_damping:g} without a downhill step")
            break
        decrease = (L - L_new) / objective.likelihood_unit(L_new, k)
        step_sig = _step_sigma(solve, blk, delta, objective.likelihood_unit(L_new, k))
        x, mu, nu, steps = x_new, mu * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0, steps + 1  # Nielsen
        quadratic = abs(rho - 1.0) <= CHORD_RHO and mu <= CHORD_DAMPING  # a near Gauss–Newton step, well predicted
        nxt = objective.chord(x, ms_new) if (chords and chord < MAX_CHORDS and quadratic) else None
        if nxt is not None and gn(nxt[1], x, nxt[0]) >= ftol:  # far from converged still: a chord step next
            (L, blk, models), chord = nxt, chord + 1
            log.add(steps, L, step_sig, mu)
            continue
        L, blk, models = objective.normal(x, active, **kw)
        evals, chord = evals + 1, 0
        log.add(steps, L, step_sig, mu)
        dec = gn(blk, x, L)
        if dec < ftol:
            converged, message = True, f"converged: Gauss–Newton decrement {dec:.3g} < ftol = {ftol:g}"
        elif decrease < ftol and step_sig < xtol:
            converged, message = True, f"converged: step {step_sig:.3g} σ < xtol and decrease below ftol"
    return MinimizeResult(x, L, converged, message, it, evals, log.rows,
                          normal=None if chord else (list(active), blk, models))
