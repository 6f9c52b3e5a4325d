"""The normal equations of a fit of N images in block form (what :class:`~refine.targets.objective.Objective`
computes and :mod:`refine.minimise` solves): the shared scalars' block, and per image its own block and the coupling
to the shared ones (see :mod:`refine.minimise.solve` for the algebra).  One image has no shared block: its H is C_1.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch


def damping_diagonal(M: torch.Tensor) -> torch.Tensor:
    """diag(M) with a tiny floor, so that μ·diag keeps a zero diagonal entry solvable."""
    return torch.diagonal(M).clamp_min(1e-12 * float(torch.diagonal(M).abs().max()) + 1e-300)


class BlockNormal(NamedTuple):
    """Normal equations in block form (see the module docstring): ``A`` [n_s, n_s], ``gs`` [n_s], and per image
    ``B`` [n_s, n_i], ``C`` [n_i, n_i], ``gp`` [n_i] (lists of length N); ``H``: each image's own normal matrix
    [n_s + n_i, n_s + n_i] in (shared, own) order, data only (what that image alone would give), or None.  Units are
    those of the loss per increment unit (log-likelihood / x-unit²)."""

    A: torch.Tensor
    gs: torch.Tensor
    B: List[torch.Tensor]
    C: List[torch.Tensor]
    gp: List[torch.Tensor]
    H: Optional[List[torch.Tensor]] = None

    @property
    def g(self) -> torch.Tensor:
        """The gradient [n] in the order (shared, image 1, …, image N)."""
        return torch.cat([self.gs] + list(self.gp))

    def with_priors(self, terms: Sequence[Tuple[int, float, float]], active: Sequence[int], layout) -> "BlockNormal":
        """These equations plus the Gauss–Newton terms of priors: (position in X, residual r, dr/dx) each adds
        (dr/dx)² to its diagonal entry and r·dr/dx to its gradient entry, when active."""
        rows = {p: j for j, p in enumerate(active)}
        terms = [t for t in terms if t[0] in rows]
        if not terms:
            return self
        A, gs, C, gp = self.A.clone(), self.gs.clone(), [c.clone() for c in self.C], [g.clone() for g in self.gp]
        ns = A.shape[0]
        for pos, r, d in terms:
            j = rows[pos]
            if j < ns:
                A[j, j] += d * d
                gs[j] += d * r
                continue
            i = max(k for k in range(len(C)) if layout.offset[k] <= pos)
            c = j - ns - sum(cc.shape[0] for cc in C[:i])
            C[i][c, c] += d * d
            gp[i][c] += d * r
        return self._replace(A=A, gs=gs, C=C, gp=gp)

    def damped(self, mu: float) -> "BlockNormal":
        """H + μ·diag(H) (Marquardt's scaling; a tiny floor keeps a zero diagonal entry solvable)."""
        if mu == 0:
            return self

        def add(M):
            return M + mu * torch.diag(damping_diagonal(M)) if M.numel() else M

        return self._replace(A=add(self.A), C=[add(C) for C in self.C])

    def dense(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The dense (H [n, n], g [n]) in the order (shared, image 1, …, image N)."""
        if self.A.shape[0] == 0 and len(self.C) == 1:
            return self.C[0], self.gp[0]
        H = torch.block_diag(self.A, *self.C)
        ns = k = self.A.shape[0]
        for B in self.B:
            H[:ns, k:k + B.shape[1]], H[k:k + B.shape[1], :ns] = B, B.T
            k += B.shape[1]
        return H, self.g

    def predicted_decrease(self, delta: torch.Tensor) -> float:
        """−(gᵀδ + ½·δᵀHδ) of a step δ [n] (the decrease of the quadratic model), blockwise."""
        if self.A.shape[0] == 0 and len(self.C) == 1:
            return -float(self.gp[0] @ delta + 0.5 * delta @ (self.C[0] @ delta))
        k, dp = self.A.shape[0], []
        for C in self.C:
            dp.append(delta[k:k + C.shape[0]])
            k += C.shape[0]
        ds = delta[:self.A.shape[0]]
        q = ds @ self.A @ ds
        for B, C, d in zip(self.B, self.C, dp):
            q = q + 2.0 * (ds @ B @ d) + d @ C @ d
        lin = self.gs @ ds + sum((g @ d for g, d in zip(self.gp, dp)), ds.new_zeros(()))
        return -float(lin + 0.5 * q)
