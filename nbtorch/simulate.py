"""simulate(params, setup) → image [slow, fast]: the nanoBragg pixel sum, tiled over pixels for bounded memory.

The computation per pixel follows spec §5: positions of every (layer, sub-pixel) sample, scattered direction d,
for each source q = (d − i)/λ, Miller indices h = Mᵀ·q for every (phi step, mosaic domain) orientation of the
real-space basis M, lattice factor and structure factor, summed as |F|²·F_latt² and scaled by
r_e²·fluence/steps·capture·polarization·Ω.  Everything is broadcasting tensor algebra with no data-dependent
Python branches, so it composes with ``torch.func`` (``vmap``, ``jacfwd``, ``jacrev``, ``grad``, ``hessian``).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from . import detector as detmod
from .beam import polarization_factor
from .lattice import lattice
from .rotation import rot_axis, rot_xyz
from .shape import lattice_factor, round_half_down
from .structure import lookup_nearest, lookup_tricubic
from .types import Params, Setup
from .units import AVOGADRO, R_E_SQUARED_M2, WATER_F, deg2rad
from .validate import check_params


class Crystal3D(NamedTuple):
    """Oriented crystal for the kernel: ``A`` [O,3,3] rows = rotated real vectors a, b, c (Å) per orientation
    (phi-major, mosaic-minor); ``B0`` [3,3] unrotated reciprocal basis (columns, Å⁻¹) used by gauss/tophat."""

    A: torch.Tensor
    B0: torch.Tensor


def crystal_rotation(crystal) -> torch.Tensor:
    """The rotation ``XYZ(misset)·orientation`` [3, 3] applied to the reciprocal basis of ``crystal`` (a
    :class:`~nbtorch.types.Crystal`; misset in degrees)."""
    return rot_xyz(deg2rad(crystal.misset)) @ crystal.orientation


def crystal_orientations(params: Params, setup: Setup) -> Crystal3D:
    """Real-space basis for every (phi step, mosaic domain) sample: ``A[o] = (U_m·R_φ·M0)ᵀ`` (rows a, b, c in Å)."""
    c = params.crystal
    M0, B0 = lattice(c.cell, crystal_rotation(c), nanobragg=setup.nanobragg_cell)
    like = c.cell
    spindle = torch.tensor(setup.spindle, dtype=like.dtype, device=like.device)
    phis = setup.phi0 + setup.phistep * torch.arange(setup.phisteps, dtype=like.dtype, device=like.device)
    Rphi = rot_axis(spindle.expand(setup.phisteps, 3), deg2rad(phis))  # [Φ,3,3]
    axes = torch.tensor(setup.mosaic_axes, dtype=like.dtype, device=like.device)  # [M,3]
    fr = torch.tensor(setup.mosaic_fractions, dtype=like.dtype, device=like.device)
    U = rot_axis(axes, deg2rad(c.mosaic_spread) * fr)  # [M,3,3]
    rot = U[None, :] @ Rphi[:, None]  # [Φ,M,3,3]
    A = (rot @ M0).transpose(-1, -2).reshape(-1, 3, 3)
    return Crystal3D(A, B0)


def _roi(setup: Setup):
    """(x0, x1, y0, y1) inclusive pixel bounds of the rendered rectangle."""
    return setup.roi if setup.roi is not None else (0, setup.fpixels - 1, 0, setup.spixels - 1)


@functools.lru_cache(maxsize=32)
def _masked_indices(setup: Setup) -> np.ndarray:
    """Row-major indices, within the ROI rectangle, of the pixels the mask keeps (computed once per Setup)."""
    x0, x1, y0, y1 = _roi(setup)
    m = np.frombuffer(setup.mask, dtype=np.uint8).reshape(setup.spixels, setup.fpixels)[y0 : y1 + 1, x0 : x1 + 1]
    return np.flatnonzero(m.reshape(-1) != 0)


def water_intensity(params: Params) -> torch.Tensor:
    """nanoBragg's water background per electron² unit: F_w²·r_e²·fluence·N_mol (N_mol molecules in a cube of
    edge ``water_size`` µm); it is scaled a second time by r_e²·fluence/steps like the Bragg sum (spec Q10)."""
    w_m = params.background.water_size * 1e-6
    n_mol = w_m**3 * 1e6 * AVOGADRO / 18.0
    return WATER_F**2 * R_E_SQUARED_M2 * params.beam.fluence * n_mol


def _tile_values(params, setup, frame, xtal, inc, lam, E, fast, slow):
    """Photons for the pixels (``fast``, ``slow`` ``[P]``) of one tile → ``[P]``."""
    dtype = frame.pix0.dtype
    T = setup.thicksteps
    pos = detmod.pixel_positions(frame, fast, slow, setup)  # [P,T,n2,3]
    R = torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
    d = pos / R
    layers = torch.arange(T, dtype=dtype, device=pos.device)
    capture = detmod.capture_fraction(d, frame, layers[None, :, None], setup)  # [P,T,n2]
    omega = detmod.solid_angle(pos, frame, setup)  # [P,T,n2]

    # scattering vectors for every source: [P,T,n2,K,3] in Å⁻¹
    q = (d[..., None, :] - inc) / lam[:, None]
    keep = None
    if setup.dmin > 0.0:
        keep = torch.linalg.vector_norm(q, dim=-1) * setup.dmin <= 1.0  # resolution 1/|q| >= dmin
    K_pol = params.beam.polarization
    if setup.nopolar:
        polar = torch.ones_like(q[:, 0, 0, 0, 0])
    elif setup.oversample_polar or keep is not None:
        polar = polarization_factor(inc, d[..., None, :], E, K_pol)  # [P,T,n2,K]
    else:
        polar = polarization_factor(inc[0], d[:, 0, 0], E, K_pol)  # [P]

    # Miller indices for every orientation: [P,T,n2,K,O,3]
    h = torch.einsum("oij,ptnkj->ptnkoi", xtal.A, q)
    h0 = round_half_down(h)
    dh = h - h0
    c = params.crystal
    F_latt = lattice_factor(setup.shape, dh, c.ncells, xtal.B0, setup.fudge)
    st = params.structure
    if setup.interpolate:
        F_cell = lookup_tricubic(h, st.F, st.default_F, setup.hkl_min)
    else:
        F_cell = lookup_nearest(h0, st.F, st.default_F, setup.hkl_min)
    x = (F_cell * F_latt) ** 2  # [P,T,n2,K,O]
    if keep is not None:
        x = torch.where(keep[..., None], x, torch.zeros_like(x))

    I_bg = water_intensity(params)
    quirk = setup.oversample_thick or setup.oversample_polar or setup.oversample_omega
    if not quirk:
        I = I_bg + x.sum((1, 2, 3, 4))
        factor = capture[:, -1, 0] * omega[:, 0, 0]
    else:
        I, factor = _running_product_sum(x, I_bg, capture, omega, polar, F_latt, keep, params, setup)
    if not setup.oversample_polar:
        if polar.dim() > 1:  # first (layer, sub-pixel, source) sample that passed the dmin test, else 0 (spec Q23)
            flat_keep = keep.reshape(keep.shape[0], -1)
            first = torch.argmax(flat_keep.to(torch.int8), dim=1)
            p_first = polar.reshape(polar.shape[0], -1).gather(1, first[:, None])[:, 0]
            polar = torch.where(flat_keep.any(1), p_first, torch.zeros_like(p_first))
        factor = factor * polar
    return R_E_SQUARED_M2 * params.beam.fluence * I / setup.steps * factor


def _running_product_sum(x, I_bg, capture, omega, polar, F_latt, keep, params, setup):
    """nanoBragg's ``-oversample_thick/_polar/_omega`` accumulation (spec Q7), in closed form.

    The C program multiplies the running sum by each sample's factors: I_n = (I_{n−1} + x_n)·c_n over the samples in
    loop order (layer, sub-pixel, source, orientation), skipping samples cut by ``-dmin`` or with F_latt = 0 (no water).
    Hence I = I_bg·Π c + Σ_n x_n·Π_{m≥n} c_m, computed with a reverse cumulative product.  Returns
    ``(I [P], factor [P])`` where ``factor`` holds the once-per-pixel factors whose flags are off.
    """
    cfac = torch.ones_like(x)
    if setup.oversample_thick:
        cfac = cfac * capture[..., None, None]
    if setup.oversample_omega:
        cfac = cfac * omega[..., None, None]
    if setup.oversample_polar and not setup.nopolar:
        cfac = cfac * polar[..., None]
    skip = (F_latt == 0) & (params.background.water_size == 0)
    if keep is not None:
        skip = skip | ~keep[..., None]
    cfac = torch.where(skip, torch.ones_like(cfac), cfac).reshape(x.shape[0], -1)
    suffix = torch.flip(torch.cumprod(torch.flip(cfac, [1]), 1), [1])
    I = I_bg * suffix[:, 0] + (x.reshape(x.shape[0], -1) * suffix).sum(1)
    factor = torch.ones_like(I)
    if not setup.oversample_thick:
        factor = factor * capture[:, -1, 0]
    if not setup.oversample_omega:
        factor = factor * omega[:, 0, 0]
    return I, factor


def simulate(params: Params, setup: Setup, check: bool = True) -> torch.Tensor:
    """Simulate a diffraction image.

    ``params``: :class:`~nbtorch.types.Params` pytree (all leaves the same dtype/device);
    ``setup``: :class:`~nbtorch.types.Setup`.  Returns photons per pixel, ``[spixels, fpixels]`` (slow, fast), the
    quantity nanoBragg writes with ``-floatfile``; pixels outside the ROI or masked are 0.

    Pure function of its arguments; works under ``torch.func`` transforms.  With ``check=True`` parameter values are
    validated (a ``ValueError`` names the bad field) whenever they are concrete tensors; inside ``vmap``/``jacfwd``
    only shapes are checked.  Memory is bounded by ``setup.sample_budget`` (pixel tiles).
    """
    if check:
        check_params(params, setup)
    like = params.crystal.cell
    dev = like.device
    frame = detmod.detector_frame(params.detector, setup)
    xtal = crystal_orientations(params, setup)
    inc = torch.tensor([s[0] for s in setup.sources], dtype=like.dtype, device=dev)  # [K,3]
    lam = params.beam.wavelength * torch.tensor([s[1] for s in setup.sources], dtype=like.dtype, device=dev)
    E = torch.tensor(setup.polar_axis, dtype=like.dtype, device=dev)

    x0, x1, y0, y1 = _roi(setup)
    w, h = x1 - x0 + 1, y1 - y0 + 1
    masked = setup.mask is not None
    n = len(_masked_indices(setup)) if masked else w * h
    per_pixel = setup.thicksteps * setup.oversample**2 * setup.n_sources * xtal.A.shape[0]
    tile = max(1, setup.sample_budget // per_pixel)
    chunks = []
    for start in range(0, n, tile):
        if masked:
            k = torch.as_tensor(_masked_indices(setup)[start : start + tile], device=dev)
        else:
            k = torch.arange(start, min(start + tile, n), device=dev)
        chunks.append(_tile_values(params, setup, frame, xtal, inc, lam, E, x0 + k % w, y0 + k // w))
    vals = torch.cat(chunks) if len(chunks) > 1 else chunks[0] if chunks else torch.zeros(0, dtype=like.dtype)
    if masked:
        k = torch.as_tensor(_masked_indices(setup), device=dev)
        vals = torch.zeros(w * h, dtype=vals.dtype, device=dev).index_put((k,), vals)
    image = vals.reshape(h, w)
    if (w, h) != (setup.fpixels, setup.spixels):
        image = torch.nn.functional.pad(image, (x0, setup.fpixels - 1 - x1, y0, setup.spixels - 1 - y1))
    return image
