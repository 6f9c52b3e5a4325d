"""Where the Bragg spots of a still fall: a geometric spot predictor in the frames and units of
:func:`nbtorch.simulate`.

For Miller indices h the reciprocal-lattice vector in the lab frame is r = B·h, B the dual of the real-space basis
the pixel sum uses (:func:`nbtorch.simulate.crystal_orientations` without mosaic spread: misset, orientation and the
spindle rotation by the image's first phi, φ0 = ``Setup.phi0``; the rotation over the image's φ range is not
followed).  With s0 = beam/λ the incident wave-vector (``Setup.beam``, the unit propagation direction; λ =
``Beam.wavelength`` + ``Beam.spectrum_shift``, a spectrum's mean), the diffracted beam is s1 = (s0 + r) rescaled to
|s0|: the point of the Ewald sphere nearest r, where a still's spot of a small crystal peaks (DIALS's stills
convention).  The ray from the sample along s1 meets a panel (nanoBragg's one panel, or every panel of
``Setup.panels``) at continuous pixel coordinates (fast, slow) counted from the outer corner of pixel (0, 0): pixel i
spans [i, i + 1), its centre is i + ½ (DIALS's ``xyzcal.px``; ``x_mm``/``y_mm`` are those times the panel's pixel
size, DIALS's ``xyzcal.mm`` without a parallax correction: the ray meets the sensor's front face).  A detector with
``curved_det`` is not handled.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .detector import panel_frames
from .lattice import lattice
from .rotation import rot_axis
from .simulate import crystal_rotation
from .types import Params, Setup
from .units import deg2rad

__all__ = ["Spots", "predict_spots", "reciprocal_basis", "diffracted_beams"]

#: A ray whose direction makes |s1·n| below this (relative) with a panel's normal runs along that panel: no hit.
PARALLEL = 1e-12


class Spots(NamedTuple):
    """Predicted spots of n reflections.  ``panel`` [n] long (−1 where the ray misses every panel); ``fast_px``,
    ``slow_px`` [n] pixel coordinates on that panel (pixel i spans [i, i + 1)); ``x_mm``, ``y_mm`` [n] the same in
    mm (pixels × the panel's pixel size); ``s1`` [n, 3] the diffracted wave-vector in the lab frame (Å⁻¹, |s1| =
    1/λ); ``valid`` [n] bool: h ≠ 0 and the ray lands on a panel (or, with a given panel, meets its plane in front of
    the sample).  Coordinates of invalid rows are 0."""

    panel: torch.Tensor
    fast_px: torch.Tensor
    slow_px: torch.Tensor
    x_mm: torch.Tensor
    y_mm: torch.Tensor
    s1: torch.Tensor
    valid: torch.Tensor


def reciprocal_basis(params: Params, setup: Setup) -> torch.Tensor:
    """The crystal's reciprocal basis in the lab frame at φ0, ``[3, 3]`` (columns a*, b*, c*; Å⁻¹): the exact dual
    of the real-space vectors :func:`nbtorch.simulate.crystal_orientations` gives the kernel (its h = Mᵀ·q inverted,
    so q = B·h holds for nanoBragg's sheared triclinic ``-cell`` too), without mosaic spread."""
    c = params.crystal
    M0, _ = lattice(c.cell, crystal_rotation(c), nanobragg=setup.nanobragg_cell)
    like = c.cell
    spindle = torch.tensor(setup.spindle, dtype=like.dtype, device=like.device)
    M = rot_axis(spindle, deg2rad(torch.as_tensor(setup.phi0, dtype=like.dtype, device=like.device))) @ M0
    return torch.linalg.inv(M).transpose(-1, -2)


def diffracted_beams(params: Params, setup: Setup, hkl: torch.Tensor) -> torch.Tensor:
    """s1 [n, 3] (Å⁻¹) of Miller indices ``hkl`` [n, 3]: (s0 + B·h) rescaled to |s0| = 1/λ (module docstring)."""
    B = reciprocal_basis(params, setup)
    lam = params.beam.wavelength + params.beam.spectrum_shift
    s0 = torch.tensor(setup.beam, dtype=B.dtype, device=B.device)
    s0 = s0 / torch.linalg.vector_norm(s0) / lam
    v = s0 + hkl.to(B.dtype) @ B.transpose(-1, -2)
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-300) * torch.linalg.vector_norm(s0)


def _hits(s1: torch.Tensor, pix0: torch.Tensor, fstep: torch.Tensor, sstep: torch.Tensor):
    """Where rays from the origin along ``s1`` meet the planes of panels (``pix0`` corner, ``fstep``/``sstep`` lab
    steps of one pixel, mm): all [..., 3], broadcast together → (u, v, t) [...]: pixel coordinates along the steps
    and the ray parameter (t > 0: in front of the sample; t = 0 where the ray runs along the plane)."""
    n = torch.linalg.cross(fstep, sstep)
    sn, pn = (s1 * n).sum(-1), (pix0 * n).sum(-1)
    ok = sn.abs() > PARALLEL * torch.linalg.vector_norm(n, dim=-1) * torch.linalg.vector_norm(s1, dim=-1)
    t = torch.where(ok, pn / torch.where(ok, sn, torch.ones_like(sn)), torch.zeros_like(sn))
    x = t[..., None] * s1 - pix0
    fd, sd = torch.linalg.cross(sstep, n), torch.linalg.cross(n, fstep)  # the steps' dual axes in the plane
    return (x * fd).sum(-1) / (fstep * fd).sum(-1), (x * sd).sum(-1) / (sstep * sd).sum(-1), t


def _panel_sizes(setup: Setup, like: torch.Tensor):
    """(fast, slow) pixel counts of every panel, each [P] (nanoBragg's one panel: the set-up's)."""
    if setup.panels is None:
        counts = [(setup.fpixels, setup.spixels)]
    else:
        counts = [(p.fpixels, p.spixels) for p in setup.panels.panels]
    out = torch.tensor(counts, dtype=like.dtype, device=like.device)
    return out[:, 0], out[:, 1]


def predict_spots(params: Params, setup: Setup, hkl, panel=None) -> Spots:
    """Predict the spots of Miller indices ``hkl`` ([n, 3] ints: a tensor, numpy array or nested lists) for the
    model ``(params, setup)`` (module docstring: φ0, the stills convention, pixel coordinates) → :class:`Spots`.

    Without ``panel`` the ray lands on the panel it meets inside its pixel range (the nearest such panel along the
    ray when panels overlap); −1 where it meets none.  With ``panel`` ([n] ints, or one int) each ray is
    intersected with that panel's plane — the coordinates may then lie outside the panel, as DIALS predicts a
    reflection on the panel its table names.  Pure torch in the parameters' dtype and device (differentiable with
    respect to them); ``ValueError`` for a curved detector, a ``hkl`` not of shape [n, 3] or a panel out of range.
    """
    like = params.crystal.cell
    if setup.curved_det:
        raise ValueError("predict_spots: a curved detector (-curved_det) is not handled; spots are predicted on flat "
                         "panels")
    h = torch.as_tensor(hkl, device=like.device)
    if h.dim() != 2 or h.shape[1] != 3:
        raise ValueError(f"predict_spots: hkl must have shape [n, 3]; got {tuple(h.shape)}")
    s1 = diffracted_beams(params, setup, h)
    fr = panel_frames(params.detector, setup)
    fstep, sstep = fr.fdet * setup.pixel_size, fr.sdet * setup.pixel_size
    nf, ns = _panel_sizes(setup, like)
    nonzero = (h != 0).any(-1)
    if panel is None:
        u, v, t = _hits(s1[:, None], fr.pix0[None], fstep[None], sstep[None])  # [n, P]
        inside = (t > 0) & (u >= 0) & (u < nf) & (v >= 0) & (v < ns)
        best = torch.where(inside, t, torch.full_like(t, float("inf"))).argmin(-1)
        valid = inside.any(-1) & nonzero
        pick = best[:, None]
        u, v = u.gather(1, pick)[:, 0], v.gather(1, pick)[:, 0]
        chosen = torch.where(valid, best, torch.full_like(best, -1))
    else:
        chosen = torch.as_tensor(panel, device=like.device).long().reshape(-1).expand(h.shape[0])
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= setup.n_panels):
            raise ValueError(f"predict_spots: panel must be within [0, {setup.n_panels - 1}]; got "
                             f"{int(chosen.min())}..{int(chosen.max())}")
        u, v, t = _hits(s1, fr.pix0[chosen], fstep[chosen], sstep[chosen])
        valid = (t > 0) & nonzero
    zero = torch.zeros_like(u)
    u, v = torch.where(valid, u, zero), torch.where(valid, v, zero)
    k = chosen.clamp_min(0)
    x_mm = u * torch.linalg.vector_norm(fstep, dim=-1)[k]
    y_mm = v * torch.linalg.vector_norm(sstep, dim=-1)[k]
    return Spots(chosen, u, v, x_mm, y_mm, s1, valid)
