"""Structure-factor amplitudes F(hkl): dense-table lookup (nearest) and tricubic (4-point Lagrange) interpolation.

The table ``F`` is ``[nh, nk, nl]`` covering h = h_min … h_min+nh−1 (likewise k, l); reflections outside it get
``default_F``.  Lookups are gathers, so F is differentiable with respect to the table and (when interpolating) to h.
"""
from __future__ import annotations

from typing import Tuple

import torch


def _flat_index(idx: torch.Tensor, shape) -> torch.Tensor:
    return (idx[..., 0] * shape[1] + idx[..., 1]) * shape[2] + idx[..., 2]


def lookup_nearest(h0: torch.Tensor, F: torch.Tensor, default_F: torch.Tensor, hkl_min: Tuple[int, int, int]):
    """F at integer indices ``h0`` (``[..., 3]``, float holding integers) → ``[...]``; default_F outside the table."""
    if F.numel() == 0:
        return default_F.expand(h0.shape[:-1])
    shape = torch.tensor(F.shape, device=h0.device)
    idx = h0.long() - torch.tensor(hkl_min, device=h0.device)
    inside = ((idx >= 0) & (idx < shape)).all(-1)
    idx = torch.where(inside[..., None], idx, torch.zeros_like(idx))
    vals = F.reshape(-1)[_flat_index(idx, F.shape)]
    return torch.where(inside, vals, default_F)


def _lagrange_weights(t: torch.Tensor) -> torch.Tensor:
    """Weights of the 4-point Lagrange polynomial through nodes −1, 0, 1, 2 at ``t`` ∈ [0, 1): ``[..., 4]``."""
    tm1, tp1, tm2 = t - 1.0, t + 1.0, t - 2.0
    return torch.stack([-t * tm1 * tm2 / 6.0, tp1 * tm1 * tm2 / 2.0, -tp1 * t * tm2 / 2.0, tp1 * t * tm1 / 6.0], -1)


def lookup_tricubic(h: torch.Tensor, F: torch.Tensor, default_F: torch.Tensor, hkl_min: Tuple[int, int, int]):
    """Tricubic F at fractional ``h`` (``[..., 3]``) → ``[...]``.

    Uses the 4×4×4 nodes floor(h)−1 … floor(h)+2 (tensor-product Lagrange polynomial, as nanoBragg).  Samples with any
    index outside [min+2, max−2] fall back to :func:`lookup_nearest` for that sample only (nanoBragg instead turns
    interpolation off for the rest of the run, spec Q14).
    """
    if F.numel() == 0:
        return default_F.expand(h.shape[:-1])
    lo = torch.tensor(hkl_min, dtype=h.dtype, device=h.device)
    hi = lo + torch.tensor(F.shape, dtype=h.dtype, device=h.device) - 1.0
    ok = ((h >= lo + 2.0) & (h <= hi - 2.0)).all(-1)
    hs = torch.where(ok[..., None], h, lo + 2.0)  # safe stand-in for out-of-range samples
    base = torch.floor(hs)
    w = _lagrange_weights(hs - base)  # [..., 3, 4]
    i0 = (base - lo).long() - 1  # [..., 3]
    flat = F.reshape(-1)
    nk, nl = F.shape[1], F.shape[2]
    out = torch.zeros_like(h[..., 0])
    lidx = i0[..., 2, None] + torch.arange(4, device=h.device)  # [..., 4]
    for a in range(4):
        for b in range(4):
            row = ((i0[..., 0] + a) * nk + (i0[..., 1] + b)) * nl
            vals = flat[row[..., None] + lidx]  # [..., 4]
            out = out + w[..., 0, a] * w[..., 1, b] * (vals * w[..., 2, :]).sum(-1)
    near = lookup_nearest(torch.ceil(h - 0.5), F, default_F, hkl_min)
    return torch.where(ok, out, near)
