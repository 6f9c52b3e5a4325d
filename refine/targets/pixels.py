"""Which pixels take part in a fit: the usable ones (finite, not overloaded, in the user's mask and rendered by the
set-up) and, optionally, only those near spots plus a background sample."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from nbtorch.pixels import rendered_mask
from nbtorch.types import Setup

from ..model.predict import image_axes


def usable_mask(observed: np.ndarray, setup: Setup, mask=None, overload: Optional[float] = None,
                lowest=0.0) -> np.ndarray:
    """Pixels that may enter a fit, bool of the image's shape (``setup.image_shape``: [slow, fast], or [panel, slow,
    fast] for a panel detector).

    A pixel is usable when its observed value is finite and ≥ ``lowest`` (photons, a number or an array of the
    image's shape: the target's :meth:`~refine.targets.losses.Target.lowest_observed`; 0 by default, as detector
    gaps are often negative), below ``overload`` (when given), True in the user ``mask`` (bool/0-1 array of that
    shape, True = use), and rendered by ``setup`` (inside ``setup.roi``, on a panel and not excluded by
    ``setup.mask``).
    """
    o = np.asarray(observed, dtype=np.float64)
    if o.shape != tuple(setup.image_shape):
        raise ValueError(f"observed image has shape {o.shape} but the model detector is {image_axes(setup)} = "
                         f"{tuple(setup.image_shape)}")
    finite = np.isfinite(o)
    keep = finite & (np.where(finite, o, -np.inf) >= lowest)
    if overload is not None:
        keep &= o < float(overload)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != o.shape:
            raise ValueError(f"mask has shape {m.shape}, expected {o.shape}")
        keep &= m.astype(bool)
    return keep & rendered_mask(setup)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(max(0, int(radius))):
        grown = out.copy()
        grown[..., 1:, :] |= out[..., :-1, :]  # within each panel: slow and fast, never across panels
        grown[..., :-1, :] |= out[..., 1:, :]
        grown[..., 1:] |= out[..., :-1]
        grown[..., :-1] |= out[..., 1:]
        out = grown
    return out


def select_pixels(observed: np.ndarray, model: np.ndarray, usable: np.ndarray, *, threshold: Optional[float] = None,
                  relative: float = 0.01, dilate: int = 3, background_fraction: float = 0.05,
                  seed: int = 0) -> np.ndarray:
    """Pixels near spots plus a background sample, bool of the image's shape (a subset of ``usable``; a panel
    detector's spots are dilated within their panel).

    A pixel is a *spot* pixel when the model or the observed value exceeds ``threshold`` (default: the larger of the
    usable observed pixels' median + 3·sqrt(median + 1), three Poisson sigmas above the background, and ``relative``
    × the model's 99.9th percentile, which keeps the far tails of bright spots out); spot pixels are dilated by
    ``dilate`` pixels (spots that move during the fit stay inside).  A random ``background_fraction`` of the other
    usable pixels (fixed ``seed``) keeps the background and the scale determined.
    """
    o = np.asarray(observed, dtype=np.float64)
    m = np.asarray(model, dtype=np.float64)
    if threshold is None:
        med = float(np.median(o[usable])) if usable.any() else 0.0
        peak = float(np.percentile(m[usable], 99.9)) if usable.any() else 0.0
        threshold = max(med + 3.0 * math.sqrt(max(med, 0.0) + 1.0), relative * peak)
    spots = usable & ((m > threshold) | (np.where(usable, o, 0.0) > threshold))
    near = _dilate(spots, dilate) & usable
    rest = usable & ~near
    rng = np.random.default_rng(seed)
    sample = rest & (rng.random(rest.shape) < float(background_fraction))
    return near | sample
