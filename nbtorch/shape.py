"""Lattice (crystal-shape) factors F_latt, gradient-safe at their removable singularities.

Every function takes **reduced** Miller indices Δh = h − round(h) (``[..., 3]``, so float32 keeps the phase) and the
cell counts ``N`` (``[3]``, continuous) and returns F_latt ``[...]`` (its square multiplies |F|²).
"""
from __future__ import annotations

import math

import torch

from .units import GAUSS_RHO2_SCALE, ROUND_XTAL_NORM, TOPHAT_RHO2_LIMIT


def round_half_down(h: torch.Tensor) -> torch.Tensor:
    """nanoBragg's nearest integer: ceil(h − ½) (exact halves go toward −∞)."""
    return torch.ceil(h - 0.5)


def sincg(x: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """sin(N·x)/sin(x) for reduced ``x`` = π·Δh ∈ [−π/2, π/2]; N at x = 0 (double-where: finite value and gradient).

    ``x``: ``[..., k]``, ``N``: broadcastable (e.g. ``[3]``).  Within |N·x| < 1e-3 the series N − N(N²−1)x²/6 is used.
    """
    small = torch.abs(x) < 1e-3 / N
    xs = torch.where(small, torch.ones_like(x), x)
    direct = torch.sin(N * xs) / torch.sin(xs)
    series = N - (N * (N * N - 1.0) / 6.0) * (x * x)
    return torch.where(small, series, direct)


def sinc3_of_square(u: torch.Tensor) -> torch.Tensor:
    """sinc3(x) = 3(sin x − x cos x)/x³ as a function of u = x² ≥ 0 (series below x = 0.5; gradient-safe at 0)."""
    small = u < 0.25
    us = torch.where(small, torch.ones_like(u), u)
    x = torch.sqrt(us)
    direct = 3.0 * (torch.sin(x) - x * torch.cos(x)) / (us * x)
    series = 1.0 - u / 10.0 + u * u / 280.0 - u**3 / 15120.0 + u**4 / 1330560.0
    return torch.where(small, series, direct)


def square(dh: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """Parallelepiped crystal: Π_i sin(N_i π Δh_i)/sin(π Δh_i); peak Na·Nb·Nc.  ``dh`` ``[..., 3]``, ``N`` ``[3]``."""
    f = sincg(math.pi * dh, N)
    return f[..., 0] * f[..., 1] * f[..., 2]


def round_(dh: torch.Tensor, N: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Ellipsoidal crystal: Na·Nb·Nc·0.7236·sinc3(π·sqrt(fudge·Σ(Δh_i N_i)²))."""
    r2 = ((dh * N) ** 2).sum(-1)
    return N.prod(-1) * ROUND_XTAL_NORM * sinc3_of_square((math.pi**2 * fudge) * r2)


def reciprocal_radius2(dh: torch.Tensor, B: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """nanoBragg's ρ² = |Δh·a* + Δk·b* + Δl·c*|²·(Na·Nb·Nc)² (Å⁻², with B = [a* b* c*] in Å⁻¹), spec Q17."""
    dq = dh @ B.transpose(-1, -2)
    return (dq * dq).sum(-1) * N.prod(-1) ** 2


def gauss(dh: torch.Tensor, N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Gaussian spots: Na·Nb·Nc·exp(−ρ²·fudge/0.63) with ρ² from :func:`reciprocal_radius2`."""
    return N.prod(-1) * torch.exp(-reciprocal_radius2(dh, B, N) * (fudge / GAUSS_RHO2_SCALE))


def tophat(dh: torch.Tensor, N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Flat-top spots: Na·Nb·Nc where ρ²·fudge < 0.3969, else 0 (piecewise constant: zero gradient in Δh)."""
    inside = reciprocal_radius2(dh, B, N) * fudge < TOPHAT_RHO2_LIMIT
    NNN = N.prod(-1)
    return torch.where(inside, NNN, torch.zeros_like(NNN))


def lattice_factor(shape: str, dh: torch.Tensor, N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0):
    """Dispatch on the (static) ``shape`` name: 'square', 'round', 'gauss' or 'tophat'."""
    if shape == "square":
        return square(dh, N)
    if shape == "round":
        return round_(dh, N, fudge)
    if shape == "gauss":
        return gauss(dh, N, B, fudge)
    if shape == "tophat":
        return tophat(dh, N, B, fudge)
    raise ValueError(f"shape must be one of square, round, gauss, tophat; got {shape!r}")
