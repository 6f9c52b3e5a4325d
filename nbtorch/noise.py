"""Integer output images of nanoBragg: Poisson noise image and noiseless ``-intfile`` image (spec §1.7, §6).

numpy-only (outside the differentiable path), reproducing nanoBragg bit for bit:

* noise image (``-noisefile``, ``-seed n``, ``-adc``): one :class:`~nbtorch.rng.Ran1` stream started at −n; pixels are
  visited serially in raster order (slow-major) over the ROI, each drawing ``poidev(float pixel)``; the stored value is
  ``(uint16) min(photons + adc, 65535)`` (C truncation; values above 65535 are counted as overloads).
* int image (``-intfile``, ``-scale``, ``-adc``): ``floorf(clip(float·scale + adc, 0, 65535) + 0.5)`` with the scale
  defaulting to 55000/max(float image) (1 if the maximum ≤ 0).  The expression is evaluated in double precision and
  ``+ 0.5`` is rounded to float32 before the floor (the C calls ``floorf`` on a double), which matters for values
  within ~1e−7 relative of a half-integer.

Beyond nanoBragg, :func:`detector_adu` adds noisify's detector terms (:class:`DetectorNoise`: gain, read-out noise,
source flicker, static calibration error) from numpy streams of their own, so that the photon counts stay nanoBragg's.

Pixels outside the ROI are not visited and stay 0 in both images.  ROI = ``(xmin, xmax, ymin, ymax)``, inclusive
bounds, x = fast index, y = slow index (nanoBragg's ``-roi`` order).
"""
from __future__ import annotations

import math
from typing import NamedTuple

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
    "DetectorNoise",
    "detector_adu",
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


#: noisify's default seed of the static calibration error (``-calib_seed``).
DEFAULT_CALIB_SEED = 123456789


class DetectorNoise(NamedTuple):
    """The detector terms of noisify, beyond photon counting (all off by default: nanoBragg's noise image).

    gain: ADU per photon (``-gain``, > 0); readout_adu: σ of the Gaussian read-out noise per pixel (ADU,
    ``-readout_noise``); flicker: fractional σ of the source intensity, one draw per image (``-flicker``);
    calibration: fractional σ of each pixel's static gain error (``-calibration``), drawn from its own stream
    ``calib_seed`` (``-calib_seed``) so that every image of a detector shares it."""

    gain: float = 1.0
    readout_adu: float = 0.0
    flicker: float = 0.0
    calibration: float = 0.0
    calib_seed: int = DEFAULT_CALIB_SEED

    def check(self) -> "DetectorNoise":
        """This, or ValueError naming the flag and its allowed range."""
        for flag, v, ok, rule in (("-gain", self.gain, self.gain > 0, "> 0"),
                                  ("-readout_noise", self.readout_adu, self.readout_adu >= 0, ">= 0"),
                                  ("-flicker", self.flicker, 0 <= self.flicker < 1, "in [0, 1)"),
                                  ("-calibration", self.calibration, 0 <= self.calibration < 1, "in [0, 1)")):
            if not (math.isfinite(v) and ok):
                raise ValueError(f"{flag} must be a finite number {rule}, got {v!r}")
        return self

    @property
    def is_ideal(self) -> bool:
        """Whether the noise image is nanoBragg's (photon counting and the ADC offset only)."""
        return self.gain == 1.0 and self.readout_adu == 0.0 and self.flicker == 0.0 and self.calibration == 0.0


def _stream(seed: int, term: int) -> np.random.Generator:
    """A numpy stream for one noise term of the image with nanoBragg seed ``seed`` (terms never share draws)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, term]))


def detector_adu(image: np.ndarray, seed: int, noise: DetectorNoise = DetectorNoise(),
                 roi: tuple[int, int, int, int] | None = None, mask: np.ndarray | None = None
                 ) -> tuple[np.ndarray, float]:
    """A noisy detector reading in ADU before the ADC offset: ``(adu [S, F] float64, photons counted)``.

    In the order a photon meets them: the source flickers (expected photons × (1 + flicker·g), one g per image),
    photons are counted (:func:`poisson_noise`, nanoBragg's stream for ``seed``), each pixel's static calibration
    error multiplies the count (1 + calibration·g_pixel, stream ``calib_seed``), the gain converts to ADU and
    read-out noise adds readout_adu·g_pixel.  With :attr:`DetectorNoise.is_ideal` the ADU are nanoBragg's photon
    counts exactly.  Pixels outside ``roi`` or masked are 0."""
    noise.check()
    img = _check_image(image)
    sel = roi_mask(img.shape, roi, mask)
    if noise.flicker:
        img = (img * max(0.0, 1.0 + noise.flicker * _stream(seed, 1).standard_normal())).astype(np.float32)
    counts = poisson_noise(img, seed, roi=roi, mask=mask)
    photons = float(counts.sum())
    if noise.calibration:
        gains = np.random.default_rng(int(noise.calib_seed) & 0xFFFFFFFF).standard_normal(img.shape)
        counts = counts * np.maximum(0.0, 1.0 + noise.calibration * gains)
    adu = counts * noise.gain
    if noise.readout_adu:
        adu = adu + noise.readout_adu * _stream(seed, 2).standard_normal(img.shape)
    return np.where(sel, adu, 0.0), photons
