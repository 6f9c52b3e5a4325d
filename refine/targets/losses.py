"""Targets (losses): per-pixel loss, ∂L/∂m and expected curvature of a model against observed photons.

A target turns model ``m`` and observed ``o`` values ([P] photons), with optional per-pixel weights ``w`` [P], into a
loss and what a Fisher-scoring minimiser needs: ``dloss`` = ∂L/∂m (∇_x L = Jᵀ·dloss, J = ∂m/∂x) and ``fisher`` = the
expected curvature E[∂²L/∂m²] (JᵀWJ approximates the Hessian).  The formulas of 'poisson', 'gaussian', 'lsq' and
'anscombe' are tabulated in docs/refine.md ("Targets"); a detector's read-out noise in photons comes from
:mod:`.detector`.  Targets are immutable; weights are passed in, never stored.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Optional

import numpy as np
import torch


class Target:
    """Base class: a loss over pixels with its first derivative and expected curvature per pixel.

    Subclasses give the unweighted per-pixel ``_terms``, ``_dloss``, ``_fisher`` (and ``_chi2``) of model ``m`` [P]
    and observed ``o`` [P]; the public methods apply optional weights ``w`` [P].  ``likelihood`` is True for proper
    negative log-likelihoods (loss differences are in log-likelihood units and (JᵀWJ)⁻¹ is the covariance without
    rescaling)."""

    name: ClassVar[str] = "target"
    likelihood: ClassVar[bool] = True

    def _chi2(self, m, o):
        return (o - m) ** 2 * self._fisher(m, o)

    @staticmethod
    def _weighted(t, w):
        return t if w is None else w * t

    def loss_terms(self, m: torch.Tensor, o: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-pixel loss [P]."""
        return self._weighted(self._terms(m, o), w)

    def loss(self, m: torch.Tensor, o: torch.Tensor, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scalar loss of model ``m`` [P] against observed ``o`` [P]."""
        return self.loss_terms(m, o, w).sum()

    def dloss(self, m, o, w=None):
        """∂L/∂m per pixel [P]."""
        return self._weighted(self._dloss(m, o), w)

    def fisher(self, m, o, w=None):
        """Expected curvature E[∂²L/∂m²] per pixel [P]."""
        return self._weighted(self._fisher(m, o), w)

    def chi2_terms(self, m: torch.Tensor, o: torch.Tensor, w=None) -> torch.Tensor:
        """Pearson χ² contributions per pixel [P] (used for the reduced χ²)."""
        return self._weighted(self._chi2(m, o), w)

    def pixel_weights(self, index: np.ndarray, shape, dtype=torch.float64, device=None) -> Optional[torch.Tensor]:
        """The target's per-pixel data ``w`` [n] at flat pixel ``index`` of an image of ``shape`` (None: none): a
        weight on each pixel's terms (lsq), or what a subclass says (:class:`Gaussian`: σ²)."""
        return None

    def lowest_observed(self, shape):
        """The least observed value (photons) that is a measurement for this target: a number, or an array of
        ``shape`` (0: photon counts are never negative; a lower value is a detector gap)."""
        return 0.0


@dataclasses.dataclass(frozen=True)
class Poisson(Target):
    """Poisson NLL (half deviance) with a pedestal ``eps`` (photons) added to the model: L = Σ m − o + o·ln(o/m), +inf
    where the model is negative, or zero where o > 0."""

    name: ClassVar[str] = "poisson"
    eps: float = 1e-6

    def _terms(self, m, o):
        mm = m + self.eps
        pos = o > 0
        safe = torch.where(mm > 0, mm, torch.ones_like(mm))
        osafe = torch.where(pos, o, torch.ones_like(o))
        t = mm - o + torch.where(pos, o * (torch.log(osafe) - torch.log(safe)), torch.zeros_like(o))
        bad = (mm < 0) | ((mm <= 0) & pos)  # a Poisson mean cannot be negative
        return torch.where(bad, torch.full_like(t, math.inf), t)

    def _dloss(self, m, o):
        return 1.0 - o / (m + self.eps)

    def _fisher(self, m, o):
        return 1.0 / (m + self.eps)

    def _chi2(self, m, o):
        return (o - m) ** 2 / (m + self.eps).clamp_min(1e-3)


@dataclasses.dataclass(frozen=True, eq=False)
class Gaussian(Target):
    """The Gaussian–Poisson NLL: L = ½ Σ (o − m)²/v + ln v with v = m + σ², σ the read-out noise in photons —
    ``read_noise`` (one number) or ``read_noise_map`` (an image of σ per pixel, photons; ``inf`` where a pixel is no
    measurement).  A detector of gain g (ADU per photon) and read-out noise σ_r (ADU) has σ = σ_r/g: its variance in
    ADU is g·(g·m) + σ_r² (:func:`refine.targets.detector.read_noise_photons`).  With a map, the per-pixel data ``w``
    of the public methods is σ² at those pixels (:meth:`pixel_weights`), not a weight."""

    name: ClassVar[str] = "gaussian"
    read_noise: float = 1.0
    read_noise_map: object = None

    def __post_init__(self):
        if not (isinstance(self.read_noise, (int, float)) and self.read_noise >= 0 and math.isfinite(self.read_noise)):
            raise ValueError(f"read_noise must be a finite number >= 0 photons; got {self.read_noise!r}")
        if self.read_noise_map is not None:
            sig = np.asarray(self.read_noise_map, dtype=np.float64)
            if sig.ndim < 2 or np.isnan(sig).any() or (sig < 0).any():
                raise ValueError("read_noise_map must be an image of σ >= 0 photons per pixel (inf: left out)")
            object.__setattr__(self, "read_noise_map", sig)

    def _s2(self, w):
        return float(self.read_noise) ** 2 if w is None else w

    def _terms(self, m, o, s2=None):
        s2 = self._s2(s2)
        v = (m + s2).clamp_min(1e-12)
        t = 0.5 * ((o - m) ** 2 / v + torch.log(v))
        return torch.where(m + s2 > 0, t, torch.full_like(t, math.inf))

    def _dloss(self, m, o, s2=None):
        v = (m + self._s2(s2)).clamp_min(1e-12)
        r = o - m
        return -r / v + 0.5 * (1.0 / v - r * r / (v * v))

    def _fisher(self, m, o, s2=None):
        v = (m + self._s2(s2)).clamp_min(1e-12)
        return 1.0 / v + 0.5 / (v * v)

    def _chi2(self, m, o, s2=None):
        return (o - m) ** 2 / (m + self._s2(s2)).clamp_min(1e-12)

    def loss_terms(self, m, o, w=None):
        """Per-pixel loss [P] (``w``: σ² per pixel with a map, else None)."""
        return self._terms(m, o, w)

    def dloss(self, m, o, w=None):
        """∂L/∂m per pixel [P]."""
        return self._dloss(m, o, w)

    def fisher(self, m, o, w=None):
        """Expected curvature E[∂²L/∂m²] per pixel [P]."""
        return self._fisher(m, o, w)

    def chi2_terms(self, m, o, w=None):
        """Pearson χ² contributions (o − m)²/v per pixel [P]: expectation 1 each on a correct model."""
        return self._chi2(m, o, w)

    def pixel_weights(self, index, shape, dtype=torch.float64, device=None):
        """σ² (photons²) at flat pixel ``index`` [n] of the map (ValueError unless the map has ``shape``), or None
        without a map."""
        if self.read_noise_map is None:
            return None
        sig = self.read_noise_map
        if tuple(sig.shape) != tuple(shape):
            raise ValueError(f"read_noise_map has shape {list(sig.shape)} but the image is {list(shape)}")
        return torch.as_tensor(sig.reshape(-1)[np.asarray(index)] ** 2, dtype=dtype, device=device)

    def lowest_observed(self, shape):
        """−6σ: a detector with read-out noise measures negative values about a zero background."""
        if self.read_noise_map is None:
            return -6.0 * float(self.read_noise)
        return np.broadcast_to(np.where(np.isfinite(self.read_noise_map), -6.0 * self.read_noise_map, math.inf),
                               tuple(shape))


@dataclasses.dataclass(frozen=True)
class Anscombe(Target):
    """Least squares on variance-stabilised values, L = ½ Σ (2√(o + ⅜) − 2√(m + ⅜))²: like the Poisson NLL near the
    optimum, bounded where the model is ~0 and photons were observed (the robust target of the coarse stages)."""

    name: ClassVar[str] = "anscombe"

    def _s(self, m):
        return torch.sqrt(torch.clamp(m + 0.375, min=1e-12))

    def _terms(self, m, o):
        r = 2.0 * (torch.sqrt(torch.clamp(o, min=0) + 0.375) - self._s(m))
        t = 0.5 * r * r
        return torch.where(m + 0.375 > 0, t, torch.full_like(t, math.inf))

    def _dloss(self, m, o):
        sm = self._s(m)
        return -2.0 * (torch.sqrt(torch.clamp(o, min=0) + 0.375) - sm) / sm

    def _fisher(self, m, o):
        return 1.0 / (self._s(m) ** 2)


@dataclasses.dataclass(frozen=True, eq=False)
class LeastSquares(Target):
    """½ Σ w (o − m)² with an optional weight image ``weights`` [slow, fast] (None = all 1); not a likelihood."""

    name: ClassVar[str] = "lsq"
    likelihood: ClassVar[bool] = False
    weights: object = None

    def _terms(self, m, o):
        return 0.5 * (o - m) ** 2

    def _dloss(self, m, o):
        return -(o - m)

    def _fisher(self, m, o):
        return torch.ones_like(m)

    def pixel_weights(self, index, shape, dtype=torch.float64, device=None):
        """The weight image's values [n] at flat pixel ``index`` (ValueError unless it is a non-negative image of
        ``shape``)."""
        if self.weights is None:
            return None
        w = torch.as_tensor(np.asarray(self.weights, dtype=np.float64))
        if tuple(w.shape) != tuple(shape) or not bool((w >= 0).all()):
            raise ValueError(f"least-squares weights must be a non-negative image of shape {tuple(shape)}")
        return w.reshape(-1)[torch.as_tensor(index)].to(dtype=dtype, device=device)


#: Each target by name, made from (read_noise, weights, eps, read_noise_map).
_MAKERS = {"poisson": lambda r, w, e, rm: Poisson(e), "gaussian": lambda r, w, e, rm: Gaussian(r, rm),
           "lsq": lambda r, w, e, rm: LeastSquares(w), "anscombe": lambda r, w, e, rm: Anscombe()}
TARGETS = tuple(_MAKERS)


def make_target(name: str = "poisson", *, read_noise: float = 0.0, weights=None, eps: float = 1e-6,
                read_noise_map=None) -> Target:
    """Target by name: 'poisson', 'gaussian' (the Gaussian–Poisson likelihood: ``read_noise`` σ in photons, or
    ``read_noise_map`` σ per pixel), 'lsq' (optional ``weights`` image) or 'anscombe' (variance-stabilised least
    squares, robust far from the solution); a :class:`Target` is returned as is."""
    if isinstance(name, Target):
        return name
    if name not in _MAKERS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {name!r}")
    return _MAKERS[name](read_noise, weights, eps, read_noise_map)
