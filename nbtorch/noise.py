"""Integer output images of nanoBragg: Poisson noise image and noiseless ``-intfile`` image (spec §1.7, §6).

numpy-only (outside the differentiable path), reproducing nanoBragg bit for bit:

* noise image (``-noisefile``, ``-seed n``, ``-adc``): one :class:`~nbtorch.rng.Ran1` stream started at −n; pixels are
  visited serially in raster order (slow-major) over the ROI, each drawing ``poidev(float pixel)``; the stored value is
  ``(uint16) min(photons + adc, 65535)`` (C truncation; values above 65535 are counted as overloads).
* int image (``-intfile``, ``-scale``, ``-adc``): ``floorf(clip(float·scale + adc, 0, 65535) + 0.5)`` with the scale
  defaulting to 55000/max(float image) (1 if the maximum ≤ 0).  The expression is evaluated in double precision and
  ``+ 0.5`` is rounded to float32 before the floor (the C calls ``floorf`` on a double), which matters for values
  within ~1e−7 relative of a half-integer.

Pixels outside the ROI are not visited and stay 0 in both images.  ROI = ``(xmin, xmax, ymin, ymax)``, inclusive
bounds, x = fast index, y = slow index (nanoBragg's ``-roi`` order).
"""
from __future__ import annotations

import numpy as np

from .pixels import roi_mask
from .rng import Ran1

__all__ = [
    "roi_mask",
    "poisson_noise",
    "counts_to_uint16",
    "noise_image_uint16",
    "int_image_scale",
    "int_image_uint16",
]


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D [slow, fast], got shape {img.shape}")
    return img.astype(np.float32, copy=False)


def poisson_noise(image: np.ndarray, seed: int, roi: tuple[int, int, int, int] | None = None,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Poisson photon counts for every visited pixel, drawn exactly like nanoBragg's noise image.

    Parameters
    ----------
    image: ``[S, F]`` expected photons per pixel (rounded to float32 as nanoBragg's float image).
    seed: the user's ``-seed`` value n; the stream is ``Ran1(-n)`` (nanoBragg stores −n).
    roi: ``(xmin, xmax, ymin, ymax)`` inclusive fast/slow bounds, or ``None`` for the whole image.
    mask: optional ``[S, F]``; pixels with ``mask == 0`` are skipped like pixels outside the ROI.

    Returns
    -------
    ``[S, F]`` float64 photon counts (integers, except for means > 1e6 where nanoBragg uses the Gaussian
    approximation); skipped pixels are 0 and consume no random numbers.  Pixels are drawn in raster (slow-major) order.
    """
    img = _check_image(image)
    sel = roi_mask(img.shape, roi, mask)
    out = np.zeros(img.shape, dtype=np.float64)
    out[sel] = Ran1(-int(seed)).poidev_many(img[sel]).astype(np.float64)
    return out


def counts_to_uint16(counts: np.ndarray, adc: float = 40.0, roi: tuple[int, int, int, int] | None = None,
                     mask: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Convert photon counts ``[S, F]`` to nanoBragg's noise-image pixels.

    value = (uint16) min(counts + adc, 65535) (truncation toward zero; negative sums → 0); pixels outside
    ``roi`` / with ``mask == 0`` are 0.  Returns ``(pixels [S, F] uint16, n_overloads)`` where overloads are visited
    pixels whose counts + adc exceeded 65535.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2:
        raise ValueError(f"counts must be 2-D [slow, fast], got shape {c.shape}")
    sel = roi_mask(c.shape, roi, mask)
    test = c + float(adc)
    over = sel & (test > 65535.0)
    test = np.clip(np.trunc(np.nan_to_num(test, nan=0.0)), 0.0, 65535.0)
    out = np.where(sel, test, 0.0).astype(np.uint16)
    return out, int(over.sum())


def noise_image_uint16(image: np.ndarray, seed: int, adc: float = 40.0, roi: tuple[int, int, int, int] | None = None,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """nanoBragg's ``-noisefile`` pixel data: ``(pixels [S, F] uint16, n_overloads)``.

    ``image``: ``[S, F]`` float photons/pixel; ``seed``: user ``-seed`` value n (stream ``Ran1(-n)``); ``adc``: ADC
    offset (counts, default 40); ``roi``/``mask``: as in :func:`poisson_noise`.  The number of photons nanoBragg
    prints is ``poisson_noise(...).sum()``.
    """
    counts = poisson_noise(image, seed, roi=roi, mask=mask)
    return counts_to_uint16(counts, adc=adc, roi=roi, mask=mask)


def int_image_scale(image: np.ndarray) -> float:
    """nanoBragg's automatic ``-intfile`` scale: 55000 / max(image) (1.0 if the maximum is ≤ 0).  ``image``: ``[S, F]``."""
    img = np.asarray(image, dtype=np.float32)
    mx = float(img.max()) if img.size else 0.0
    return 55000.0 / mx if mx > 0.0 else 1.0


def int_image_uint16(image: np.ndarray, scale: float | None = None, adc: float = 40.0,
                     roi: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, float]:
    """nanoBragg's noiseless ``-intfile`` pixel data: ``(pixels [S, F] uint16, scale)``.

    ``image``: ``[S, F]`` float photons/pixel; ``scale``: counts per photon, ``None`` or ≤ 0 → automatic
    (:func:`int_image_scale`); ``adc``: offset (default 40).  value = floorf((float)(clip(image·scale + adc, 0, 65535)
    + 0.5)).  Pixels outside ``roi`` (inclusive ``(xmin, xmax, ymin, ymax)``, x = fast) are 0.  nanoBragg does
    **not** apply ``-mask`` here: masked pixels (float 0) get ``floor(adc + 0.5)``.
    """
    img = _check_image(image)
    if scale is None or not scale > 0.0:
        scale = int_image_scale(img)
    scale = float(scale)
    test = np.clip(img.astype(np.float64) * scale + float(adc), 0.0, 65535.0)
    vals = np.floor((test + 0.5).astype(np.float32))
    sel = roi_mask(img.shape, roi)
    out = np.where(sel, vals, 0.0).astype(np.uint16)
    return out, scale
