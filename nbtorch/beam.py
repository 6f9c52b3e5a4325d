"""Incident beam: source directions and wavelengths (divergence grid, dispersion, source files).

The Kahn polarization factor is evaluated where the pixel sum uses it: :func:`nbtorch.kernel.polarization`.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .mosaic import rodrigues_matrix


def divergence_sources(
    beam: Sequence[float],
    polar_axis: Sequence[float],
    hdiv: Sequence[float],
    vdiv: Sequence[float],
    hdivrange: float,
    vdivrange: float,
    hdivstep: float,
    vdivstep: float,
    round_div: bool,
    dispersion_factors: Sequence[float],
) -> Tuple[Tuple[Tuple[float, float, float], float], ...]:
    """Source list for a divergence grid and a set of relative wavelengths (spec §1.4).

    ``hdiv``/``vdiv``: grid angles (rad); ranges/steps (rad) feed nanoBragg's round-divergence test (points with
    4·[(h² − hs²/4·(1 − H mod 2))/hr² + (v² − vs²/4·(1 − V mod 2))/vr²] > 1.1 are dropped, H, V = grid counts;
    a NaN from a zero range keeps the point).  Each kept point is rotated P' = AX(vert, h)·AX(E, v)·P with
    P = −beam and vert = unit(beam × E); the incident direction is −unit(P').  Returns ``((dir_xyz, λ_factor), ...)``
    in the loop order h (outer), v, λ (inner).
    """
    b = np.asarray(beam, float)
    E = np.asarray(polar_axis, float)
    vert = np.cross(b, E)
    if np.linalg.norm(vert) < 1e-12:
        if any(h != 0 for h in hdiv) or any(v != 0 for v in vdiv):
            raise ValueError("beam divergence needs a polarization axis (-polar_vector) that is not parallel to the "
                             "beam: the divergence directions are defined relative to it")
        vert = np.array([0.0, 0.0, 1.0]) if abs(b[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    vert /= np.linalg.norm(vert)
    h = np.asarray(hdiv, dtype=np.float64)[:, None]
    v = np.asarray(vdiv, dtype=np.float64)[None, :]
    keep = np.ones((h.shape[0], v.shape[1]), dtype=bool)
    if round_div:
        H, Vn = h.shape[0], v.shape[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            test = 4.0 * ((h * h - hdivstep * hdivstep / 4.0 * (1 - H % 2)) / np.float64(hdivrange * hdivrange)
                          + (v * v - vdivstep * vdivstep / 4.0 * (1 - Vn % 2)) / np.float64(vdivrange * vdivrange))
        keep = ~(test > 1.1)  # NaN compares False: kept
    q = rodrigues_matrix(E, v[0]) @ (-10.0 * b)  # [V, 3]: AX(E, v)·P
    P = np.einsum("hij,vj->hvi", rodrigues_matrix(vert, h[:, 0]), q)[keep]  # [n, 3] in (h, v) order
    d = -P / np.sqrt((P * P).sum(-1, keepdims=True))
    out: List = [(tuple(float(x) for x in di), float(lf)) for di in d for lf in dispersion_factors]
    return tuple(out)
