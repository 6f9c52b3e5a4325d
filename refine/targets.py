"""Targets (losses), masks, pixel selection and the chunked objective that minimisers call.

A *target* turns model pixel values ``m`` and observed values ``o`` (both ``[P]`` photons) into a loss and the two
per-pixel quantities a Gauss–Newton / Fisher-scoring minimiser needs:

* ``dloss(m, o)`` = ∂L/∂m  (so ∇_x L = Jᵀ·dloss with J = ∂m/∂x), and
* ``fisher(m, o)`` = the expected curvature E[∂²L/∂m²] (so JᵀWJ approximates the Hessian).

Targets (``make_target(name)``):

* ``poisson``  — Poisson negative log-likelihood, reported as half the deviance: L = Σ m − o + o·ln(o/m);
  ∂L/∂m = 1 − o/m, W = 1/m.  The model gets a tiny pedestal (``eps``, default 1e-6 photons) so empty pixels stay
  finite; a negative model value, or zero where o > 0, makes the loss +inf (the step is rejected).
* ``gaussian`` — Gaussian NLL with read noise: variance v = m + σ² (σ = ``read_noise`` photons),
  L = ½ Σ (o − m)²/v + ln v;  W = 1/v + 1/(2v²).
* ``lsq``      — least squares L = ½ Σ w (o − m)² with optional per-pixel weights w; W = w.
* ``anscombe`` — least squares on variance-stabilised counts, L = ½ Σ (2√(o+⅜) − 2√(m+⅜))², W = 1/(m+⅜): close to
  the Poisson NLL near the solution but bounded far from it (used by the preliminary stages of the coarse-to-fine
  strategy).

:class:`Objective` holds the observed pixels that take part (after masks and optional spot selection), splits them
into chunks (each rendered with a ``Setup.mask`` of just its pixels, so memory and time scale with the selected pixels)
and evaluates the model, the loss, the gradient and the normal matrix JᵀWJ with ``torch.func.jacfwd`` chunk by chunk.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import jacfwd

from nbtorch.simulate import simulate
from nbtorch.types import Setup

from .parameters import Parameterisation

TARGETS = ("poisson", "gaussian", "lsq", "anscombe")


class Target:
    """Base class: a loss over pixels with its first derivative and expected curvature per pixel.

    ``likelihood`` is True for proper negative log-likelihoods (loss differences are in log-likelihood units and
    (JᵀWJ)⁻¹ is the covariance without rescaling)."""

    name = "target"
    likelihood = True

    def loss_terms(self, m: torch.Tensor, o: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, m: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Scalar loss of model ``m`` [P] against observed ``o`` [P]."""
        return self.loss_terms(m, o).sum()

    def dloss(self, m, o):  # pragma: no cover - abstract
        raise NotImplementedError

    def fisher(self, m, o):  # pragma: no cover - abstract
        raise NotImplementedError

    def chi2_terms(self, m: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Pearson χ² contributions per pixel (used for the reduced χ²)."""
        return (o - m) ** 2 * self.fisher(m, o)


class Poisson(Target):
    """Poisson NLL (half deviance) with a pedestal ``eps`` (photons) added to the model."""

    name = "poisson"

    def __init__(self, eps: float = 1e-6):
        self.eps = float(eps)

    def loss_terms(self, m, o):
        mm = m + self.eps
        pos = o > 0
        safe = torch.where(mm > 0, mm, torch.ones_like(mm))
        osafe = torch.where(pos, o, torch.ones_like(o))
        t = mm - o + torch.where(pos, o * (torch.log(osafe) - torch.log(safe)), torch.zeros_like(o))
        bad = (mm < 0) | ((mm <= 0) & pos)  # a Poisson mean cannot be negative
        return torch.where(bad, torch.full_like(t, math.inf), t)

    def dloss(self, m, o):
        return 1.0 - o / (m + self.eps)

    def fisher(self, m, o):
        return 1.0 / (m + self.eps)

    def chi2_terms(self, m, o):
        return (o - m) ** 2 / (m + self.eps).clamp_min(1e-3)


class Gaussian(Target):
    """Gaussian NLL with variance m + σ² (σ = read noise, photons)."""

    name = "gaussian"

    def __init__(self, read_noise: float = 1.0):
        if not read_noise >= 0:
            raise ValueError(f"read_noise must be >= 0 photons; got {read_noise}")
        self.var0 = float(read_noise) ** 2

    def _v(self, m):
        return (m + self.var0).clamp_min(1e-12)

    def loss_terms(self, m, o):
        v = self._v(m)
        t = 0.5 * ((o - m) ** 2 / v + torch.log(v))
        return torch.where(m + self.var0 > 0, t, torch.full_like(t, math.inf))

    def dloss(self, m, o):
        v = self._v(m)
        r = o - m
        return -r / v + 0.5 * (1.0 / v - r * r / (v * v))

    def fisher(self, m, o):
        v = self._v(m)
        return 1.0 / v + 0.5 / (v * v)

    def chi2_terms(self, m, o):
        return (o - m) ** 2 / self._v(m)


class Anscombe(Target):
    """Least squares on variance-stabilised values: L = ½ Σ (2√(o + ⅜) − 2√(m + ⅜))².

    For Poisson counts 2√(X + ⅜) has unit variance, so L behaves like a log-likelihood near the optimum, but unlike the
    Poisson NLL it stays bounded where the model is ~0 and photons were observed (point-sampled sinc zeros far from
    the solution): the default robust target of the preliminary coarse-to-fine stages."""

    name = "anscombe"

    def _s(self, m):
        return torch.sqrt(torch.clamp(m + 0.375, min=1e-12))

    def loss_terms(self, m, o):
        r = 2.0 * (torch.sqrt(torch.clamp(o, min=0) + 0.375) - self._s(m))
        t = 0.5 * r * r
        return torch.where(m + 0.375 > 0, t, torch.full_like(t, math.inf))

    def dloss(self, m, o):
        sm = self._s(m)
        return -2.0 * (torch.sqrt(torch.clamp(o, min=0) + 0.375) - sm) / sm

    def fisher(self, m, o):
        return 1.0 / (self._s(m) ** 2)


class LeastSquares(Target):
    """½ Σ w (o − m)² with optional per-pixel weights ``weights`` (image [slow, fast] or None = all 1).

    Not a likelihood: ESDs are scaled by the reduced χ² (``esd_scale='auto'``)."""

    name = "lsq"
    likelihood = False

    def __init__(self, weights=None):
        self.weights = weights
        self.w = None  # weights of the selected pixels, set by Objective

    def _w(self, m):
        if self.w is None:
            return torch.ones_like(m)
        if self.w.shape != m.shape:
            raise ValueError("least-squares weights do not match the pixels (use Objective)")
        return self.w.to(m)

    def loss_terms(self, m, o):
        return 0.5 * self._w(m) * (o - m) ** 2

    def dloss(self, m, o):
        return -self._w(m) * (o - m)

    def fisher(self, m, o):
        return self._w(m)

    def subset(self, sl):
        """A copy restricted to the selected pixels ``sl`` (slice)."""
        out = LeastSquares(self.weights)
        out.w = None if self.w is None else self.w[sl]
        return out


def make_target(name: str = "poisson", *, read_noise: float = 0.0, weights=None, eps: float = 1e-6) -> Target:
    """Target by name: 'poisson', 'gaussian' (``read_noise`` σ in photons), 'lsq' (optional ``weights``) or
    'anscombe' (variance-stabilised least squares, robust far from the solution)."""
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
    background, and ``relative`` × the 99.9th percentile of the model, which keeps the far tails of bright spots out); spot
    pixels are dilated by ``dilate`` pixels (so spots that move during the fit stay inside).  A random
    ``background_fraction`` of the remaining usable pixels (fixed ``seed``) keeps the background and the scale
    determined.  Fitting only these pixels with a ``Setup.mask`` saves time on large, sparse detectors.
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


def plane_basis(setup: Setup, dtype=torch.float64, device=None) -> torch.Tensor:
    """Background-plane basis [3, slow·fast]: 1, u, v with u, v ∈ [−½, ½] the fast/slow pixel-centre coordinates."""
    F, S = setup.fpixels, setup.spixels
    f = (torch.arange(F, dtype=dtype, device=device) + 0.5) / F - 0.5
    s = (torch.arange(S, dtype=dtype, device=device) + 0.5) / S - 0.5
    u = f[None, :].expand(S, F).reshape(-1)
    v = s[:, None].expand(S, F).reshape(-1)
    return torch.stack([torch.ones_like(u), u, v])


# ---------------------------------------------------------------------------------------------------------------
# objective


class Objective:
    """Model, loss, gradient and normal equations of one parameterisation on a set of observed pixels.

    Args:
        par: the :class:`~refine.parameters.Parameterisation` (its ``setup`` is the model's set-up).
        observed: observed image [slow, fast] (tensor or array, photons).
        pixels: bool [slow, fast] of the pixels that take part (see :func:`usable_mask`, :func:`select_pixels`).
        target: a :class:`Target`.
        chunk_pixels: pixels per chunk for the Jacobian (bounds memory: about chunk_pixels × n_params tangents).

    The pixels are rendered through ``Setup.mask`` (only selected pixels are simulated).  ``x`` vectors have the
    parameterisation's dtype and length ``par.n``; ``active`` (index list) restricts derivatives to a subset.
    """

    def __init__(self, par: Parameterisation, observed, pixels: np.ndarray, target: Target, chunk_pixels: int = 16384):
        self.par = par
        self.setup = par.setup
        self.target = target
        S, F = self.setup.spixels, self.setup.fpixels
        pixels = np.asarray(pixels, dtype=bool)
        if pixels.shape != (S, F):
            raise ValueError(f"pixel selection has shape {pixels.shape}, expected {(S, F)}")
        idx = np.flatnonzero(pixels.reshape(-1))
        if len(idx) == 0:
            raise ValueError("no usable pixels: check the mask, the overload level and the ROI")
        self.pixels = pixels
        self.idx = idx
        self.n_pixels = len(idx)
        obs = torch.as_tensor(np.asarray(observed, dtype=np.float64) if not torch.is_tensor(observed) else
                              observed.detach().cpu().numpy().astype(np.float64))
        self.observed_image = obs.to(dtype=par.dtype, device=par.device)
        self.o = self.observed_image.reshape(-1)[torch.as_tensor(idx, device=par.device)]
        self.target = target
        if isinstance(target, LeastSquares) and target.weights is not None:
            w = torch.as_tensor(np.asarray(target.weights, dtype=np.float64)).to(par.dtype)
            if w.shape != (S, F) or not bool((w >= 0).all()):
                raise ValueError(f"least-squares weights must be a non-negative image of shape {(S, F)}")
            self.target = LeastSquares(target.weights)
            self.target.w = w.reshape(-1)[torch.as_tensor(idx)].to(par.device)
        self.basis = plane_basis(self.setup, par.dtype, par.device)[:, torch.as_tensor(idx, device=par.device)]
        self.with_plane = par.has_plane()
        chunk_pixels = max(1, int(chunk_pixels))
        self.chunks: List[Tuple[Setup, torch.Tensor, slice]] = []
        for start in range(0, len(idx), chunk_pixels):
            sl = slice(start, min(start + chunk_pixels, len(idx)))
            self.chunks.append((self._setup_for(idx[sl]), torch.as_tensor(idx[sl], device=par.device), sl))
        self.full = (self._setup_for(idx), torch.as_tensor(idx, device=par.device), slice(0, len(idx)))

    def _setup_for(self, flat: np.ndarray) -> Setup:
        S, F = self.setup.spixels, self.setup.fpixels
        if len(flat) == S * F and self.setup.mask is None and self.setup.roi is None:
            return self.setup
        m = np.zeros(S * F, dtype=np.uint8)
        m[flat] = 1
        return self.setup.replace(mask=m.tobytes(), roi=None)

    def _target(self, chunk) -> Target:
        t = self.target
        return t.subset(chunk[2]) if isinstance(t, LeastSquares) and t.w is not None else t

    # -------------------------------------------------------------- model and loss
    def model_chunk(self, x: torch.Tensor, chunk, check: bool = False) -> torch.Tensor:
        """Model photons [P_chunk] at ``x`` for one chunk (setup, flat pixel indices, slice)."""
        setup, flat, sl = chunk
        img = simulate(self.par.unpack(x), setup, check=check).reshape(-1)
        m = img.index_select(0, flat) if len(flat) != img.numel() else img
        if self.with_plane:
            m = m + self.par.plane(x) @ self.basis[:, sl]
        return m

    def model(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Model photons at the selected pixels [n_pixels] (one simulate call)."""
        return self.model_chunk(x, self.full, check=check)

    def model_image(self, x: torch.Tensor, full: bool = True) -> torch.Tensor:
        """Model image [slow, fast] at ``x``: every pixel the set-up renders (``full``), plus the background plane."""
        with torch.no_grad():
            p = self.par.unpack(x)
            img = simulate(p, self.setup if full else self.full[0])
            if self.with_plane:
                basis = plane_basis(self.setup, self.par.dtype, self.par.device)
                img = img + (self.par.plane(x) @ basis).reshape(img.shape)
        return img

    def prior_terms(self, x: torch.Tensor):
        """Prior residuals r [k] = (u(x) − mean)/sigma and their derivatives dr/dx (as (index, value) lists)."""
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
        vals = None
        for i, s in enumerate(self.par.scalars):
            if s.prior is not None:
                if vals is None:
                    vals = self.par.values(x)
                mean, sigma = s.prior
                tot = tot + 0.5 * ((vals[i] - mean) / sigma) ** 2
        return tot

    def loss(self, x: torch.Tensor) -> float:
        """Total loss (data + priors) at ``x`` as a float; +inf if the model is invalid there."""
        try:
            with torch.no_grad():
                m = self.model(x, check=True)
                L = self.target.loss(m, self.o) + self.prior_loss(x)
        except ValueError:
            return math.inf
        v = float(L)
        return v if math.isfinite(v) else math.inf

    def loss_and_grad(self, x: torch.Tensor) -> Tuple[float, torch.Tensor]:
        """Loss and its gradient [n] by reverse mode, chunk by chunk (bounded memory)."""
        g = torch.zeros_like(x)
        total = 0.0
        try:
            for chunk in self.chunks:
                xr = x.detach().clone().requires_grad_(True)
                Lc = self._target(chunk).loss(self.model_chunk(xr, chunk, check=False), self.o[chunk[2]])
                (gc,) = torch.autograd.grad(Lc, xr)
                total += float(Lc.detach())
                g += gc
            xr = x.detach().clone().requires_grad_(True)
            Lp = self.prior_loss(xr)
            if Lp.requires_grad:
                (gp,) = torch.autograd.grad(Lp, xr)
                g += gp
            total += float(Lp.detach())
        except ValueError:
            return math.inf, g
        return (total if math.isfinite(total) else math.inf), g

    def normal_equations(self, x: torch.Tensor, active: Optional[Sequence[int]] = None):
        """Loss, gradient g [k], normal matrix H = JᵀWJ [k, k] (+ prior terms) over the ``active`` parameters
        (default all), and the model [n_pixels], all at ``x``; J by forward mode (``jacfwd``) per pixel chunk."""
        active = list(range(self.par.n)) if active is None else list(active)
        k = len(active)
        act = torch.as_tensor(active, dtype=torch.long, device=x.device)
        H = torch.zeros(k, k, dtype=x.dtype, device=x.device)
        g = torch.zeros(k, dtype=x.dtype, device=x.device)
        ms = []
        x0 = x.detach()

        for chunk in self.chunks:
            def f(xa, chunk=chunk):
                xf = x0.index_put((act,), xa)
                m = self.model_chunk(xf, chunk, check=False)
                return m, m

            J, m = jacfwd(f, has_aux=True)(x0[act])
            o = self.o[chunk[2]]
            tg = self._target(chunk)
            w = tg.fisher(m, o)
            H += J.T @ (w[:, None] * J)
            g += J.T @ tg.dloss(m, o)
            ms.append(m)
        m = torch.cat(ms) if len(ms) > 1 else ms[0]
        L = self.target.loss(m, self.o) + self.prior_loss(x0)
        pidx, pr, pd = self.prior_terms(x0)
        pos = {a: j for j, a in enumerate(active)}
        for i, r, d in zip(pidx, pr, pd):
            if i in pos:
                j = pos[i]
                H[j, j] += d * d
                g[j] += d * r
        return float(L), g, H, m

    def jacobian(self, x: torch.Tensor, active: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Full Jacobian ∂m/∂x [n_pixels, k] (for small problems and tests)."""
        active = list(range(self.par.n)) if active is None else list(active)
        act = torch.as_tensor(active, dtype=torch.long, device=x.device)
        x0 = x.detach()
        Js = []
        for chunk in self.chunks:
            Js.append(jacfwd(lambda xa, chunk=chunk: self.model_chunk(x0.index_put((act,), xa), chunk))(x0[act]))
        return torch.cat(Js)

    def likelihood_unit(self, loss: float, n_free: int) -> float:
        """Size of one log-likelihood unit of the loss: 1 for NLL targets, σ̂² = 2L/(n − p) for least squares."""
        if self.target.likelihood:
            return 1.0
        return max(2.0 * loss / max(self.n_pixels - n_free, 1), 1e-300)

    def chi2_reduced(self, m: torch.Tensor, n_free: int) -> float:
        """Pearson χ²/(n − p) of model ``m`` [n_pixels]."""
        return float(self.target.chi2_terms(m, self.o).sum()) / max(self.n_pixels - n_free, 1)
