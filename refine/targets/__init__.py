"""Targets (losses), masks, pixel selection and the chunked objective that minimisers call.

A *target* turns model pixel values ``m`` and observed values ``o`` (both ``[P]`` photons), with optional per-pixel
weights ``w`` [P], into a loss and the two per-pixel quantities a Gauss–Newton / Fisher-scoring minimiser needs:

* ``dloss(m, o)`` = ∂L/∂m  (so ∇_x L = Jᵀ·dloss with J = ∂m/∂x), and
* ``fisher(m, o)`` = the expected curvature E[∂²L/∂m²] (so JᵀWJ approximates the Hessian).

Targets (``make_target(name)``) are immutable; weights are passed in, never stored by the objective on them:

* ``poisson``  — Poisson negative log-likelihood, reported as half the deviance: L = Σ m − o + o·ln(o/m);
  ∂L/∂m = 1 − o/m, W = 1/m.  The model gets a tiny pedestal (``eps``, default 1e-6 photons) so empty pixels stay
  finite; a negative model value, or zero where o > 0, makes the loss +inf (the step is rejected).
* ``gaussian`` — Gaussian NLL with read noise: variance v = m + σ² (σ = ``read_noise`` photons),
  L = ½ Σ (o − m)²/v + ln v;  W = 1/v + 1/(2v²).
* ``lsq``      — least squares L = ½ Σ w (o − m)² with an optional weight image (``weights``); W = w.
* ``anscombe`` — least squares on variance-stabilised counts, L = ½ Σ (2√(o+⅜) − 2√(m+⅜))², W = 1/(m+⅜): close to
  the Poisson NLL near the solution but bounded far from it (used by the preliminary coarse-to-fine stages).

:class:`Objective` holds the observed pixels that take part (after masks and optional spot selection), splits them
into chunks of :class:`~refine.predict.Predict` models (each renders only its own pixels, so memory is set by the
chunk, not by the detector) and evaluates the model, the loss, the gradient and the normal matrix JᵀWJ with
``torch.func.jacfwd`` chunk by chunk.  A model with a non-finite value gives an infinite loss: the step is rejected.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import ClassVar, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import jacfwd

from nbtorch.io.images import ObservedImage
from nbtorch.simulate import choose_fused
from nbtorch.types import Setup

from ..model.parameters import Parameterisation
from ..model.predict import Predict, pixel_index, plane_basis, predict_image  # noqa: F401  (plane_basis re-exported)

TARGETS = ("poisson", "gaussian", "lsq", "anscombe")


class Target:
    """Base class: a loss over pixels with its first derivative and expected curvature per pixel.

    Subclasses give the unweighted per-pixel ``_terms``, ``_dloss``, ``_fisher`` (and ``_chi2``); the public methods
    take model ``m`` [P], observed ``o`` [P] and optional weights ``w`` [P].  ``likelihood`` is True for proper
    negative log-likelihoods (loss differences are in log-likelihood units and (JᵀWJ)⁻¹ is the covariance without
    rescaling)."""

    name: ClassVar[str] = "target"
    likelihood: ClassVar[bool] = True

    def _terms(self, m, o):  # pragma: no cover - abstract
        raise NotImplementedError

    def _dloss(self, m, o):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fisher(self, m, o):  # pragma: no cover - abstract
        raise NotImplementedError

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
        """Per-pixel weights [n] at flat pixel ``index`` of an image of ``shape`` (None: unweighted)."""
        return None


@dataclasses.dataclass(frozen=True)
class Poisson(Target):
    """Poisson NLL (half deviance) with a pedestal ``eps`` (photons) added to the model."""

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


@dataclasses.dataclass(frozen=True)
class Gaussian(Target):
    """Gaussian NLL with variance m + σ² (σ = ``read_noise``, photons)."""

    name: ClassVar[str] = "gaussian"
    read_noise: float = 1.0

    def __post_init__(self):
        if not self.read_noise >= 0:
            raise ValueError(f"read_noise must be >= 0 photons; got {self.read_noise}")

    def _v(self, m):
        return (m + float(self.read_noise) ** 2).clamp_min(1e-12)

    def _terms(self, m, o):
        v = self._v(m)
        t = 0.5 * ((o - m) ** 2 / v + torch.log(v))
        return torch.where(m + float(self.read_noise) ** 2 > 0, t, torch.full_like(t, math.inf))

    def _dloss(self, m, o):
        v = self._v(m)
        r = o - m
        return -r / v + 0.5 * (1.0 / v - r * r / (v * v))

    def _fisher(self, m, o):
        v = self._v(m)
        return 1.0 / v + 0.5 / (v * v)

    def _chi2(self, m, o):
        return (o - m) ** 2 / self._v(m)


@dataclasses.dataclass(frozen=True)
class Anscombe(Target):
    """Least squares on variance-stabilised values: L = ½ Σ (2√(o + ⅜) − 2√(m + ⅜))².

    For Poisson counts 2√(X + ⅜) has unit variance, so L behaves like a log-likelihood near the optimum, but unlike the
    Poisson NLL it stays bounded where the model is ~0 and photons were observed (point-sampled sinc zeros far from
    the solution): the robust target of the preliminary coarse-to-fine stages."""

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
    """½ Σ w (o − m)² with an optional weight image ``weights`` [slow, fast] (None = all 1).

    Not a likelihood: ESDs are scaled by the reduced χ² (``esd_scale='auto'``)."""

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


def make_target(name: str = "poisson", *, read_noise: float = 0.0, weights=None, eps: float = 1e-6) -> Target:
    """Target by name: 'poisson', 'gaussian' (``read_noise`` σ in photons), 'lsq' (optional ``weights`` image) or
    'anscombe' (variance-stabilised least squares, robust far from the solution); a :class:`Target` is returned as
    is."""
    if isinstance(name, Target):
        return name
    if name == "poisson":
        return Poisson(eps)
    if name == "gaussian":
        return Gaussian(read_noise)
    if name == "lsq":
        return LeastSquares(weights)
    if name == "anscombe":
        return Anscombe()
    raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {name!r}")


# ---------------------------------------------------------------------------------------------------------------
# masks and pixel selection


def observed_array(observed, setup: Setup):
    """An observed image (tensor, array, :class:`nbtorch.io.images.ObservedImage` or a path read with
    :func:`nbtorch.io.images.read_image`, raw files taking their shape from ``setup``) → (float64 array [slow, fast],
    its own mask (bool [slow, fast]) or None)."""
    if isinstance(observed, str) or hasattr(observed, "__fspath__"):
        from .observed import read_observed

        observed = read_observed(os.fspath(observed), setup, label="observed")
    if isinstance(observed, ObservedImage):
        return np.asarray(observed.data, dtype=np.float64), np.asarray(observed.mask, dtype=bool)
    if torch.is_tensor(observed):
        return observed.detach().cpu().double().numpy(), None
    return np.asarray(observed, dtype=np.float64), None


def usable_mask(observed: np.ndarray, setup: Setup, mask=None, overload: Optional[float] = None) -> np.ndarray:
    """Pixels that may enter a fit, bool [slow, fast].

    A pixel is usable when its observed value is finite and ≥ 0 (detector gaps are often negative), below
    ``overload`` (when given), True in the user ``mask`` (bool/0-1 array [slow, fast], True = use), and rendered by
    ``setup`` (inside ``setup.roi`` and not excluded by ``setup.mask``).
    """
    o = np.asarray(observed, dtype=np.float64)
    if o.shape != (setup.spixels, setup.fpixels):
        raise ValueError(f"observed image has shape {o.shape} but the model detector is [slow, fast] = "
                         f"{(setup.spixels, setup.fpixels)}")
    keep = np.isfinite(o) & (np.where(np.isfinite(o), o, -1.0) >= 0.0)
    if overload is not None:
        keep &= o < float(overload)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != o.shape:
            raise ValueError(f"mask has shape {m.shape}, expected {o.shape}")
        keep &= m.astype(bool)
    if setup.roi is not None:
        x0, x1, y0, y1 = setup.roi
        r = np.zeros_like(keep)
        r[max(y0, 0): y1 + 1, max(x0, 0): x1 + 1] = True
        keep &= r
    if setup.mask is not None:
        keep &= np.frombuffer(setup.mask, dtype=np.uint8).reshape(o.shape) != 0
    return keep


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(max(0, int(radius))):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def select_pixels(
    observed: np.ndarray,
    model: np.ndarray,
    usable: np.ndarray,
    *,
    threshold: Optional[float] = None,
    relative: float = 0.01,
    dilate: int = 3,
    background_fraction: float = 0.05,
    seed: int = 0,
) -> np.ndarray:
    """Pixels near spots plus a background sample, bool [slow, fast] (a subset of ``usable``).

    A pixel is a *spot* pixel when the model or the observed value exceeds ``threshold`` (default: the larger of the
    median of the usable observed pixels plus 3·sqrt(median + 1), i.e. three Poisson sigmas above the typical
    background, and ``relative`` × the 99.9th percentile of the model, which keeps the far tails of bright spots
    out); spot pixels are dilated by ``dilate`` pixels (so spots that move during the fit stay inside).  A random
    ``background_fraction`` of the remaining usable pixels (fixed ``seed``) keeps the background and the scale
    determined.  Fitting only these pixels saves time on large, sparse detectors.
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


# ---------------------------------------------------------------------------------------------------------------
# objective


class Chunk(NamedTuple):
    """One chunk of an objective's pixels: its ``model`` (:class:`~refine.predict.Predict`) and its slice ``sl`` of
    the objective's pixel list."""

    model: Predict
    sl: slice


class Objective:
    """Model, loss, gradient and normal equations of one parameterisation on a set of observed pixels.

    Args:
        par: the :class:`~refine.parameters.Parameterisation`.
        observed: observed image [slow, fast] (tensor or array, photons).
        pixels: the pixels that take part: bool [slow, fast] (see :func:`usable_mask`, :func:`select_pixels`) or
            flat slow-major indices.
        target: a :class:`Target`.
        chunk_pixels: pixels per chunk for the Jacobian (bounds memory: about chunk_pixels × n_params tangents).
        setup: the set-up to render (default ``par.setup``); fused: see :func:`nbtorch.simulate.simulate`.

    Only the selected pixels are rendered.  ``x`` vectors have the parameterisation's dtype and length ``par.n``;
    ``active`` (index list) restricts derivatives to a subset.  Nothing is changed after construction.
    """

    def __init__(self, par: Parameterisation, observed, pixels, target: Target, chunk_pixels: int = 16384,
                 setup: Optional[Setup] = None, fused: Optional[bool] = None):
        self.par, self.target = par, target
        self.setup = par.setup if setup is None else setup
        S, F = self.setup.spixels, self.setup.fpixels
        idx = pixel_index(pixels, self.setup)
        if len(idx) == 0:
            raise ValueError("no usable pixels: check the mask, the overload level and the ROI")
        self.idx, self.n_pixels = idx, len(idx)
        obs = observed if torch.is_tensor(observed) else torch.as_tensor(np.asarray(observed, dtype=np.float64))
        if tuple(obs.shape) != (S, F):
            raise ValueError(f"observed image has shape {tuple(obs.shape)}, expected [slow, fast] = {(S, F)}")
        flat = torch.as_tensor(idx, device=obs.device)
        self.o = obs.reshape(-1)[flat].to(dtype=par.dtype, device=par.device)
        self.w = target.pixel_weights(idx, (S, F), par.dtype, par.device)
        if isinstance(chunk_pixels, bool) or not isinstance(chunk_pixels, numbers.Integral) or chunk_pixels < 1:
            raise ValueError(f"chunk_pixels must be an integer >= 1, got {chunk_pixels!r}")
        step = int(chunk_pixels)
        fused = choose_fused(fused, self.setup, len(idx))  # by the work of all chunks: each is rendered many times
        self.chunks: List[Chunk] = [Chunk(Predict(par, self.setup, idx[a:a + step], fused), slice(a, a + step))
                                    for a in range(0, len(idx), step)]
        self.full = Predict(par, self.setup, idx, fused)

    @property
    def pixels(self) -> np.ndarray:
        """bool [slow, fast]: the pixels that take part."""
        out = np.zeros(self.setup.spixels * self.setup.fpixels, dtype=bool)
        out[self.idx] = True
        return out.reshape(self.setup.spixels, self.setup.fpixels)

    def _w(self, sl: slice) -> Optional[torch.Tensor]:
        return None if self.w is None else self.w[sl]

    # -------------------------------------------------------------- model and loss
    def model_chunk(self, x: torch.Tensor, chunk: Chunk, check: bool = False) -> torch.Tensor:
        """Model photons [P_chunk] at ``x`` for one chunk."""
        return chunk.model(x, check)

    def model(self, x: torch.Tensor, check: bool = False) -> torch.Tensor:
        """Model photons at the selected pixels [n_pixels]."""
        return self.full(x, check)

    def model_image(self, x: torch.Tensor) -> torch.Tensor:
        """Model image [slow, fast] at ``x``: every pixel the set-up renders, background plane included."""
        return predict_image(self.par, x, self.setup, self.full.fused)

    def prior_terms(self, x: torch.Tensor):
        """Prior residuals r = (u(x) − mean)/sigma and their derivatives dr/dx, as (indices, r, dr) lists."""
        idx, r, d = [], [], []
        for i, s in enumerate(self.par.scalars):
            if s.prior is not None:
                mean, sigma = s.prior
                xi = float(x[i])
                idx.append(i)
                r.append((float(s.value(torch.tensor(xi, dtype=torch.float64))) - mean) / sigma)
                d.append(s.dvalue_dx(xi) / sigma)
        return idx, r, d

    def prior_loss(self, x: torch.Tensor) -> torch.Tensor:
        """½ Σ prior residuals² (differentiable in x)."""
        tot = x.new_zeros(())
        priors = [(i, s.prior) for i, s in enumerate(self.par.scalars) if s.prior is not None]
        if priors:
            vals = self.par.values(x)
            for i, (mean, sigma) in priors:
                tot = tot + 0.5 * ((vals[i] - mean) / sigma) ** 2
        return tot

    def loss(self, x: torch.Tensor) -> float:
        """Total loss (data + priors) at ``x`` as a float; +inf where the model is not finite (a rejected step)."""
        with torch.no_grad():
            m = self.model(x)
            if not bool(torch.isfinite(m).all()):
                return math.inf
            v = float(self.target.loss(m, self.o, self.w) + self.prior_loss(x))
        return v if math.isfinite(v) else math.inf

    def loss_and_grad(self, x: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Loss and its gradient [n] by reverse mode, chunk by chunk (bounded memory); (inf, partial) where the
        model is not finite."""
        g = torch.zeros_like(x)
        total = 0.0
        for chunk in self.chunks:
            xr = x.detach().clone().requires_grad_(True)
            m = chunk.model(xr)
            Lc = self.target.loss(m, self.o[chunk.sl], self._w(chunk.sl))
            if not (bool(torch.isfinite(m.detach()).all()) and math.isfinite(float(Lc.detach()))):
                return math.inf, g
            (gc,) = torch.autograd.grad(Lc, xr)
            total += float(Lc.detach())
            g += gc
        xr = x.detach().clone().requires_grad_(True)
        Lp = self.prior_loss(xr)
        if Lp.requires_grad:
            (gp,) = torch.autograd.grad(Lp, xr)
            g += gp
        total += float(Lp.detach())
        return (total if math.isfinite(total) else math.inf), g

    def normal_equations(self, x: torch.Tensor, active: Optional[Sequence[int]] = None):
        """Loss, gradient g [k], normal matrix H = JᵀWJ [k, k] (+ prior terms) over the ``active`` parameters
        (default all), and the model [n_pixels], all at ``x``; J by forward mode (``jacfwd``) per pixel chunk.  The
        loss is +inf where the model is not finite."""
        active = list(range(self.par.n)) if active is None else list(active)
        act = torch.as_tensor(active, dtype=torch.long, device=x.device)
        H = torch.zeros(len(active), len(active), dtype=x.dtype, device=x.device)
        g = torch.zeros(len(active), dtype=x.dtype, device=x.device)
        ms = []
        x0 = x.detach()
        for chunk in self.chunks:
            def f(xa, chunk=chunk):
                m = chunk.model(x0.index_put((act,), xa))
                return m, m

            J, m = jacfwd(f, has_aux=True)(x0[act])
            J = J.to(x.dtype)  # torch 2.13 gives a 0-dim tensor × Python float a float64 tangent (float32 fits)
            o, w = self.o[chunk.sl], self._w(chunk.sl)
            H += J.T @ (self.target.fisher(m, o, w)[:, None] * J)
            g += J.T @ self.target.dloss(m, o, w)
            ms.append(m)
        m = torch.cat(ms) if len(ms) > 1 else ms[0]
        L = float(self.target.loss(m, self.o, self.w) + self.prior_loss(x0))
        if not (math.isfinite(L) and bool(torch.isfinite(m).all())):
            L = math.inf
        pos = {a: j for j, a in enumerate(active)}
        for i, r, d in zip(*self.prior_terms(x0)):
            if i in pos:
                H[pos[i], pos[i]] += d * d
                g[pos[i]] += d * r
        return L, g, H, m

    def jacobian(self, x: torch.Tensor, active: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Full Jacobian ∂m/∂x [n_pixels, k] (for small problems and tests)."""
        active = list(range(self.par.n)) if active is None else list(active)
        act = torch.as_tensor(active, dtype=torch.long, device=x.device)
        x0 = x.detach()
        return torch.cat([jacfwd(lambda xa, c=c: c.model(x0.index_put((act,), xa)))(x0[act]).to(x.dtype)
                          for c in self.chunks])

    def likelihood_unit(self, loss: float, n_free: int) -> float:
        """Size of one log-likelihood unit of the loss: 1 for NLL targets, σ̂² = 2L/(n − p) for least squares."""
        if self.target.likelihood:
            return 1.0
        return max(2.0 * loss / max(self.n_pixels - n_free, 1), 1e-300)

    def chi2_reduced(self, m: torch.Tensor, n_free: int) -> float:
        """Pearson χ²/(n − p) of model ``m`` [n_pixels]."""
        return float(self.target.chi2_terms(m, self.o, self.w).sum()) / max(self.n_pixels - n_free, 1)
