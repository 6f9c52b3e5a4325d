"""Structure-factor amplitudes F(hkl): dense-table lookup (nearest) and tricubic (4-point Lagrange) interpolation.

The table ``F`` is ``[nh, nk, nl]`` covering h = h_min … h_min+nh−1 (likewise k, l); reflections outside it get
``default_F``.  Lookups are gathers, so F is differentiable with respect to the table and (when interpolating) to h.
Both take the three Miller-index components as separate tensors of one shape (what the sample loop of
:mod:`nbtorch.kernel` holds) and ``hkl_min`` as a tensor [3] or a tuple.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _table_index(idx: Sequence[torch.Tensor], shape) -> torch.Tensor:
    return (idx[0] * shape[1] + idx[1]) * shape[2] + idx[2]


def _origin(hkl_min, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(hkl_min, dtype=like.dtype, device=like.device)


def lookup_nearest_hkl(h0: Sequence[torch.Tensor], F: torch.Tensor, default_F: torch.Tensor, hkl_min) -> torch.Tensor:
    """F at integer indices ``h0`` (three float tensors holding integers, one shape) → that shape; default_F outside
    the table."""
    if F.numel() == 0:
        return default_F.expand(h0[0].shape)
    lo = _origin(hkl_min, h0[0])
    idx = [c - lo[i] for i, c in enumerate(h0)]
    inside = (idx[0] >= 0) & (idx[0] < F.shape[0]) & (idx[1] >= 0) & (idx[1] < F.shape[1]) & (idx[2] >= 0) \
        & (idx[2] < F.shape[2])
    idx = [torch.where(inside, c, torch.zeros_like(c)).long() for c in idx]
    vals = F.reshape(-1)[_table_index(idx, F.shape)]
    return torch.where(inside, vals, default_F)


def _lagrange_weights(t: torch.Tensor):
    """Weights of the 4-point Lagrange polynomial through nodes −1, 0, 1, 2 at ``t`` ∈ [0, 1): a list of 4."""
    tm1, tp1, tm2 = t - 1.0, t + 1.0, t - 2.0
    return [-t * tm1 * tm2 / 6.0, tp1 * tm1 * tm2 / 2.0, -tp1 * t * tm2 / 2.0, tp1 * t * tm1 / 6.0]


def lookup_tricubic_hkl(h: Sequence[torch.Tensor], F: torch.Tensor, default_F: torch.Tensor, hkl_min) -> torch.Tensor:
    """Tricubic F at fractional ``h`` (three tensors of one shape) → that shape.

    Uses the 4×4×4 nodes floor(h)−1 … floor(h)+2 (tensor-product Lagrange polynomial, as nanoBragg).  Samples with any
    index outside [min+2, max−2] fall back to :func:`lookup_nearest_hkl` for that sample only (nanoBragg instead turns
    interpolation off for the rest of the run, spec Q14).
    """
    if F.numel() == 0:
        return default_F.expand(h[0].shape)
    lo = _origin(hkl_min, h[0])
    ok = torch.ones_like(h[0], dtype=torch.bool)
    for i in range(3):
        ok = ok & (h[i] >= lo[i] + 2.0) & (h[i] <= lo[i] + (F.shape[i] - 1) - 2.0)
    hs = [torch.where(ok, h[i], lo[i] + 2.0) for i in range(3)]  # safe stand-in for out-of-range samples
    base = [torch.floor(c) for c in hs]
    w = [_lagrange_weights(c - b) for c, b in zip(hs, base)]
    i0 = [(b - lo[i]).long() - 1 for i, b in enumerate(base)]
    flat = F.reshape(-1)
    nk, nl, last = F.shape[1], F.shape[2], F.numel() - 1
    out = torch.zeros_like(h[0])
    for a in range(4):
        for b in range(4):
            row = ((i0[0] + a) * nk + (i0[1] + b)) * nl + i0[2]
            # clamped: in range for every sample that uses it; the stand-ins of a table thinner than 5 are not
            line = sum(flat[(row + c).clamp(0, last)] * w[2][c] for c in range(4))
            out = out + w[0][a] * w[1][b] * line
    near = lookup_nearest_hkl([torch.ceil(c - 0.5) for c in h], F, default_F, hkl_min)
    return torch.where(ok, out, near)
