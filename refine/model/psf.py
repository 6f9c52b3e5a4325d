"""The detector's point-spread function in a fit: its profile and kernel radius stay fixed, its FWHM is the ``psf``
scalar (:data:`refine.model.table.SCALARS`), and :class:`PixelBlur` blurs a model rendered at chosen pixels.

A blurred pixel takes photons from every pixel of its panel within the kernel radius, so the model is rendered on
the chosen pixels dilated by that radius (:attr:`PixelBlur.source`; every pixel a panel has, whatever the ROI or the
mask: photons reach a masked pixel's neighbours all the same) and each chosen pixel sums its (2R+1)² neighbours
times the kernel (:func:`nbtorch.psf.psf_kernel`) — the convolution :func:`nbtorch.psf.apply_psf` does on a whole
image, on the chosen pixels only.  Photons spread off a panel are lost, as there.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from nbtorch.args.response import square_pixel_mm
from nbtorch.pixels import panel_extent_mask
from nbtorch.psf import PSF_KINDS, apply_psf, psf_kernel, psf_radius
from nbtorch.types import Setup

#: Without an explicit radius the kernel is sized for this multiple of the starting FWHM: the FWHM may grow during a
#: fit while the kernel's shape stays fixed.
RADIUS_MARGIN = 1.5
#: The most kernel-cell indices (pixels × (2R+1)²) the gather form of :class:`PixelBlur` holds; beyond, an FFT.
GATHER_LIMIT = 1 << 24
#: The largest default radius (pixels; nbtorch's ``-psf_radius`` range): a larger one must be asked for.
MAX_DEFAULT_RADIUS = 1000


@dataclasses.dataclass(frozen=True)
class PointSpread:
    """A fit's point-spread function: ``kind`` (one of :data:`nbtorch.psf.PSF_KINDS`), the starting ``fwhm_um``
    (µm, > 0) and the kernel ``radius`` (pixels), fixed for the fit."""

    kind: str
    fwhm_um: float
    radius: int


def point_spread(kind: Optional[str], fwhm_um: Optional[float], setup: Setup,
                 radius: Optional[int] = None) -> Optional[PointSpread]:
    """The :class:`PointSpread` of a fit on ``setup`` (None when ``kind`` is None): ``radius`` (pixels) as given,
    else :func:`nbtorch.psf.psf_radius` of :data:`RADIUS_MARGIN` × ``fwhm_um`` on the detector's square pixels.
    ValueError naming ``psf``, ``psf_fwhm`` or ``psf_radius`` for a bad value."""
    if kind is None:
        return None
    if kind not in PSF_KINDS:
        raise ValueError(f"psf must be one of {', '.join(PSF_KINDS)} or None; got {kind!r}")
    if isinstance(fwhm_um, bool) or not isinstance(fwhm_um, (int, float)) or not (
            math.isfinite(fwhm_um) and fwhm_um > 0):
        raise ValueError(f"psf_fwhm must be a finite number of µm > 0 with psf={kind!r}; got {fwhm_um!r}")
    pixel = square_pixel_mm(setup)
    if radius is None:
        radius = psf_radius(kind, RADIUS_MARGIN * float(fwhm_um), pixel)
        if radius > MAX_DEFAULT_RADIUS:
            raise ValueError(f"psf {kind} with psf_fwhm {fwhm_um:g} µm on {pixel:g} mm pixels needs a kernel radius "
                             f"of {radius} pixels to keep 99.9 % of the photons: give psf_radius (pixels) or a "
                             "smaller psf_fwhm")
    elif isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise ValueError(f"psf_radius must be a whole number of pixels >= 0 or None; got {radius!r}")
    return PointSpread(str(kind), float(fwhm_um), int(radius))


def _box_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` (bool [..., S, F]) dilated by a square of side 2·radius + 1 within each [S, F] (a pixel is True when
    one within ``radius`` along both axes is): running sums along slow, then fast."""
    out = mask
    for axis in (-2, -1):
        n = out.shape[axis]
        c = np.cumsum(out, axis=axis, dtype=np.int64)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        hi = np.take(c, np.minimum(np.arange(n) + radius + 1, n), axis=axis)
        lo = np.take(c, np.maximum(np.arange(n) - radius, 0), axis=axis)
        out = hi > lo
    return out


class PixelBlur:
    """The blur of a model at the flat pixel ``index`` [n] (slow-major, as :func:`~refine.model.predict.pixel_index`
    gives) of ``setup`` by the kernel of ``psf``.

    ``source`` (long [m]): the pixels to render, the chosen ones dilated by the radius within each panel (only
    pixels the panels have).  Two forms, the same numbers: *gather* (small kernels) — ``gather`` (long
    [n, (2R+1)²]) holds, for each chosen pixel and kernel cell, the position in ``source`` of the pixel it takes
    photons from (m: off the panel, a zero), and each pixel sums its cells times the kernel; *dense* (when
    n·(2R+1)² exceeds :data:`GATHER_LIMIT`, or ``dense=True``) — the source photons are placed in an image of
    ``setup.image_shape`` (zeros elsewhere), blurred by :func:`nbtorch.psf.apply_psf` and read at the chosen pixels.
    Call with the rendered source photons [m] and the FWHM (µm, a 0-d tensor, differentiable) → blurred photons
    [n]."""

    def __init__(self, psf: PointSpread, setup: Setup, index: np.ndarray, device=None, dense: Optional[bool] = None):
        self.psf, self.pixel_mm = psf, square_pixel_mm(setup)
        self.shape = tuple(setup.image_shape)
        extent = panel_extent_mask(setup) if setup.panels is not None else np.ones(self.shape, dtype=bool)
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        side = 2 * psf.radius + 1
        self.dense = bool(len(idx) * side * side > GATHER_LIMIT) if dense is None else bool(dense)
        if self.dense:
            chosen = np.zeros(extent.size, dtype=bool)
            chosen[idx] = True
            source = np.flatnonzero(_box_dilate(chosen.reshape(self.shape), psf.radius) & extent)
            place = np.full(extent.size, len(source), dtype=np.int64)
            place[source] = np.arange(len(source))
            self.place = torch.as_tensor(place, device=device)
            self.index = torch.as_tensor(idx, device=device)
            self.extent = None if setup.panels is None else torch.as_tensor(extent, device=device)
        else:
            source, pos = self._gather_plan(idx, extent, psf.radius)
            self.gather = torch.as_tensor(pos, dtype=torch.long, device=device)
        self.source = torch.as_tensor(source, dtype=torch.long, device=device)

    def _gather_plan(self, idx: np.ndarray, extent: np.ndarray, R: int):
        """(source [m], gather [n, (2R+1)²]) of the gather form."""
        S, F = self.shape[-2:]
        panel, s, f = idx // (S * F), (idx // F) % S, idx % F
        off = np.arange(2 * R + 1)
        # kernel cell (a, b) of pixel (s, f) takes from (s + R - a, f + R - b): apply_psf's linear convolution
        ss, ff = np.broadcast_arrays(s[:, None, None] + R - off[None, :, None], f[:, None, None] + R - off[None, None, :])
        inside = (ss >= 0) & (ss < S) & (ff >= 0) & (ff < F)
        flat = panel[:, None, None] * (S * F) + np.clip(ss, 0, S - 1) * F + np.clip(ff, 0, F - 1)
        inside &= extent.reshape(-1)[flat]
        source = np.unique(flat[inside])
        pos = np.where(inside, np.searchsorted(source, flat), len(source))
        return source, pos.reshape(len(idx), -1)

    def kernel(self, fwhm_um: torch.Tensor) -> torch.Tensor:
        """The kernel [2R+1, 2R+1] at FWHM ``fwhm_um`` (µm, 0-d tensor; differentiable)."""
        return psf_kernel(self.psf.kind, fwhm_um, self.pixel_mm, radius=self.psf.radius)

    def __call__(self, photons: torch.Tensor, fwhm_um: torch.Tensor) -> torch.Tensor:
        """Blurred photons [n] of the source pixels' ``photons`` [m] at FWHM ``fwhm_um`` (µm)."""
        padded = torch.cat([photons, photons.new_zeros(1)])
        k = self.kernel(fwhm_um).to(photons.dtype)
        if not self.dense:
            return (padded[self.gather] * k.reshape(-1)).sum(-1)
        image = padded[self.place].reshape(self.shape)
        return apply_psf(image, k, self.extent).reshape(-1)[self.index]
