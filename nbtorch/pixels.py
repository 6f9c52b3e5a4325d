"""The pixels a set-up renders: inside ``Setup.roi`` and not excluded by ``Setup.mask`` (nanoBragg skips the others).

numpy only, so that the renderer (:mod:`nbtorch.simulate`), the noise and int images (:mod:`nbtorch.noise`), the
command line's statistics and diagnostics, the NXmx pixel mask (:mod:`nbtorch.io.nexus`) and refine's usable pixels
all use the one rule.  ROI = ``(xmin, xmax, ymin, ymax)``, inclusive bounds, x = fast index, y = slow index
(nanoBragg's ``-roi`` order); images are ``[slow, fast]``.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np

__all__ = ["roi_mask", "mask_array", "rendered_mask", "rendered_pixels"]


def roi_mask(shape: tuple[int, int], roi: tuple[int, int, int, int] | None = None,
             mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean ``[S, F]`` array of the pixels nanoBragg visits.

    ``shape``: ``(spixels, fpixels)``.  ``roi``: ``(xmin, xmax, ymin, ymax)`` inclusive pixel bounds, x = fast,
    y = slow (``None`` = whole detector).  ``mask``: optional ``[S, F]`` array; pixels where ``mask == 0`` are
    excluded.
    """
    S, F = int(shape[0]), int(shape[1])
    sel = np.ones((S, F), dtype=bool)
    if roi is not None:
        xmin, xmax, ymin, ymax = (int(v) for v in roi)
        f = np.arange(F)
        s = np.arange(S)
        sel &= ((s >= ymin) & (s <= ymax))[:, None] & ((f >= xmin) & (f <= xmax))[None, :]
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != (S, F):
            raise ValueError(f"mask shape {m.shape} does not match image shape {(S, F)}")
        sel &= m != 0
    return sel


def mask_array(setup) -> Optional[np.ndarray]:
    """``Setup.mask`` as uint8 ``[spixels, fpixels]`` (0 = skipped), or None."""
    if setup.mask is None:
        return None
    return np.frombuffer(setup.mask, dtype=np.uint8).reshape(setup.spixels, setup.fpixels)


def rendered_mask(setup) -> np.ndarray:
    """Bool ``[spixels, fpixels]``: True where the :class:`~nbtorch.types.Setup` renders a pixel (inside
    ``setup.roi`` and not 0 in ``setup.mask``); :func:`nbtorch.simulate.simulate` leaves the others 0."""
    return roi_mask((setup.spixels, setup.fpixels), setup.roi, mask_array(setup))


@functools.lru_cache(maxsize=32)
def rendered_pixels(setup) -> np.ndarray:
    """Flat slow-major indices (``slow·fpixels + fast``, int64) of the pixels ``setup`` renders
    (:func:`rendered_mask`), in raster order (computed once per Setup)."""
    return np.flatnonzero(rendered_mask(setup))
