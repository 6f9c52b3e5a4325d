"""Point-spread function of the detector: pixel-integrated kernels and their application to a rendered image.

Two profiles, with noisify's names and meanings (FWHM in µm on the detector surface):

* ``gauss``: a 2-D Gaussian of that FWHM (σ = FWHM / (2·√(2 ln 2))).  Integrated over a pixel it is the product of
  two differences of the normal distribution function, one per axis.
* ``fiber``: the profile of a fibre-optic taper, whose 2-D density is g / (2π (g² + r²)^{3/2}) with
  g = :data:`FIBER_G_PER_FWHM` × FWHM; a fraction g / √(g² + r²) of the photons lands beyond radius r.  This density
  is the solid angle per area of a plane seen from height g, divided by 2π, so its integral over the quarter plane
  [0, x] × [0, y] is atan(x·y / (g·√(g² + x² + y²))) / (2π): exact pixel integrals by four corners.

Kernels are square, ``2·radius + 1`` pixels a side, normalised to sum 1 (the fraction beyond the square,
< ``lost`` with :func:`psf_radius`'s radius, is spread over the kernel).  :func:`apply_psf` convolves each panel of an
image on its own (FFT, zero padding): photons spread off a panel are lost, as on a real detector.  Everything is
differentiable in the FWHM and the image, and works under ``torch.func`` transforms.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

#: The profiles :func:`psf_kernel` knows.
PSF_KINDS = ("gauss", "fiber")
#: g of the fibre profile per µm of FWHM (noisify's factor: the FWHM of g/(2π(g² + r²)^{3/2}) is g/0.652383…).
FIBER_G_PER_FWHM = 0.652383013252053
#: FWHM / σ of a Gaussian.
GAUSS_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Default fraction of a pixel's photons allowed beyond the kernel (:func:`psf_radius`).
DEFAULT_LOST = 1e-3


def _check(kind: str, fwhm_um: float, pixel_mm: float) -> None:
    if kind not in PSF_KINDS:
        raise ValueError(f"-psf must be one of {', '.join(PSF_KINDS)}, got {kind!r}")
    if not (math.isfinite(fwhm_um) and fwhm_um > 0):
        raise ValueError(f"-psf_fwhm must be a finite number of µm > 0, got {fwhm_um!r}")
    if not (math.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel size must be > 0 mm, got {pixel_mm!r}")


def psf_radius(kind: str, fwhm_um: float, pixel_mm: float, lost: float = DEFAULT_LOST) -> int:
    """The smallest kernel radius (pixels) with less than ``lost`` of a pixel's photons beyond the square of side
    2·radius + 1 centred on it: for ``gauss`` from the Gaussian's tails along both axes, for ``fiber`` from the
    fraction beyond the inscribed circle, g/√(g² + r²).  At least 1."""
    _check(kind, fwhm_um, pixel_mm)
    if not 0 < lost < 1:
        raise ValueError(f"lost must be a fraction in (0, 1), got {lost!r}")
    pix_um = 1000.0 * pixel_mm
    if kind == "gauss":
        sigma = fwhm_um / GAUSS_FWHM_PER_SIGMA
        r = 0
        while 2.0 * math.erfc((r + 0.5) * pix_um / (sigma * math.sqrt(2.0))) >= lost:
            r += 1
        return max(r, 1)
    g = FIBER_G_PER_FWHM * fwhm_um
    reach_um = g * math.sqrt(1.0 / (lost * lost) - 1.0)  # g/√(g² + r²) = lost
    return max(1, math.ceil(reach_um / pix_um - 0.5))


def _edges(radius: int, pixel_mm: float, like: torch.Tensor) -> torch.Tensor:
    """Pixel edges (µm) from the kernel's centre: [2·radius + 2]."""
    k = torch.arange(-radius, radius + 2, dtype=like.dtype, device=like.device)
    return (k - 0.5) * (1000.0 * pixel_mm)


def psf_kernel(kind: str, fwhm_um, pixel_mm: float, radius: Optional[int] = None) -> torch.Tensor:
    """The pixel-integrated kernel ``[2R+1, 2R+1]`` (slow, fast; sums to 1) of the profile ``kind`` with FWHM
    ``fwhm_um`` (µm; a float or a 0-d tensor, differentiable) on square pixels of ``pixel_mm`` (mm); ``radius`` R
    in pixels (default :func:`psf_radius`; give it under ``torch.func`` transforms, where the FWHM has no value to
    read).  A float FWHM gives a float64 kernel, a tensor one a kernel of its dtype."""
    fwhm = fwhm_um if torch.is_tensor(fwhm_um) else torch.tensor(float(fwhm_um), dtype=torch.float64)
    if radius is None:
        radius = psf_radius(kind, float(fwhm), pixel_mm)
    else:
        _check(kind, 1.0, pixel_mm)
        if int(radius) != radius or radius < 0:
            raise ValueError(f"-psf_radius must be a whole number of pixels >= 0, got {radius!r}")
    e = _edges(int(radius), pixel_mm, fwhm)
    if kind == "gauss":
        sigma = fwhm / GAUSS_FWHM_PER_SIGMA
        lo, hi = e[:-1] / sigma, e[1:] / sigma

        def tail(x):  # P(X > x) of a unit normal; erfc keeps the far tails (torch's ndtr flushes them to 0)
            return 0.5 * torch.special.erfc(x / math.sqrt(2.0))

        w = torch.where(lo >= 0, tail(lo) - tail(hi), torch.where(hi <= 0, tail(-hi) - tail(-lo),
                                                                  1 - tail(hi) - tail(-lo)))
        k = w[:, None] * w[None, :]
    else:
        g = FIBER_G_PER_FWHM * fwhm
        x, y = e[None, :], e[:, None]
        corner = torch.atan(x * y / (g * torch.sqrt(g * g + x * x + y * y)))
        k = (corner[1:, 1:] - corner[1:, :-1] - corner[:-1, 1:] + corner[:-1, :-1]) / (2.0 * math.pi)
    return k / k.sum()


def apply_psf(image: torch.Tensor, kernel: torch.Tensor, extent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``image`` ([S, F] or [P, S, F], photons per pixel) blurred by ``kernel`` ([2R+1, 2R+1], from
    :func:`psf_kernel`), each panel on its own: photons that spread beyond a panel's edge are lost.  ``extent``
    (bool, the image's shape): the pixels the panels have (:func:`nbtorch.pixels.panel_extent_mask`; a smaller
    panel's padding is off the panel).  Linear convolution by FFT; the result is clamped at 0 (FFT rounding)."""
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 != 1:
        raise ValueError(f"the PSF kernel must be square with an odd side, got shape {tuple(kernel.shape)}")
    if image.dim() not in (2, 3):
        raise ValueError(f"the image must be [slow, fast] or [panels, slow, fast], got shape {tuple(image.shape)}")
    if extent is not None:
        image = torch.where(extent, image, torch.zeros((), dtype=image.dtype, device=image.device))
    R = kernel.shape[0] // 2
    S, F = image.shape[-2:]
    shape = (S + 2 * R, F + 2 * R)
    spectrum = torch.fft.rfft2(image, s=shape) * torch.fft.rfft2(kernel.to(image.dtype), s=shape)
    out = torch.fft.irfft2(spectrum, s=shape)[..., R:R + S, R:R + F].clamp(min=0)
    if extent is not None:
        out = torch.where(extent, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
