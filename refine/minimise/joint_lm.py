"""Levenberg–Marquardt on a joint objective, each step solved through the Schur complement.

The same rules as :mod:`refine.lm` (Marquardt-scaled damping, Nielsen's update, convergence when the undamped
Gauss–Newton step would lower the loss by less than ``ftol`` log-likelihood units), on the block normal equations of
:class:`refine.joint.JointObjective` solved by :func:`refine.schur.schur_solve`: time and memory per iteration grow
linearly with the number of images.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

from ..pipeline.joint import JointObjective
from .lm import IterationLog, next_damping
from .schur import BlockNormal, decrement, schur_solve


class JointRun(NamedTuple):
    """Outcome of :func:`joint_levenberg_marquardt`: ``X`` [n] (best point), ``loss``, ``converged``, ``message``,
    ``iterations`` (accepted steps), ``evaluations``, ``history`` (dicts: iteration, loss, step, damping, accepted,
    seconds), ``normal`` ((BlockNormal, per-image H) at X over the active scalars)."""

    X: torch.Tensor
    loss: float
    converged: bool
    message: str
    iterations: int
    evaluations: int
    history: List[dict]
    normal: tuple


def active_positions(obj: JointObjective, act_s: Sequence[int], act_own: Sequence[Sequence[int]]) -> torch.Tensor:
    """Flat positions in X of the active scalars, in block order (shared, image 1's own, …)."""
    lay = obj.layout
    pos = list(act_s)
    for i, own in enumerate(act_own):
        pos += [lay.offset[i] + j for j in own]
    return torch.as_tensor(pos, dtype=torch.long)


def _split(delta: torch.Tensor, ks: int, act_own) -> tuple:
    parts, k = [], ks
    for own in act_own:
        parts.append(delta[k:k + len(own)])
        k += len(own)
    return delta[:ks], parts


def _step(obj, X, pos, blk: BlockNormal, act_own, lo, hi, L: float, mu: float, nu: float, max_damping: float):
    """One damped step: (accepted, X, loss, rho, mu, nu, evaluations, |δ| max)."""
    evals, ks = 0, len(blk.gs)
    while True:
        ds, dp = schur_solve(blk, mu)
        delta = torch.cat([ds] + list(dp))
        if bool(torch.isfinite(delta).all()):
            xa = torch.maximum(torch.minimum(X[pos] + delta, hi), lo)
            delta = xa - X[pos]
            ds, dp = _split(delta, ks, act_own)
            pred = -(blk.dot(ds, dp) + 0.5 * blk.quadratic(ds, dp))
            X_new = X.index_put((pos,), xa)
            L_new = obj.loss(X_new)
            evals += 1
            if math.isfinite(L_new) and L_new < L:
                rho = (L - L_new) / pred if pred > 0 else 1.0
                return True, X_new, L_new, rho, mu, nu, evals
        mu, nu = mu * nu, nu * 2.0
        if mu > max_damping:
            return False, X, L, -1.0, mu, nu, evals


def joint_levenberg_marquardt(
    obj: JointObjective, X0: torch.Tensor, act_s: Sequence[int], act_own: Sequence[Sequence[int]], *,
    max_iter: int = 30, ftol: float = 1e-3, damping: float = 1e-3, max_damping: float = 1e10,
    lower: Optional[torch.Tensor] = None, upper: Optional[torch.Tensor] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> JointRun:
    """Minimise the joint loss from ``X0`` [n] over the active shared positions ``act_s`` and each image's active own
    positions ``act_own[i]`` (see :meth:`JointObjective.normal`), within ``lower``/``upper`` [n] (x units).

    Each iteration costs one Jacobian per image (forward mode, ≈ one simulation per active scalar of the image) and a
    Schur-complement solve; ``ftol`` is in log-likelihood units."""
    t0 = time.perf_counter()
    inf = torch.full_like(X0, math.inf)
    lo_all = -inf if lower is None else lower
    hi_all = inf if upper is None else upper
    X = torch.maximum(torch.minimum(X0.detach().clone(), hi_all), lo_all)
    pos = active_positions(obj, act_s, act_own)
    lo, hi, k = lo_all[pos], hi_all[pos], len(pos)
    L, blk, Hs = obj.normal(X, act_s, act_own)
    if not math.isfinite(L):
        raise ValueError("the starting models give an infinite or NaN loss (a non-positive model where photons were "
                         "observed?): check the starting models, the background and the masks")
    log = IterationLog(t0, callback)
    mu, nu, evals, it = float(damping), 2.0, 1, 0
    log.add(0, L, 0.0, mu)
    converged, message = False, f"reached max_iter = {max_iter}"
    if k == 0 or decrement(blk) < ftol * obj.likelihood_unit(L, k):
        converged, message = True, "converged at the start (Gauss–Newton decrement below ftol)"
    while not converged and it < max_iter:
        it += 1
        ok, X_new, L_new, rho, mu, nu, ev = _step(obj, X, pos, blk, act_own, lo, hi, L, mu, nu, max_damping)
        evals += ev
        if not ok:
            gn = decrement(blk) / obj.likelihood_unit(L, k)
            converged = gn < 10 * ftol
            message = (f"converged (no downhill step; Gauss–Newton decrement {gn:.3g})" if converged
                       else f"stopped: damping above {max_damping:g} without a downhill step")
            break
        step = float((X_new - X).abs().max())
        X, mu, nu = X_new, next_damping(mu, rho), 2.0
        L, blk, Hs = obj.normal(X, act_s, act_own)
        evals += 1
        log.add(it, L, step, mu)
        gn = decrement(blk) / obj.likelihood_unit(L, k)
        if gn < ftol:
            converged, message = True, f"converged: Gauss–Newton decrement {gn:.3g} < ftol = {ftol:g}"
    return JointRun(X, L, converged, message, it, evals, log.rows, (blk, Hs))
