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

__all__ = ["roi_mask", "mask_array", "panel_extent_mask", "rendered_mask", "rendered_pixels"]


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
    """``Setup.mask`` as uint8 of the image's shape (``setup.image_shape``: ``[spixels, fpixels]``, or
    ``[P, spixels, fpixels]`` for a panel detector; 0 = skipped), or None."""
    if setup.mask is None:
        return None
    return np.frombuffer(setup.mask, dtype=np.uint8).reshape(setup.image_shape)


def panel_extent_mask(setup) -> np.ndarray:
    """Bool ``[P, spixels, fpixels]``: True on the pixels each panel of ``setup.panels`` has (a smaller panel's
    image is padded to the largest panel's counts)."""
    layout = setup.panels
    sel = np.zeros(setup.image_shape, dtype=bool)
    for k, p in enumerate(layout.panels):
        sel[k, :p.spixels, :p.fpixels] = True
    return sel


def rendered_mask(setup) -> np.ndarray:
    """Bool of the image's shape (``setup.image_shape``): True where the :class:`~nbtorch.types.Setup` renders a
    pixel (inside ``setup.roi``, on a panel, and not 0 in ``setup.mask``); :func:`nbtorch.simulate.simulate` leaves
    the others 0."""
    if setup.panels is None:
        return roi_mask((setup.spixels, setup.fpixels), setup.roi, mask_array(setup))
    sel = panel_extent_mask(setup)
    mask = mask_array(setup)
    return sel if mask is None else sel & (mask != 0)


@functools.lru_cache(maxsize=32)
def rendered_pixels(setup) -> np.ndarray:
    """Flat slow-major indices (``slow·fpixels + fast``, plus ``panel·spixels·fpixels`` for a panel detector; int64)
    of the pixels ``setup`` renders
    (:func:`rendered_mask`), in raster order (computed once per Setup)."""
    return np.flatnonzero(rendered_mask(setup))
