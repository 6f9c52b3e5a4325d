"""Unit cell (Å, degrees) → real and reciprocal basis vectors; MOSFLM A-matrix in.

Matrices hold basis vectors in their **columns**: ``B = [a* b* c*]`` (Å⁻¹) and ``M = [a b c]`` (Å), so that a
reciprocal-lattice point is ``q = B·h`` and Miller indices are ``h = Mᵀ·q``.  Everything broadcasts over leading
dimensions ``(...)`` and is differentiable.
"""
from __future__ import annotations

import torch

from .units import deg2rad, rad2deg


def _trig(cell: torch.Tensor):
    a, b, c = cell[..., 0], cell[..., 1], cell[..., 2]
    al, be, ga = deg2rad(cell[..., 3]), deg2rad(cell[..., 4]), deg2rad(cell[..., 5])
    return a, b, c, torch.cos(al), torch.cos(be), torch.cos(ga), torch.sin(al), torch.sin(be), torch.sin(ga)


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """Unit-cell volume (Å³) of ``cell`` ``(..., 6)`` (a, b, c in Å; α, β, γ in degrees) → ``(...)``."""
    a, b, c, ca, cb, cg, *_ = _trig(cell)
    return a * b * c * torch.sqrt(1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg)


def reciprocal_matrix(cell: torch.Tensor, nanobragg: bool = False) -> torch.Tensor:
    """Reciprocal basis ``B = [a* b* c*]`` (Å⁻¹, columns) in the frame with a* ∥ x and b* in the xy plane.

    ``cell``: ``(..., 6)`` (Å, degrees) → ``(..., 3, 3)``.

    ``nanobragg=True`` reproduces nanoBragg's construction, whose z component of c* is ``c*·V/(abc·sin γ*)`` instead
    of the exact ``1/c``.  The two agree for cells with α = β = γ = 90° (or whenever V = abc·sinα·sinβ·sinγ); for
    general triclinic cells nanoBragg's lattice is slightly sheared (see docs/nanobragg-differences.md).  With
    ``nanobragg=True`` use :func:`nanobragg_lattice` to get the matching real-space vectors.
    """
    a, b, c, ca, cb, cg, sa, sb, sg = _trig(cell)
    V = cell_volume(cell)
    a_s, b_s, c_s = b * c * sa / V, c * a * sb / V, a * b * sg / V
    cos_al_s = (cb * cg - ca) / (sb * sg)
    cos_be_s = (cg * ca - cb) / (sg * sa)
    cos_ga_s = (ca * cb - cg) / (sa * sb)
    sin_ga_s = V / (a * b * c * sa * sb)
    cz = c_s * V / (a * b * c * sin_ga_s) if nanobragg else 1.0 / c
    z = torch.zeros_like(a)
    cols = [
        torch.stack([a_s, z, z], -1),
        torch.stack([b_s * cos_ga_s, b_s * sin_ga_s, z], -1),
        torch.stack([c_s * cos_be_s, c_s * (cos_al_s - cos_be_s * cos_ga_s) / sin_ga_s, cz], -1),
    ]
    return torch.stack(cols, -1)


def real_from_reciprocal(B: torch.Tensor) -> torch.Tensor:
    """Exact dual basis: ``M = [a b c] = (B⁻¹)ᵀ`` (Å, columns) from ``B = [a* b* c*]`` (Å⁻¹).  ``(...,3,3)``."""
    return torch.linalg.inv(B).transpose(-1, -2)


def nanobragg_lattice(cell: torch.Tensor, R: torch.Tensor):
    """nanoBragg's ``-cell`` lattice after orientation ``R`` (``(...,3,3)``) → ``(M, B)``, both ``(..., 3, 3)``.

    Follows the C program's steps: reciprocal vectors from :func:`reciprocal_matrix` (``nanobragg=True``) rotated by
    ``R``; real vectors along b*×c*, c*×a*, a*×b* rescaled to the exact lengths a, b, c; reciprocal vectors
    regenerated as (b×c)/V, (c×a)/V, (a×b)/V with V the volume of the nominal cell.  For cells with all angles 90° this
    equals the exact construction.
    """
    Bq = R @ reciprocal_matrix(cell, nanobragg=True)
    ast, bst, cst = Bq[..., :, 0], Bq[..., :, 1], Bq[..., :, 2]
    lengths = cell[..., :3]
    raw = [torch.linalg.cross(bst, cst), torch.linalg.cross(cst, ast), torch.linalg.cross(ast, bst)]
    real = [v / torch.linalg.vector_norm(v, dim=-1, keepdim=True) * lengths[..., i, None] for i, v in enumerate(raw)]
    V = cell_volume(cell)[..., None]
    recip = [
        torch.linalg.cross(real[1], real[2]) / V,
        torch.linalg.cross(real[2], real[0]) / V,
        torch.linalg.cross(real[0], real[1]) / V,
    ]
    return torch.stack(real, -1), torch.stack(recip, -1)


def lattice(cell: torch.Tensor, R: torch.Tensor, nanobragg: bool = False):
    """Oriented real and reciprocal bases ``(M, B)`` (columns; Å and Å⁻¹) of ``cell`` ``(...,6)`` rotated by ``R``.

    ``nanobragg=False``: exact, ``B = R·B0(cell)`` and ``M = (B⁻¹)ᵀ``.  ``nanobragg=True``: :func:`nanobragg_lattice`.
    """
    if nanobragg:
        return nanobragg_lattice(cell, R)
    B = R @ reciprocal_matrix(cell)
    return real_from_reciprocal(B), B


def cell_from_reciprocal(B: torch.Tensor) -> torch.Tensor:
    """Cell ``(..., 6)`` (Å, degrees) of the lattice whose reciprocal basis has columns ``B`` (Å⁻¹)."""
    M = real_from_reciprocal(B)
    return cell_from_real(M)


def cell_from_real(M: torch.Tensor) -> torch.Tensor:
    """Cell ``(..., 6)`` (Å, degrees) from real-space basis columns ``M = [a b c]`` (Å)."""
    a, b, c = M[..., :, 0], M[..., :, 1], M[..., :, 2]
    la, lb, lc = (torch.linalg.vector_norm(v, dim=-1) for v in (a, b, c))

    def ang(u, v, lu, lv):
        return rad2deg(torch.acos(((u * v).sum(-1) / (lu * lv)).clamp(-1.0, 1.0)))

    return torch.stack([la, lb, lc, ang(b, c, lb, lc), ang(c, a, lc, la), ang(a, b, la, lb)], -1)


def orientation_from_reciprocal(B: torch.Tensor) -> torch.Tensor:
    """Rotation U with ``B = U·B0(cell(B))``, ``(..., 3, 3)``: the orientation part of an A = UB matrix (Å⁻¹)."""
    cell = cell_from_reciprocal(B)
    U = B @ torch.linalg.inv(reciprocal_matrix(cell))
    # project onto the nearest rotation (removes round-off)
    u, _, vh = torch.linalg.svd(U)
    return u @ vh


def mosflm_to_reciprocal(A_lambda: torch.Tensor, wavelength: torch.Tensor | float) -> torch.Tensor:
    """MOSFLM matrix (λ-scaled, columns a*, b*, c*, dimensionless) → reciprocal basis in Å⁻¹: ``A/λ``."""
    return A_lambda / wavelength
