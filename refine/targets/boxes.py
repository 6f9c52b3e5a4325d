"""Spot regions of interest: the pixels of a spot-ROI fit, square boxes about observed spots, each region with its own
background plane (as diffBragg's hopper fits stills from a DIALS reflection table).

    boxes = spot_boxes(setup, spots, roi_size=11, max_spots=None)       # spots: a ReflectionTable or [n, 2|3] px
    boxes.mask        # bool of setup.image_shape: the pixels that enter the fit
    boxes.region      # int32 of setup.image_shape: the region of each pixel (-1 outside every box)

A spot at pixel coordinates (fast, slow) — DIALS's ``xyzobs.px.value``, in which pixel i spans [i, i + 1) — gets the
box of ``roi_size`` × ``roi_size`` pixels centred on the pixel that holds it (for an even size, the extra row and
column lie after it), clipped at its panel's edges.  Boxes that share pixels are merged into one region (one
background plane: a plane per box would be undetermined where two boxes share pixels); boxes that only touch stay
apart.  Each region's plane is
c0 + c_fast·u + c_slow·v with u, v = (pixel centre − the region's centre) / the region's extent (the larger side of
its bounding box), so u, v ∈ [−½, ½] as in the whole image's plane (:func:`refine.model.predict.plane_basis`) and
every coefficient is in photons per pixel.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from nbtorch.types import Setup

#: The default side of a spot's box (pixels): a still's spot (1–5 px) with two or more pixels of background around it.
DEFAULT_ROI_SIZE = 11
#: The reflection-table column that orders spots by strength (``max_spots``).
STRENGTH_COLUMN = "intensity.sum.value"


@dataclasses.dataclass(frozen=True, eq=False)
class SpotBoxes:
    """The regions of a spot-ROI fit (build with :func:`spot_boxes`).

    ``region`` int32 of ``setup.image_shape``: each pixel's region, -1 outside every box; ``centres`` [B, 2] float64:
    each region's centre (fast, slow pixel coordinates, the middle of its bounding box); ``panels`` [B] int: each
    region's panel (0 for nanoBragg's one panel); ``extent`` [B]: the larger side of each region's bounding box
    (pixels), which scales its plane's u, v; ``size``: the box side (pixels);
    ``n_spots``: spots boxed; ``n_given``: spots given (before ``max_spots`` and those off every panel)."""

    region: np.ndarray
    centres: np.ndarray
    panels: np.ndarray
    extent: np.ndarray
    size: int
    n_spots: int
    n_given: int

    n = property(lambda self: int(self.centres.shape[0]), doc="Number of regions B.")
    mask = property(lambda self: self.region >= 0, doc="bool of the image's shape: the pixels in a box.")

    def basis(self, index, dtype=torch.float64, device=None):
        """(region long [n], basis [3, n]) at the flat slow-major pixel ``index`` [n]: each pixel's region and its
        plane basis 1, u, v (see the module docstring); a pixel outside every box has no background (basis 0,
        region 0)."""
        idx = np.asarray(index.detach().cpu().numpy() if torch.is_tensor(index) else index, dtype=np.int64)
        shape = self.region.shape
        reg = self.region.reshape(-1)[idx].astype(np.int64)
        inside = reg >= 0
        reg = np.where(inside, reg, 0)
        fast = (idx % shape[-1]) + 0.5
        slow = ((idx // shape[-1]) % shape[-2]) + 0.5
        u = (fast - self.centres[reg, 0]) / self.extent[reg]
        v = (slow - self.centres[reg, 1]) / self.extent[reg]
        basis = np.stack([np.ones_like(u), u, v]) * inside
        return (torch.as_tensor(reg, dtype=torch.long, device=device),
                torch.as_tensor(basis, dtype=dtype, device=device))

    def starting_planes(self, observed: np.ndarray, usable: np.ndarray) -> np.ndarray:
        """Starting coefficients [B, 3] (photons/pixel): each region's median usable observed value (a spot covers a
        minority of its box) as c0, flat (zero slopes); 0 where a region has no usable pixel."""
        out = np.zeros((self.n, 3))
        reg = np.where(usable, self.region, -1).reshape(-1)
        vals = np.asarray(observed, dtype=np.float64).reshape(-1)
        order = np.argsort(reg, kind="stable")
        reg_sorted = reg[order]
        cuts = np.searchsorted(reg_sorted, np.arange(self.n + 1))
        for b in range(self.n):
            sel = vals[order[cuts[b]:cuts[b + 1]]]
            if sel.size:
                out[b, 0] = max(float(np.median(sel)), 0.0)
        return out


def _spot_array(spots, n_panels: int):
    """(panel [n] int, fast [n], slow [n] float, strength [n] or None) of a :class:`~nbtorch.io.refl.ReflectionTable`
    (``xyzobs.px.value``, ``panel``, ``intensity.sum.value``) or an array [n, 2] (fast, slow) / [n, 3] (fast, slow,
    panel) in pixels.  ValueError naming what is missing or malformed."""
    if hasattr(spots, "columns"):
        if "xyzobs.px.value" not in spots:
            raise ValueError(f"spots: {spots.source} has no column xyzobs.px.value (the observed spot centroids)")
        xyz = np.asarray(spots["xyzobs.px.value"], dtype=np.float64).reshape(-1, 3)
        panel = np.asarray(spots["panel"], dtype=np.int64) if "panel" in spots else np.zeros(len(xyz), np.int64)
        strength = np.asarray(spots[STRENGTH_COLUMN], dtype=np.float64) if STRENGTH_COLUMN in spots else None
        return panel, xyz[:, 0], xyz[:, 1], strength
    a = np.asarray(spots, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] not in (2, 3):
        raise ValueError(f"spots must be a reflection table or an array [n, 2] (fast, slow px) or [n, 3] (fast, slow, "
                         f"panel); got shape {list(a.shape)}")
    panel = a[:, 2] if a.shape[1] == 3 else np.zeros(len(a))
    if not np.all(panel == np.round(panel)):
        raise ValueError("spots: the panel column must hold integers")
    return panel.astype(np.int64), a[:, 0], a[:, 1], None


def _strongest(strength: Optional[np.ndarray], keep: np.ndarray, max_spots: Optional[int]) -> np.ndarray:
    """Indices of the spots to box: those in ``keep``, the ``max_spots`` strongest (by ``strength``; in table order
    without one) when given."""
    rows = np.flatnonzero(keep)
    if max_spots is None or len(rows) <= max_spots:
        return rows
    if strength is None:
        return rows[:max_spots]
    s = np.where(np.isfinite(strength[rows]), strength[rows], -np.inf)
    return np.sort(rows[np.argsort(-s, kind="stable")[:max_spots]])


def _merged(rects: np.ndarray) -> np.ndarray:
    """Region label [n] of boxes ``rects`` [n, 5] (panel, s0, s1, f0, f1; half-open): boxes on one panel that share a
    pixel, directly or through others, get one label (labels 0 … B − 1 in order of first box)."""
    n = len(rects)
    parent = np.arange(n)

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    p, s0, s1, f0, f1 = rects.T
    for i in range(n):
        hit = np.flatnonzero((p[i + 1:] == p[i]) & (s0[i + 1:] < s1[i]) & (s0[i] < s1[i + 1:])
                             & (f0[i + 1:] < f1[i]) & (f0[i] < f1[i + 1:])) + i + 1
        for j in hit:
            ri, rj = root(i), root(int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([root(i) for i in range(n)])
    return np.unique(roots, return_inverse=True)[1]


def spot_boxes(setup: Setup, spots, roi_size: int = DEFAULT_ROI_SIZE, max_spots: Optional[int] = None) -> SpotBoxes:
    """The :class:`SpotBoxes` of ``spots`` on ``setup``'s detector.

    Args:
        spots: a :class:`~nbtorch.io.refl.ReflectionTable` (its rows are the spots: ``xyzobs.px.value`` fast, slow px;
            ``panel``; ``intensity.sum.value`` orders them for ``max_spots``) or an array [n, 2] (fast, slow) or
            [n, 3] (fast, slow, panel) of pixel coordinates (pixel i spans [i, i + 1)).
        roi_size: the side of each box (pixels, >= 1).
        max_spots: box only the strongest spots (None: every spot).

    Spots off every panel (or NaN) are left out.  ValueError naming the argument: a bad size, no spot on the
    detector."""
    if isinstance(roi_size, bool) or not isinstance(roi_size, (int, np.integer)) or roi_size < 1:
        raise ValueError(f"roi_size must be an integer >= 1 (pixels); got {roi_size!r}")
    if max_spots is not None and (isinstance(max_spots, bool) or not isinstance(max_spots, (int, np.integer))
                                  or max_spots < 1):
        raise ValueError(f"max_spots must be an integer >= 1 or None; got {max_spots!r}")
    shape = tuple(setup.image_shape)
    P, S, F = (1,) + shape if len(shape) == 2 else shape
    sizes = ([(p.spixels, p.fpixels) for p in setup.panels.panels] if setup.panels is not None else [(S, F)])
    panel, fast, slow, strength = _spot_array(spots, P)
    with np.errstate(invalid="ignore"):
        on = (panel >= 0) & (panel < P) & np.isfinite(fast) & np.isfinite(slow)
        ps = np.clip(panel, 0, P - 1)
        lim = np.asarray(sizes, dtype=np.float64)[ps]
        on &= (fast >= 0) & (slow >= 0) & (fast < lim[:, 1]) & (slow < lim[:, 0])
    rows = _strongest(strength, on, max_spots)
    if len(rows) == 0:
        raise ValueError(f"spots: none of the {len(panel)} spots lies on the detector "
                         f"({'panels 0 to ' + str(P - 1) if P > 1 else f'{F} × {S} pixels'})")
    lo = int(roi_size) // 2
    rects = []
    for r in rows:
        p, f, s = int(panel[r]), int(np.floor(fast[r])), int(np.floor(slow[r]))
        ns, nf = sizes[p]
        rects.append((p, max(0, s - lo), min(ns, s - lo + roi_size), max(0, f - lo), min(nf, f - lo + roi_size)))
    rects = np.asarray(rects, dtype=np.int64)
    label = _merged(rects)
    count = int(label.max()) + 1
    region = np.full((P, S, F), -1, dtype=np.int32)
    centres, panels = np.zeros((count, 2)), np.zeros(count, dtype=np.int64)
    lo_c, hi_c = np.full((count, 2), np.inf), np.full((count, 2), -np.inf)
    for (p, s0, s1, f0, f1), b in zip(rects, label):
        region[p, s0:s1, f0:f1] = b
        panels[b] = p
        lo_c[b] = np.minimum(lo_c[b], (f0, s0))
        hi_c[b] = np.maximum(hi_c[b], (f1, s1))
    centres, extent = 0.5 * (lo_c + hi_c), (hi_c - lo_c).max(1)
    return SpotBoxes(region.reshape(shape), centres, panels, extent, int(roi_size), len(rows), len(panel))
