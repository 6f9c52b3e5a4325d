"""Rotation matrices, shape ``(..., 3, 3)``, acting on column vectors (v' = R·v).

Angles are in **radians** here (these are kernels); the API layers convert from degrees with :mod:`nbtorch.units`.
All functions broadcast over leading dimensions and are differentiable everywhere.
"""
from __future__ import annotations

import torch


def rot_x(t: torch.Tensor) -> torch.Tensor:
    """Right-handed active rotation about +x by ``t`` (rad), shape ``t.shape + (3, 3)``."""
    c, s = torch.cos(t), torch.sin(t)
    o, z = torch.ones_like(t), torch.zeros_like(t)
    return torch.stack([o, z, z, z, c, -s, z, s, c], dim=-1).reshape(t.shape + (3, 3))


def rot_y(t: torch.Tensor) -> torch.Tensor:
    """Right-handed active rotation about +y by ``t`` (rad), shape ``t.shape + (3, 3)``."""
    c, s = torch.cos(t), torch.sin(t)
    o, z = torch.ones_like(t), torch.zeros_like(t)
    return torch.stack([c, z, s, z, o, z, -s, z, c], dim=-1).reshape(t.shape + (3, 3))


def rot_z(t: torch.Tensor) -> torch.Tensor:
    """Right-handed active rotation about +z by ``t`` (rad), shape ``t.shape + (3, 3)``."""
    c, s = torch.cos(t), torch.sin(t)
    o, z = torch.ones_like(t), torch.zeros_like(t)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(t.shape + (3, 3))


def rot_xyz(angles: torch.Tensor) -> torch.Tensor:
    """nanoBragg's XYZ rotation: apply Rx first, then Ry, then Rz, i.e. ``Rz·Ry·Rx``.

    ``angles``: ``(..., 3)`` radians (rx, ry, rz) → ``(..., 3, 3)``.  Used for ``-misset`` and
    ``-detector_rotx/y/z``.
    """
    return rot_z(angles[..., 2]) @ rot_y(angles[..., 1]) @ rot_x(angles[..., 0])


def xyz_angles(R: torch.Tensor) -> torch.Tensor:
    """XYZ decomposition (radians) of a rotation ``R`` [..., 3, 3] with ``R = Rz(rz)·Ry(ry)·Rx(rx)`` → [..., 3].

    Inverse of :func:`rot_xyz` for |ry| < 90°; differentiable there (at ry = ±90°, gimbal lock, the decomposition is
    not unique: see :func:`nbtorch.mosaic.matrix_to_xyz_angles` for a convention that handles it).
    """
    ry = torch.atan2(-R[..., 2, 0], torch.sqrt(R[..., 0, 0] ** 2 + R[..., 1, 0] ** 2))
    rx = torch.atan2(R[..., 2, 1], R[..., 2, 2])
    rz = torch.atan2(R[..., 1, 0], R[..., 0, 0])
    return torch.stack([rx, ry, rz], -1)


def rot_axis(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation by ``angle`` (rad, shape ``(...)``) about the unit ``axis`` (``(..., 3)``).

    Returns ``(..., 3, 3)`` with v' = v cos t + (u×v) sin t + u (u·v)(1 − cos t).  ``axis`` must be a unit vector.
    """
    axis, angle = torch.broadcast_tensors(axis, angle.unsqueeze(-1))
    angle = angle[..., 0]
    ux, uy, uz = axis.unbind(-1)
    c, s = torch.cos(angle), torch.sin(angle)
    C = 1.0 - c
    return torch.stack(
        [
            c + ux * ux * C, ux * uy * C - uz * s, ux * uz * C + uy * s,
            uy * ux * C + uz * s, c + uy * uy * C, uy * uz * C - ux * s,
            uz * ux * C - uy * s, uz * uy * C + ux * s, c + uz * uz * C,
        ],
        dim=-1,
    ).reshape(angle.shape + (3, 3))


def unit(v: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``v / |v|`` along the last axis (shape preserved)."""
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(eps) if eps else v / torch.linalg.vector_norm(
        v, dim=-1, keepdim=True
    )
