"""Mosaic-domain orientations and ``-misset random`` angles, bit-compatible with nanoBragg (spec §1.1, §1.3, §6).

nanoBragg draws every mosaic domain from one :class:`~nbtorch.rng.Ran1` stream started at ``-mosaic_seed``:

    r1, r2, r3 = 2·ran1 − 1   (double)
    u = (√(1−r2²)·sin(π r1), √(1−r2²)·cos(π r1), r2)        unit rotation axis
    θ = float32(spread_f32 · powf(1 − r3², 1/3))             rotation angle (rad), 0 ≤ θ ≤ spread
    U = AX(u, θ) = I cos θ + sin θ [u]× + (1 − cos θ) u uᵀ,   v' = U·v

Domain 0 draws its three numbers like every other domain but is then replaced by the identity.  The spread is the
radius of the cap of rotation angles (not an rms); the angle distribution is ∝ (1 − r3²)^{1/3}.

Seeds: the functions here take the **user's** seed value n (as typed after ``-mosaic_seed`` / ``-misset_seed``);
nanoBragg stores −n and so do we internally (``Ran1(-n)``).  nanoBragg's default mosaic seed is −12345678 internally,
i.e. user value :data:`DEFAULT_MOSAIC_SEED` = 12345678 (its help text claims 1234567, which is wrong).

This module is numpy-only: the random draws are outside the differentiable path.  A differentiable caller builds
the rotations from :func:`mosaic_domains` as AX(axes[m], spread·fractions[m]) with ``spread`` a tensor.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from nbtorch.rng import Ran1, f32
from nbtorch.rotation import rot_axis, xyz_angles

__all__ = [
    "DEFAULT_MOSAIC_SEED",
    "mosaic_domain_count",
    "mosaic_domains",
    "mosaic_matrices",
    "rodrigues_matrix",
    "xyz_rotation_matrix",
    "matrix_to_xyz_angles",
    "random_misset_matrix",
    "random_misset_angles",
]

#: nanoBragg's default ``-mosaic_seed`` as a user value (stored internally as −12345678).
DEFAULT_MOSAIC_SEED = 12345678

_THIRD_F32 = f32(1.0 / 3.0)


def _powf(x: float, y: float) -> float:
    """C ``powf`` for float32 arguments (computed in double, rounded once to float32)."""
    x, y = f32(x), f32(y)
    if x < 0.0:  # powf of a negative base with a non-integer exponent is NaN
        return math.nan
    return f32(x ** y)


def _draw(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` domains from ``Ran1(-seed)``: unit axes ``[count, 3]`` and float32 powf fractions ``[count]``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = Ran1(-int(seed))
    axes = np.empty((count, 3), dtype=np.float64)
    fracs = np.empty(count, dtype=np.float64)
    for m in range(count):
        r1 = 2.0 * rng.uniform() - 1.0
        r2 = 2.0 * rng.uniform() - 1.0
        r3 = 2.0 * rng.uniform() - 1.0
        xyrad = math.sqrt(1.0 - r2 * r2)
        axes[m] = (xyrad * math.sin(math.pi * r1), xyrad * math.cos(math.pi * r1), r2)
        fracs[m] = _powf(1.0 - r3 * r3, _THIRD_F32)
    return axes, fracs


def mosaic_domain_count(spread_rad: float, count: int | None) -> tuple[float, int]:
    """nanoBragg's automatic mosaic settings (§1.3): returns the effective ``(spread_rad, count)``.

    ``spread_rad`` > 0 with no count (``None``) → 10 domains; spread ≤ 0 (with or without a count) → 1 domain,
    spread 0; a count < 1 is raised to 1.
    """
    if spread_rad is None or not spread_rad > 0.0:
        return 0.0, 1
    if count is None:
        return float(spread_rad), 10
    return float(spread_rad), max(1, int(count))


def mosaic_domains(
    spread_rad: float, count: int, seed: int = DEFAULT_MOSAIC_SEED, exact_angles: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Random mosaic-domain axes and angle fractions, exactly as nanoBragg draws them.

    Parameters
    ----------
    spread_rad: mosaic spread (rad), the maximum rotation angle.  Only used when ``exact_angles`` is true.
    count: number of domains (≥ 0).  Apply :func:`mosaic_domain_count` first for nanoBragg's auto rules.
    seed: the user's ``-mosaic_seed`` value n; the stream is ``Ran1(-n)``.
    exact_angles: if false (default), ``fractions[m] = powf(1 − r3², 1/3)`` (float32 value, cast to float64), so
        ``spread_rad·fractions[m]`` matches nanoBragg's float32 angle to ~1e−7 relative.  If true, fractions are
        ``θ_C / spread_rad`` with θ_C = float32(float32(spread)·powf(…)), so that ``spread_rad·fractions[m]``
        reproduces the C angle to double rounding (fractions are then 0 when spread ≤ 0).

    Returns
    -------
    axes: ``[count, 3]`` float64 unit rotation axes (domain 0 keeps its drawn axis).
    fractions: ``[count]`` float64 in [0, 1]; ``fractions[0] = 0`` (domain 0 is the identity).
    Domain m's rotation is AX(axes[m], spread_rad·fractions[m]) (see :func:`rodrigues_matrix`).
    """
    axes, fracs = _draw(int(count), seed)
    if exact_angles:
        s = f32(spread_rad)
        if spread_rad > 0.0:
            fracs = np.array([f32(s * f) / spread_rad for f in fracs], dtype=np.float64)
        else:
            fracs = np.zeros_like(fracs)
    if count > 0:
        fracs[0] = 0.0
    return axes, fracs


def rodrigues_matrix(axis: np.ndarray, angle: np.ndarray | float) -> np.ndarray:
    """Right-handed rotation matrices AX(u, θ) = I cos θ + sin θ [u]× + (1 − cos θ) u uᵀ (v' = U·v).

    ``axis``: ``[..., 3]`` unit vectors; ``angle``: ``[...]`` radians (broadcast).  Returns ``[..., 3, 3]`` float64.
    """
    u = torch.as_tensor(np.asarray(axis, dtype=np.float64))
    t = torch.as_tensor(np.asarray(angle, dtype=np.float64))
    return rot_axis(u, t).numpy()


def _umats(spread_rad: float, count: int, seed: int) -> np.ndarray:
    """Rotation matrices with nanoBragg's float32 angle θ = float32(float32(spread)·powf(…)) (no identity fix-up)."""
    axes, fracs = _draw(int(count), seed)
    s = f32(spread_rad)
    theta = np.array([f32(s * f) for f in fracs], dtype=np.float64)
    return rodrigues_matrix(axes, theta)


def mosaic_matrices(spread_rad: float, count: int, seed: int = DEFAULT_MOSAIC_SEED) -> np.ndarray:
    """nanoBragg's mosaic rotation matrices ``[count, 3, 3]`` float64 (row-major, v' = U·v).

    ``spread_rad``: mosaic spread (rad, rounded to float32 as in C); ``count``: number of domains; ``seed``: the
    user's ``-mosaic_seed`` value n (stream ``Ran1(-n)``).  Matrix 0 is exactly the identity.
    """
    u = _umats(spread_rad, count, seed)
    if count > 0:
        u[0] = np.eye(3)
    return u


def xyz_rotation_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """nanoBragg's XYZ rotation Rz(rz)·Ry(ry)·Rx(rx) (Rx applied first), angles in radians → ``[3, 3]`` float64."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    Rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    Ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    Rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return Rz @ Ry @ Rx


def matrix_to_xyz_angles(U: np.ndarray) -> tuple[float, float, float]:
    """Decompose a rotation matrix ``[3, 3]`` into XYZ angles (rad) with Rz(rz)·Ry(ry)·Rx(rx) = U.

    Returns ``(rx, ry, rz)`` with ry ∈ [−π/2, π/2] and rx, rz ∈ (−π, π].  In gimbal lock (|cos ry| ≈ 0) rz is set to 0.
    """
    U = np.asarray(U, dtype=np.float64)
    cy = math.hypot(U[0, 0], U[1, 0])
    ry = math.atan2(-U[2, 0], cy)
    if cy > 1e-12:
        rx, ry, rz = (float(a) for a in xyz_angles(torch.as_tensor(U)))
    elif U[2, 0] < 0.0:  # ry = +π/2: U[0,1] = sin(rx − rz), U[1,1] = cos(rx − rz)
        rz = 0.0
        rx = math.atan2(U[0, 1], U[1, 1])
    else:  # ry = −π/2: U[0,1] = −sin(rx + rz), U[1,1] = cos(rx + rz)
        rz = 0.0
        rx = math.atan2(-U[0, 1], U[1, 1])
    return rx, ry, rz


def random_misset_matrix(seed: int) -> np.ndarray:
    """The random orientation matrix ``[3, 3]`` used by ``-misset random`` (§1.1).

    nanoBragg calls its mosaic generator once with spread 90 — passed as **radians** (sic) — on the stream
    ``Ran1(-seed)``; the matrix is AX(u, θ) with θ = float32(90·powf(1 − r3², 1/3)) (no identity replacement).
    ``seed``: the user's ``-misset_seed`` value n (nanoBragg stores −n).
    """
    return _umats(90.0, 1, seed)[0]


def random_misset_angles(seed: int) -> tuple[float, float, float]:
    """``-misset random``: XYZ misset angles (rx, ry, rz) in radians with Rz·Ry·Rx = :func:`random_misset_matrix`.

    ``seed``: the user's ``-misset_seed`` value n (stream ``Ran1(-n)``).  Apply the angles like ``-misset``
    (rotate a*, b*, c* by Rz·Ry·Rx).  Note: nanoBragg's own ``-misset_seed`` flag is unusable (Q13) and its default
    misset seed is time-based, so no nanoBragg run pins these values; only the construction is reproduced.
    """
    return matrix_to_xyz_angles(random_misset_matrix(seed))
