"""Lattice (crystal-shape) factors F_latt, gradient-safe at their removable singularities.

Every function takes **reduced** Miller indices Δh = h − round(h) (so float32 keeps the phase) and the cell counts
``N`` (``[3]``, continuous) and returns F_latt (its square multiplies |F|²).  The ``*_components`` functions take the
three components Δh, Δk, Δl as separate tensors of one shape (what the sample loop of :mod:`nbtorch.kernel` holds);
:func:`lattice_factor` takes them stacked along a last axis of length 3.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .types import SHAPES
from .units import GAUSS_RHO2_SCALE, ROUND_XTAL_NORM, TOPHAT_RHO2_LIMIT


def round_half_down(h: torch.Tensor) -> torch.Tensor:
    """nanoBragg's nearest integer: ceil(h − ½) (exact halves go toward −∞)."""
    return torch.ceil(h - 0.5)


#: sin(πt)/(πt) = Σ_k SINC_PI[k]·(π²t²)^k for |t| ≤ ½: a Chebyshev fit of sin(√u)/√u on u ∈ [0, π²/4] (mpmath
#: ``chebyfit``, 9 terms, coefficients rounded to double); relative error ≤ 2.3e-16 against a 50-digit sine.
SINC_PI = (1.0, -0.16666666666666666, 0.008333333333333186, -0.00019841269841208676, 2.7557319211229606e-06,
           -2.505210689056952e-08, 1.605894087848656e-10, -7.643026557971632e-13, 2.7215749422983443e-15)


def _sinc_pi_polynomial(t2: torch.Tensor, slope: bool = False):
    """sin(πt)/(πt) = P(π²t²) of ``t2`` = t² ∈ [0, ¼] (any shape; the polynomial :data:`SINC_PI` by Horner's rule,
    no transcendental call), and with ``slope`` also P'(π²t²)."""
    u = t2 * (math.pi**2)
    p = u * SINC_PI[-1] + SINC_PI[-2]
    dp = torch.full_like(u, SINC_PI[-1]) if slope else None
    for c in SINC_PI[-3::-1]:
        if slope:
            dp = dp * u + p
        p = p * u + c
    return (p, dp) if slope else p


def _sincg_parts(dh: torch.Tensor, N: torch.Tensor):
    """The pieces of sin(NπΔh)/sin(πΔh): with y = N·Δh = m + r (m = round(y), |r| ≤ ½), sin(πy) = (−1)^m·sin(πr),
    so the ratio is (−1)^m·q·s(r)/s(Δh), s(t) = sin(πt)/(πt), q = r/Δh (= N when m = 0: no division there, and
    |Δh| ≥ 1/(2N) otherwise).  Returns (m, r, (−1)^m, q, Δh with 1 where m = 0)."""
    y = N * dh
    m = torch.round(y)
    r = y - m
    sign = 1.0 - 4.0 * (0.5 * m - torch.floor(0.5 * m))  # (−1)^m
    central = m == 0
    hs = torch.where(central, torch.ones_like(dh), dh)
    return m, r, sign, torch.where(central, N, r / hs), hs


def _sincg_polynomial(dh: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """:func:`sincg_reduced` from :func:`_sincg_parts`: two polynomials and one division per element."""
    _, r, sign, q, _ = _sincg_parts(dh, N)
    return sign * q * _sinc_pi_polynomial(r * r) / _sinc_pi_polynomial(dh * dh)


def _sincg_sines(dh: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """:func:`sincg_reduced` as the quotient of two sines (the series N − N(N²−1)x²/6 within |N·x| < 1e-3, x = πΔh;
    double-where: finite value and gradient at 0)."""
    x = math.pi * dh
    small = torch.abs(x) < 1e-3 / N
    xs = torch.where(small, torch.ones_like(x), x)
    series = N - (N * (N * N - 1.0) / 6.0) * (x * x)
    return torch.where(small, series, torch.sin(N * xs) / torch.sin(xs))


def _sincg_values(dh: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """:func:`sincg_reduced` for values alone: the plain quotient sin(N·x)/sin(x) of x = πΔh + t, t = √(smallest
    normal number) of the dtype (2⁻⁵¹¹ in float64, 2⁻⁶³ in float32), a power of two that changes only arguments
    whose quotient is N to the last bit anyway, and turns x = 0 into one where sin(N·t)/sin(t) = N·t/t = N exactly:
    no guard at Δh = 0.  Five passes over the samples instead of ten, three in place; within |N·x| < 1e-3 it and
    the series of :func:`_sincg_sines` agree to ≈ 1e-14 of N.  Its gradient at Δh = 0 is not the derivative, so
    only code that records no derivatives takes it (``values_only``)."""
    x = torch.add(dh.new_tensor(math.sqrt(torch.finfo(dh.dtype).tiny)), dh, alpha=math.pi)
    return (x * N).sin_().div_(x.sin_())


def sincg_reduced(dh: torch.Tensor, N: torch.Tensor, values_only: bool = False) -> torch.Tensor:
    """sin(NπΔh)/sin(πΔh) for reduced ``dh`` = Δh ∈ [−½, ½] (any shape; ``N`` broadcastable, continuous ≥ 0), N at
    Δh = 0, with a finite gradient everywhere (unless ``values_only``).

    Three forms, equal to ≈ 1e-14 of the peak N: compiled kernels (traced by ``torch.compile`` or ``torch.export``)
    take the polynomials of :func:`_sincg_parts`, which fuse into the sample loop without a transcendental call
    (case B's compiled tile ran 2.1–2.3× faster than with six sines per sample); eager code takes the quotient of
    sines, two calls instead of ≈ 20 elementwise passes over the sample tensors (the polynomials ran 2.5–4× slower
    there), guarded for derivatives at 0 (:func:`_sincg_sines`), or plain where nothing differentiates
    (``values_only``: :func:`_sincg_values`, eager case B ≈ 15 % faster)."""
    if torch.compiler.is_compiling():
        return _sincg_polynomial(dh, N)
    return _sincg_values(dh, N) if values_only else _sincg_sines(dh, N)


def sincg(x: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """sin(N·x)/sin(x) for reduced ``x`` = π·Δh ∈ [−π/2, π/2]; N at x = 0 (finite value and gradient everywhere):
    :func:`sincg_reduced` of x/π.  ``x``: any shape, ``N``: broadcastable."""
    return sincg_reduced(x / math.pi, N)


def _sincg_polynomial_and_derivatives(dh: torch.Tensor, N: torch.Tensor):
    """(f, ∂f/∂Δh, ∂f/∂N) from the pieces of :func:`_sincg_parts`: ∂q/∂Δh = m/Δh², ∂q/∂N = 1,
    s'(t) = 2π²t·P'(π²t²) — polynomials again, no branch."""
    m, r, sign, q, hs = _sincg_parts(dh, N)
    a, da = _sinc_pi_polynomial(r * r, slope=True)
    b, db = _sinc_pi_polynomial(dh * dh, slope=True)
    two_pi2 = 2.0 * math.pi**2
    sa = sign * a
    f = q * sa / b
    s_r = sign * two_pi2 * r * da  # (−1)^m·s'(r)
    dfdh = ((m / (hs * hs)) * sa + q * N * s_r - f * (two_pi2 * dh * db)) / b
    dfdN = (sa + q * dh * s_r) / b
    return f, dfdh, dfdN


def _sincg_sines_and_derivatives(dh: torch.Tensor, N: torch.Tensor):
    """(f, ∂f/∂Δh, ∂f/∂N) from the sines (the series within |N·x| < 1e-3, x = πΔh): sin(N·x) and cos(N·x) from one
    tangent t = tan(N·x/2) — sin = 2t/(1+t²), cos = (1−t²)/(1+t²) — and cos x = √(1 − sin²x) on this interval, two
    transcendental calls per element."""
    x = math.pi * dh
    small = torch.abs(x) < 1e-3 / N
    xs = torch.where(small, torch.ones_like(x), x)
    s1 = torch.sin(xs)
    c1 = torch.sqrt(1.0 - s1 * s1)
    t = torch.tan(0.5 * N * xs)
    den = 1.0 + t * t
    sN, cN = 2.0 * t / den, (1.0 - t * t) / den
    f_direct = sN / s1
    NN1 = N * (N * N - 1.0)
    f = torch.where(small, N - NN1 / 6.0 * (x * x), f_direct)
    dfdx = torch.where(small, -NN1 / 3.0 * x, (N * cN - f_direct * c1) / s1)
    dfdN = torch.where(small, 1.0 - (3.0 * N * N - 1.0) / 6.0 * (x * x), xs * cN / s1)
    return f, math.pi * dfdx, dfdN


def sincg_reduced_and_derivatives(dh: torch.Tensor, N: torch.Tensor):
    """(f, ∂f/∂Δh, ∂f/∂N) of f = :func:`sincg_reduced` (Δh, N) at every element (any one shape), in closed form:
    polynomials in compiled kernels, sines in eager code (as :func:`sincg_reduced`)."""
    if torch.compiler.is_compiling():
        return _sincg_polynomial_and_derivatives(dh, N)
    return _sincg_sines_and_derivatives(dh, N)


def sinc3_of_square(u: torch.Tensor) -> torch.Tensor:
    """sinc3(x) = 3(sin x − x cos x)/x³ as a function of u = x² ≥ 0 (series below x = 0.5; gradient-safe at 0)."""
    small = u < 0.25
    us = torch.where(small, torch.ones_like(u), u)
    x = torch.sqrt(us)
    direct = 3.0 * (torch.sin(x) - x * torch.cos(x)) / (us * x)
    series = 1.0 - u / 10.0 + u * u / 280.0 - u**3 / 15120.0 + u**4 / 1330560.0
    return torch.where(small, series, direct)


def square_components(dh: Sequence[torch.Tensor], N: torch.Tensor, values_only: bool = False) -> torch.Tensor:
    """Parallelepiped crystal: Π_i sin(N_i π Δh_i)/sin(π Δh_i) (:func:`sincg_reduced`); peak Na·Nb·Nc."""
    f = [sincg_reduced(dh[i], N[i], values_only) for i in range(3)]
    return f[0] * f[1] * f[2]


def round_components(dh: Sequence[torch.Tensor], N: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Ellipsoidal crystal: Na·Nb·Nc·0.7236·sinc3(π·sqrt(fudge·Σ(Δh_i N_i)²))."""
    r2 = (dh[0] * N[0]) ** 2 + (dh[1] * N[1]) ** 2 + (dh[2] * N[2]) ** 2
    return N.prod(-1) * ROUND_XTAL_NORM * sinc3_of_square((math.pi**2 * fudge) * r2)


def reciprocal_radius2_components(dh: Sequence[torch.Tensor], B: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """nanoBragg's ρ² = |Δh·a* + Δk·b* + Δl·c*|²·(Na·Nb·Nc)² (Å⁻², with B = [a* b* c*] in Å⁻¹), spec Q17."""
    dq = [B[j, 0] * dh[0] + B[j, 1] * dh[1] + B[j, 2] * dh[2] for j in range(3)]
    return (dq[0] * dq[0] + dq[1] * dq[1] + dq[2] * dq[2]) * N.prod(-1) ** 2


def gauss_components(dh: Sequence[torch.Tensor], N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0):
    """Gaussian spots: Na·Nb·Nc·exp(−ρ²·fudge/0.63) with ρ² from :func:`reciprocal_radius2_components`."""
    return N.prod(-1) * torch.exp(-reciprocal_radius2_components(dh, B, N) * (fudge / GAUSS_RHO2_SCALE))


def tophat_components(dh: Sequence[torch.Tensor], N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0):
    """Flat-top spots: Na·Nb·Nc where ρ²·fudge < 0.3969, else 0 (piecewise constant: zero gradient in Δh)."""
    inside = reciprocal_radius2_components(dh, B, N) * fudge < TOPHAT_RHO2_LIMIT
    NNN = N.prod(-1)
    return torch.where(inside, NNN, torch.zeros_like(NNN))


def lattice_factor_components(shape: str, dh: Sequence[torch.Tensor], N: torch.Tensor, B: torch.Tensor,
                              fudge: float = 1.0, values_only: bool = False) -> torch.Tensor:
    """F_latt of the (static) ``shape`` ('square', 'round', 'gauss' or 'tophat') from the components of Δh (three
    tensors of one shape), ``N`` [3] and ``B`` [3,3] (columns a*, b*, c*, Å⁻¹; gauss and tophat only).
    ``values_only``: nothing will differentiate the result (a faster form of 'square', see :func:`sincg_reduced`)."""
    if shape == "square":
        return square_components(dh, N, values_only)
    if shape == "round":
        return round_components(dh, N, fudge)
    if shape == "gauss":
        return gauss_components(dh, N, B, fudge)
    if shape == "tophat":
        return tophat_components(dh, N, B, fudge)
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")


def lattice_factor(shape: str, dh: torch.Tensor, N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0):
    """:func:`lattice_factor_components` with Δh stacked: ``dh`` [..., 3] → [...]."""
    return lattice_factor_components(shape, dh.unbind(-1), N, B, fudge)


def square(dh: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """Parallelepiped crystal for stacked ``dh`` [..., 3] (see :func:`square_components`)."""
    return square_components(dh.unbind(-1), N)


def round_(dh: torch.Tensor, N: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Ellipsoidal crystal for stacked ``dh`` [..., 3] (see :func:`round_components`)."""
    return round_components(dh.unbind(-1), N, fudge)


def gauss(dh: torch.Tensor, N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Gaussian spots for stacked ``dh`` [..., 3] (see :func:`gauss_components`)."""
    return gauss_components(dh.unbind(-1), N, B, fudge)


def tophat(dh: torch.Tensor, N: torch.Tensor, B: torch.Tensor, fudge: float = 1.0) -> torch.Tensor:
    """Flat-top spots for stacked ``dh`` [..., 3] (see :func:`tophat_components`)."""
    return tophat_components(dh.unbind(-1), N, B, fudge)
