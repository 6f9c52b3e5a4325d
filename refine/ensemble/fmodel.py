"""|F| of the asymmetric unit as parameters, expanded to nbtorch's P1 table, and the restraints (priors) on them.

The parameters are log-scales about a reference (the starting |F| of each reflection class, :mod:`.asu`):
``F_P1[h] = F_ref[asu(h)]·exp(x[asu(h)])``, positive by construction; a class whose reference is 0 and a
systematically absent entry (id −1) keep their table value.  Only the classes that some shot's pixels see are
refined (:attr:`FModel.refined`); the others stay at their start and are reported as such.

Restraints, each ½·w·Σ(…)² with a weight w ≥ 0 (0: off), read as Gaussian priors of standard deviation
1/√w on a log-amplitude (w = 100: ±10 % at one σ):

* ``start``: each ln|F| towards its starting value, ln|F_start| (keeps weakly measured reflections near the model or
  merged data the run started from);
* ``bins``: each ln|F| towards the mean starting ln|F| of its resolution bin (``n_bins`` bins of equal counts in d;
  a Wilson-like prior that keeps each bin's mean level and shrinks outliers towards it);
* ``friedel`` (with ``anomalous``): ln|F(+)| − ln|F(−)| of each acentric pair towards 0 (anomalous differences are
  small).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from .asu import AsuMap, friedel_partner


@dataclasses.dataclass(frozen=True)
class Restraints:
    """Weights (≥ 0, 0 = off) of the restraints above and the number of resolution bins of ``bins``."""

    start: float = 1.0
    bins: float = 0.0
    friedel: float = 0.0
    n_bins: int = 10

    def __post_init__(self):
        for name in ("start", "bins", "friedel"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"restraint weight {name} must be a finite number >= 0; got {v!r}")
        if not (isinstance(self.n_bins, int) and self.n_bins >= 1):
            raise ValueError(f"n_bins must be an integer >= 1; got {self.n_bins!r}")


def class_means(table: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Mean of the flat ``table`` [N] over the entries of each class 0…n−1 of ``ids`` [N] → [n]."""
    ok = ids >= 0
    total = np.bincount(ids[ok], weights=table[ok], minlength=n)
    count = np.bincount(ids[ok], minlength=n)
    return total / np.maximum(count, 1)


def resolution_bins(d: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin number int64 [n] of each d-spacing (Å) [n]: ``n_bins`` bins of (nearly) equal counts, 0 the lowest
    resolution."""
    if len(d) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-d, kind="stable")
    bins = np.empty(len(d), dtype=np.int64)
    bins[order] = np.arange(len(d)) * n_bins // len(d)
    return bins


class FModel:
    """The refinable |F|: ``amap`` (:class:`~refine.ensemble.asu.AsuMap`), ``table_ref`` float64 [N] the flat starting
    P1 table, ``F_ref`` [n] each class's starting |F| (its entries' mean), ``d`` [n] d-spacings (Å) from ``cell``
    (a, b, c Å, α, β, γ degrees), ``refined`` bool [n] (set by the run: classes some pixel sees)."""

    def __init__(self, amap: AsuMap, table_ref: np.ndarray, cell):
        import gemmi

        self.amap, self.cell = amap, tuple(float(v) for v in cell)
        self.table_ref = np.asarray(table_ref, dtype=np.float64).reshape(-1)
        self.ids = amap.ids.reshape(-1)
        self.F_ref = class_means(self.table_ref, self.ids, amap.n)
        uc = gemmi.UnitCell(*[float(v) for v in cell])
        self.d = np.array([uc.calculate_d([int(v) for v in h]) for h in amap.hkl.tolist()], dtype=np.float64)
        self.refined = np.zeros(amap.n, dtype=bool)
        self.partner = friedel_partner(amap)

    @property
    def n(self) -> int:
        """Number of classes."""
        return self.amap.n

    def movable(self) -> np.ndarray:
        """bool [n]: classes that can move at all (reference |F| > 0)."""
        return self.F_ref > 0

    def amplitudes(self, x: torch.Tensor) -> torch.Tensor:
        """|F| [n] of every class at log-scales ``x`` [n]."""
        return torch.as_tensor(self.F_ref, dtype=x.dtype) * torch.exp(x)

    def table(self, x: torch.Tensor) -> torch.Tensor:
        """The flat P1 table [N] (|F|) at ``x`` [n] (differentiable): ``F_ref·exp(x)`` of each entry's class,
        the starting value where the entry has none."""
        ids = torch.as_tensor(self.ids)
        F = self.amplitudes(x).index_select(0, ids.clamp_min(0))
        return torch.where(ids >= 0, F, torch.as_tensor(self.table_ref, dtype=x.dtype))

    def restraint(self, x: torch.Tensor, r: Restraints) -> torch.Tensor:
        """The restraints' value at ``x`` [n] (a differentiable scalar) over the refined classes."""
        on = torch.as_tensor(self.refined & self.movable())
        total = x.new_zeros(())
        if r.start:
            total = total + 0.5 * r.start * (x[on] ** 2).sum()
        if r.bins:
            lnF = torch.log(torch.as_tensor(np.maximum(self.F_ref, 1e-300), dtype=x.dtype)) + x
            target = torch.as_tensor(self._bin_targets(r.n_bins), dtype=x.dtype)
            total = total + 0.5 * r.bins * ((lnF - target)[on] ** 2).sum()
        if r.friedel and self.amap.anomalous:
            a, b = self._pairs()
            lnF = torch.log(torch.as_tensor(np.maximum(self.F_ref, 1e-300), dtype=x.dtype)) + x
            total = total + 0.5 * r.friedel * ((lnF[a] - lnF[b]) ** 2).sum()
        return total

    def restraint_hessian(self, r: Restraints):
        """∂²(restraints)/∂x_a∂x_b as sparse entries (rows int64 [e], cols int64 [e], values [e]; repeated entries
        add), exact everywhere (each restraint is quadratic in x): ``start`` + ``bins`` on the diagonal of the
        refined classes, ``friedel`` w on both diagonal entries of each refined acentric pair and −w on its two
        off-diagonal ones."""
        on = np.flatnonzero(self.refined & self.movable())
        rows, cols, vals = [on], [on], [np.full(len(on), float(r.start) + float(r.bins))]
        if r.friedel and self.amap.anomalous:
            a, b = (t.numpy() for t in self._pairs())
            w = np.full(len(a), float(r.friedel))
            rows, cols, vals = rows + [a, b, a, b], cols + [a, b, b, a], vals + [w, w, -w, -w]
        return (np.concatenate(rows).astype(np.int64), np.concatenate(cols).astype(np.int64),
                np.concatenate(vals))

    def restraint_curvature(self, r: Restraints) -> np.ndarray:
        """∂²(restraints)/∂x_a² [n]: the diagonal of :meth:`restraint_hessian` (0 for a class not refined)."""
        rows, cols, vals = self.restraint_hessian(r)
        on = rows == cols
        return np.bincount(rows[on], weights=vals[on], minlength=self.n).astype(np.float64)

    def _bin_targets(self, n_bins: int) -> np.ndarray:
        """Each class's bin mean of the starting ln|F| (over the movable classes) [n]."""
        ok = self.movable()
        bins = resolution_bins(self.d, n_bins)
        lnF = np.log(np.maximum(self.F_ref, 1e-300))
        mean = np.bincount(bins[ok], weights=lnF[ok], minlength=n_bins) / np.maximum(
            np.bincount(bins[ok], minlength=n_bins), 1)
        return mean[bins]

    def _pairs(self):
        """(plus, minus) class indices of the acentric Friedel pairs that are both refined."""
        ok = self.refined & self.movable()
        a = np.flatnonzero(self.amap.plus & ~self.amap.centric & (self.partner >= 0))
        b = self.partner[a]
        keep = ok[a] & ok[b]
        return torch.as_tensor(a[keep]), torch.as_tensor(b[keep])

    def state(self, x: Optional[torch.Tensor] = None) -> dict:
        """A checkpoint's picture of the model (the space group, anomalous flag, class count and ``x``)."""
        return {"space_group": self.amap.space_group, "anomalous": self.amap.anomalous, "n": self.n,
                "x": None if x is None else x.detach().clone(), "refined": self.refined.copy()}
