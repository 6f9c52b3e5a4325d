"""The linear solves of a Levenberg–Marquardt step on normal equations in block form
(:class:`~refine.targets.normal.BlockNormal`): dense, or through the Schur complement.

A fit of N images has X = (x_s, x_1, …, x_N), the shared scalars [n_s] and each image's own [n_i].  Image i only sees
(x_s, x_i), so H is block-arrowhead: A = Σ_i A_i [n_s, n_s] (shared-shared), B_i [n_s, n_i] (shared-own), C_i
[n_i, n_i] (own-own).  Eliminating the C_i leaves the Schur complement S = A − Σ B_i C_i⁻¹ B_iᵀ [n_s, n_s], at a
cost linear in N (a dense solve is cubic in N·n_i).  One image has no shared block: H = C_1, solved densely.  The
covariance H⁻¹ has blocks S⁻¹ (shared), −S⁻¹·B_i·C_i⁻¹ (shared-own) and C_i⁻¹ + C_i⁻¹·B_iᵀ·S⁻¹·B_i·C_i⁻¹ (own).
A solve is a :class:`LinearSolve` (:data:`DENSE`, :data:`SCHUR`); a new one is one more instance.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from ..targets.normal import BlockNormal, damping_diagonal


def _solve(M: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """M⁻¹·R for a symmetric positive (semi-)definite M [k, k] and R [k] or [k, m]: Cholesky, else least squares."""
    if M.shape[0] == 0:
        return R
    L, info = torch.linalg.cholesky_ex(M)
    R2 = R[:, None] if R.dim() == 1 else R
    sol = torch.cholesky_solve(R2, L) if int(info) == 0 else torch.linalg.lstsq(M, R2).solution
    return sol[:, 0] if R.dim() == 1 else sol


def schur_complement(blocks: BlockNormal) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(S [n_s, n_s], [C_i⁻¹·B_iᵀ] [n_i, n_s], [C_i⁻¹·g_i] [n_i]): the Schur complement of the per-image blocks and
    the per-image solves it was built from."""
    S = blocks.A.clone()
    CB, Cg = [], []
    for B, C, g in zip(blocks.B, blocks.C, blocks.gp):
        sol = _solve(C, torch.cat([B.T, g[:, None]], 1))  # one factorisation for both
        CB.append(sol[:, :-1])
        Cg.append(sol[:, -1])
        S = S - B @ sol[:, :-1]
    return S, CB, Cg


def schur_solve(blocks: BlockNormal, mu: float = 0.0) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The step δ solving (H + μ·diag H)·δ = −g through the Schur complement: (δ_s [n_s], [δ_i [n_i]]).

    S·δ_s = −g_s + Σ B_i·C_i⁻¹·g_i, then δ_i = −C_i⁻¹·(g_i + B_iᵀ·δ_s) (C_i, S damped when μ > 0)."""
    blk = blocks.damped(mu)
    S, CB, Cg = schur_complement(blk)
    rhs = -blk.gs
    for B, cg in zip(blk.B, Cg):
        rhs = rhs + B @ cg
    ds = _solve(S, rhs)
    dp = [-(cg + cb @ ds) for cb, cg in zip(CB, Cg)]
    return ds, dp


def pseudo_inverse(H: torch.Tensor, names: Sequence[str] = (), rcond: float = 1e-10):
    """(H⁻¹ [n, n], degenerate) of a symmetric H, inverted through its correlation form C = D^-½·H·D^-½ (D = diag H):
    eigenvalues of C below ``rcond`` times the largest mark combinations of free parameters that the data do not
    determine (e.g. a crystal rotation about the beam together with an in-plane detector rotation); they are left
    out and named (``degenerate``: a list of lists of ``names``, when given)."""
    if H.shape[0] == 0:
        return H.clone(), []
    d = torch.sqrt(torch.clamp(torch.diagonal(H), min=1e-300))
    w, V = torch.linalg.eigh(H / d[:, None] / d[None, :])
    bad = w < rcond * float(w.max())
    degenerate = []
    for j in torch.nonzero(bad).flatten().tolist() if names else ():
        v = V[:, j].abs()
        degenerate.append([names[i] for i in torch.nonzero(v > 0.2 * float(v.max())).flatten().tolist()])
    winv = torch.where(bad, torch.zeros_like(w), 1.0 / torch.where(bad, torch.ones_like(w), w))
    return ((V * winv) @ V.T) / d[:, None] / d[None, :], degenerate


def _inverse(M: torch.Tensor) -> torch.Tensor:
    return pseudo_inverse(M)[0]


def schur_covariance(blocks: BlockNormal) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Blocks of H⁻¹: (shared [n_s, n_s], [shared-own [n_s, n_i]], [own [n_i, n_i]]), per image, without forming
    the dense inverse (the covariance of the increments of a likelihood target)."""
    S, CB, _ = schur_complement(blocks)
    S_inv = _inverse(S)
    cross, own = [], []
    for C, cb in zip(blocks.C, CB):
        X = -(S_inv @ cb.T)  # −S⁻¹·B_i·C_i⁻¹  [n_s, n_i]
        cross.append(X)
        own.append(_inverse(C) - cb @ X)  # C⁻¹ + C⁻¹Bᵀ S⁻¹ B C⁻¹
    return S_inv, cross, own


def image_covariance(shared: torch.Tensor, cross: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """One image's covariance [n_s + n_i, n_s + n_i] of (x_s, x_i) from the blocks of :func:`schur_covariance`."""
    return torch.cat([torch.cat([shared, cross], 1), torch.cat([cross.T, own], 1)], 0)


def dense_inverse_diagonal(blocks: BlockNormal) -> torch.Tensor:
    """diag(H⁻¹) [n] of the dense H (RuntimeError when singular)."""
    return torch.diagonal(torch.linalg.inv(blocks.dense()[0]))


def _dense_step(blocks: BlockNormal, mu: float) -> torch.Tensor:
    H, g = blocks.dense()
    return torch.linalg.solve(H + mu * torch.diag(damping_diagonal(H)), -g)


def _schur_step(blocks: BlockNormal, mu: float) -> torch.Tensor:
    ds, dp = schur_solve(blocks, mu)
    return torch.cat([ds] + list(dp))


def _schur_inverse_diagonal(blocks: BlockNormal) -> torch.Tensor:
    shared, _, own = schur_covariance(blocks)
    return torch.cat([torch.diagonal(shared)] + [torch.diagonal(c) for c in own])


class LinearSolve(NamedTuple):
    """How a Levenberg–Marquardt step solves its normal equations: ``step(blocks, μ)`` → δ [n] solving
    (H + μ·diag H)·δ = −g, and ``inverse_diagonal(blocks)`` → diag(H⁻¹) [n] (a step's size in standard errors)."""

    name: str
    step: Callable[[BlockNormal, float], torch.Tensor]
    inverse_diagonal: Callable[[BlockNormal], torch.Tensor]


DENSE = LinearSolve("dense", _dense_step, dense_inverse_diagonal)
SCHUR = LinearSolve("schur", _schur_step, _schur_inverse_diagonal)
#: Above this many scalars a fit of several images solves through the Schur complement.
DENSE_LIMIT = 64


def choose_solve(blocks: BlockNormal) -> LinearSolve:
    """Dense for one image or few scalars, the Schur complement for shared + per-image blocks beyond that."""
    n = blocks.A.shape[0] + sum(C.shape[0] for C in blocks.C)
    return DENSE if len(blocks.C) == 1 or n <= DENSE_LIMIT else SCHUR


def decrement(blocks: BlockNormal, solve: LinearSolve = DENSE, blocked: Optional[torch.Tensor] = None) -> float:
    """½·gᵀH⁻¹g: the loss decrease the undamped Gauss–Newton step predicts, the ``blocked`` entries (bool [n]:
    scalars held on a bound) left out (least squares when H is singular)."""
    if blocked is not None and bool(blocked.any()):
        H, g = blocks.dense()
        keep = ~blocked
        if not bool(keep.any()):
            return 0.0
        g, H = g[keep], H[keep][:, keep]
        blocks, solve = BlockNormal(H.new_zeros(0, 0), g.new_zeros(0), [H.new_zeros(0, len(g))], [H], [g]), DENSE
    try:
        return max(0.0, -0.5 * float(blocks.g @ solve.step(blocks, 0.0)))
    except RuntimeError:
        H, g = blocks.dense()
        return max(0.0, 0.5 * float(g @ torch.linalg.lstsq(H, g[:, None]).solution[:, 0]))
