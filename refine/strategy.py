"""Coarse-to-fine strategy: broadened-spot stages, a beam-centre translation search, and linear pre-fits.

A sharp still has a narrow basin: with N ≈ 5–10 cells, spots are one or two pixels wide, so a beam centre that is
2–3 pixels off leaves model and observed spots without overlap, and the cell/distance pair (almost degenerate on a
small detector) drifts when everything is free at once.  :func:`default_stages` therefore refines in stages:

1. ``search`` — with spots broadened (N × 0.5, fluence × 2³ so the integrated intensity is unchanged) the scale (and
   the constant background) are pre-fitted by linear least squares, then, if the beam centre is free, the global
   translation between the observed and model images is found by FFT cross-correlation (within ±``max_shift``
   pixels, sub-pixel by a parabola through the peak) and converted to a beam-centre shift through the Jacobian of
   the direct-beam pixel position.  No iterations.
2. ``coarse`` (N × 0.3) and ``medium`` (N × 0.6) — minimisation of the geometry only (orientation, distance,
   beam centre, detector tilts, two-theta, scale, background); cell, wavelength, N and mosaic stay fixed so that the
   nearly degenerate cell/distance/wavelength directions cannot drift while spots are blurred.
3. ``robust`` — every free group with the real spot model, still on the variance-stabilised target.
4. ``fine`` — every free group with the real model and the requested target (Poisson by default), to convergence.

Stages 2–3 are confined to a trust region (:data:`TRUST` typical errors of each scalar from where the stage starts)
so that a blurred or robust stage cannot run off along a nearly flat direction.  They use the ``anscombe`` target (least squares on 2√(counts + ⅜)): with point-sampled sinc spots a model
that is slightly off puts exact zeros on bright pixels, where the Poisson NLL has log singularities that make its
landscape rough; the variance-stabilised residual stays bounded there and has nearly the same optimum.

The broadening works in log space for N, so the increments x carry over between stages unchanged (N_stage =
f·N_ref·e^x).  Stages whose active groups are not free are skipped, and so are the broadened stages when no group
that moves spots (orientation, distance, beam centre, detector rotations, two-theta) is free: a broadened model
cannot help fitting, e.g., the scale or the background alone.  ``coarse_to_fine=False`` runs only ``fine``;
a list of :class:`Stage` replaces the default.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.func import jacfwd

from nbtorch.detector import detector_frame
from nbtorch.types import Params, Setup

#: Groups refined while spots are broadened (never cell, wavelength, ncells, mosaic).
GEOMETRY_GROUPS = ("orientation", "distance", "beam_center", "detector_rotation", "twotheta", "scale", "background")
#: Default trust region of the preliminary stages, in typical errors (orientation 2 mrad, distance 0.5 mm, beam centre
#: one pixel, cell 0.5 %, tilts 2 mrad, ln-scale 0.1 …): 10 typical errors per stage.
TRUST = 10.0
#: Convergence tolerance of the preliminary stages (log-likelihood units): they only have to bring the model into the
#: basin of the final stage.
PRELIMINARY_FTOL = 0.5
#: A broadened stage runs only when one of these is free (spot positions to find); otherwise it is skipped.
POSITION_GROUPS = ("orientation", "distance", "beam_center", "detector_rotation", "twotheta")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a refinement.

    ``name``; ``ncells_factor`` (N_stage = factor·N, not below min(N, 1); the fluence is divided by the same factor
    per axis so integrated spot intensities are unchanged); ``mosaic_factor`` (mosaic spread × factor);
    ``shape`` (None = the model's, or 'square' | 'round' | 'gauss' | 'tophat'); ``active`` (groups refined in this
    stage, None = all free groups); ``max_iter`` (None = the fit's ``max_iter``; 0 = no minimisation);
    ``search_beam_center`` (run :func:`search_geometry` first: distance grid × beam-centre translation);
    ``prefit_scale`` (linear pre-fit of scale and constant background); ``target`` (None = the fit's target, or a
    target name such as 'anscombe'); ``trust`` (None, or a trust region: every scalar except the linear background
    may move at most ``trust`` × its typical error from where the stage starts); ``ftol`` (None = the fit's
    convergence tolerance, in log-likelihood units).  A stage with broadened spots (``ncells_factor`` or ``mosaic_factor`` ≠ 1,
    or another shape) that would minimise runs only when a group moving the spots (:data:`POSITION_GROUPS`) is free.
    """

    name: str = "fine"
    ncells_factor: float = 1.0
    mosaic_factor: float = 1.0
    shape: Optional[str] = None
    active: Optional[Tuple[str, ...]] = None
    max_iter: Optional[int] = None
    search_beam_center: bool = False
    prefit_scale: bool = False
    target: Optional[str] = None
    trust: Optional[float] = None
    ftol: Optional[float] = None

    @property
    def broadened(self) -> bool:
        """True when the stage changes the spot model (N, mosaic or shape)."""
        return self.ncells_factor != 1.0 or self.mosaic_factor != 1.0 or self.shape is not None


def default_stages(coarse_iter: int = 8, robust_iter: int = 10) -> List[Stage]:
    """The default coarse-to-fine schedule (see the module docstring)."""
    return [
        Stage("search", ncells_factor=0.5, max_iter=0, search_beam_center=True, prefit_scale=True),
        Stage("coarse", ncells_factor=0.3, active=GEOMETRY_GROUPS, max_iter=coarse_iter, target="anscombe",
              trust=TRUST, ftol=PRELIMINARY_FTOL),
        Stage("medium", ncells_factor=0.6, active=GEOMETRY_GROUPS, max_iter=coarse_iter, target="anscombe",
              trust=TRUST, ftol=PRELIMINARY_FTOL),
        Stage("robust", max_iter=robust_iter, target="anscombe", trust=TRUST, ftol=PRELIMINARY_FTOL),
        Stage("fine"),
    ]


def apply_stage(params: Params, setup: Setup, stage: Stage) -> Tuple[Params, Setup]:
    """The stage's model: N scaled (with the fluence compensated so integrated spot intensities stay the same, and the
    water size so the water background stays the same), mosaic spread scaled, shape replaced."""
    if stage.ncells_factor == 1.0 and stage.mosaic_factor == 1.0 and (stage.shape is None or
                                                                     stage.shape == setup.shape):
        return params, setup
    c, b = params.crystal, params.beam
    N = c.ncells
    if stage.ncells_factor != 1.0:
        floor = torch.clamp(N, max=1.0)
        Ns = torch.maximum(N * stage.ncells_factor, floor)
        fluence = b.fluence * torch.prod(N / Ns)
    else:
        Ns, fluence = N, b.fluence
    spread = c.mosaic_spread * stage.mosaic_factor
    # nanoBragg's water term scales as water_size³·fluence² (spec Q10): keep it unchanged when the fluence changes
    water = params.background.water_size * (b.fluence / fluence) ** (2.0 / 3.0)
    p = params._replace(crystal=c._replace(ncells=Ns, mosaic_spread=spread), beam=b._replace(fluence=fluence),
                        background=params.background._replace(water_size=water))
    s = setup if stage.shape is None or stage.shape == setup.shape else setup.replace(shape=stage.shape)
    return p, s


def _prepared(image: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Mean-subtracted square root of an image, zero outside the usable pixels (what the correlation compares)."""
    a = np.where(usable, np.sqrt(np.clip(np.nan_to_num(image), 0, None)), 0.0)
    return np.where(usable, a - a[usable].mean(), 0.0) if usable.any() else a


def translation_search(observed: np.ndarray, model: np.ndarray, usable: np.ndarray, max_shift: int = 8,
                       _observed_fft=None):
    """Global translation (fast, slow) in pixels by which the observed pattern is displaced from the model.

    FFT cross-correlation of the mean-subtracted square roots of both images (unusable pixels zeroed, zero-padded so
    nothing wraps), peak searched within ±``max_shift`` pixels, refined to sub-pixel by a parabola through the peak
    and its neighbours.  Returns ``(df, ds, score)`` with score the normalised correlation at the peak.
    """
    if not usable.any():
        return 0.0, 0.0, 0.0
    S, F = model.shape
    if _observed_fft is None:
        o = _prepared(observed, usable)
        _observed_fft = (np.fft.rfft2(o, s=(2 * S, 2 * F)), float((o * o).sum()))
    fo, oo = _observed_fft
    m = _prepared(model, usable)
    C = np.fft.irfft2(fo * np.conj(np.fft.rfft2(m, s=(2 * S, 2 * F))), s=(2 * S, 2 * F))
    C = np.fft.fftshift(C)  # zero displacement at (S, F)
    r = int(max(0, min(max_shift, S - 1, F - 1)))
    win = C[S - r: S + r + 1, F - r: F + r + 1]
    i, j = np.unravel_index(int(np.argmax(win)), win.shape)

    def vertex(cm, c0, cp):
        den = cm - 2.0 * c0 + cp
        return 0.0 if den >= 0 else float(np.clip(0.5 * (cm - cp) / den, -0.5, 0.5))

    di = vertex(win[i - 1, j], win[i, j], win[i + 1, j]) if 0 < i < win.shape[0] - 1 else 0.0
    dj = vertex(win[i, j - 1], win[i, j], win[i, j + 1]) if 0 < j < win.shape[1] - 1 else 0.0
    norm = math.sqrt(oo * float((m * m).sum())) or 1.0
    return j - r + dj, i - r + di, float(win[i, j]) / norm


def direct_beam_pixel(params: Params, setup: Setup) -> torch.Tensor:
    """Where the direct beam meets the detector plane, (fast, slow) in pixels from the outer corner of pixel (0, 0)."""
    fr = detector_frame(params.detector, setup)
    b = torch.tensor(setup.beam, dtype=fr.pix0.dtype, device=fr.pix0.device)
    t = (fr.pix0 * fr.odet).sum(-1) / (b * fr.odet).sum(-1)
    P = t[..., None] * b - fr.pix0
    return torch.stack([(P * fr.fdet).sum(-1), (P * fr.sdet).sum(-1)], -1) / setup.pixel_size


def beam_center_shift(par, x: torch.Tensor, shift_px: Sequence[float]) -> torch.Tensor:
    """Increments x with the beam centre moved so that the pattern moves by ``shift_px`` (fast, slow) pixels.

    Moving the beam centre translates the detector in its own plane, so every spot moves with the direct beam; the
    2×2 Jacobian of :func:`direct_beam_pixel` with respect to the beam-centre increments converts the shift."""
    ib = par.index("beam_center")
    if len(ib) != 2:
        return x
    act = torch.as_tensor(ib)

    def f(xb):
        return direct_beam_pixel(par.unpack(x.index_put((act,), xb)), par.setup)

    J = jacfwd(f)(x[act])
    d = torch.as_tensor([float(v) for v in shift_px], dtype=x.dtype, device=x.device)
    try:
        step = torch.linalg.solve(J, d)
    except RuntimeError:
        return x
    return x.index_put((act,), x[act] + step)


def search_geometry(par, x: torch.Tensor, observed: np.ndarray, usable: np.ndarray, max_shift: int = 8,
                    distance_range: float = 0.05, distance_step: float = 0.01):
    """Grid search over the distance (relative steps within ±``distance_range``, when the distance is free) with a
    translation search (:func:`translation_search`, when the beam centre is free) at each candidate; keeps the
    candidate whose image correlates best with the observed one and moves the beam centre by its translation.

    Searching the distance with the translation matters because a distance error scales the pattern about the beam
    (a few pixels at the edge), and spot lattices are periodic: a translation alone can lock onto a neighbouring spot.
    Returns ``(x, info)`` with info = {'translation_px', 'distance_mm', 'correlation', 'candidates'}."""
    from nbtorch.simulate import simulate

    i_d = par.index("distance")
    has_bc = len(par.index("beam_center")) == 2
    if not i_d and not has_bc:
        return x, {}
    steps = [0.0]
    if i_d and distance_range > 0 and distance_step > 0:
        k = int(round(distance_range / distance_step))
        steps = [j * distance_step for j in range(-k, k + 1)]
    D0 = float(par.unpack(x).detector.distance)
    S, F = observed.shape
    o = _prepared(observed, usable)
    offt = (np.fft.rfft2(o, s=(2 * S, 2 * F)), float((o * o).sum()))
    best = None
    for dd in steps:
        xc = x.clone()
        if i_d:
            xc[i_d[0]] = xc[i_d[0]] + dd * D0
        with torch.no_grad():
            model = simulate(par.unpack(xc), par.setup).detach().cpu().numpy()
        df, ds, score = translation_search(observed, model, usable, max_shift if has_bc else 0, offt)
        if best is None or score > best[0]:
            best = (score, xc, df, ds, dd)
    score, xb, df, ds, dd = best
    if has_bc:
        xb = beam_center_shift(par, xb, (df, ds))
    info = {"translation_px": [float(df), float(ds)], "distance_change_mm": float(dd * D0),
            "correlation": float(score), "candidates": len(steps)}
    return xb, info


def prefit_scale(par, x: torch.Tensor, observed: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """Linear pre-fit of the free scale (and constant background): o ≈ s·m + c over the given pixels.

    ``observed``, ``model`` [P] at the usable pixels, model at ``x`` (including any plane).  Returns new increments;
    unchanged when the fit is not positive."""
    i_s = par.index("scale")
    i_c = par.index("background.constant")
    if not i_s and not i_c:
        return x
    plane0 = par.plane(x)[0] if par.has_plane() else x.new_zeros(())
    bragg = model - plane0  # model without the constant term
    o = observed
    x = x.clone()
    if i_s and i_c:
        A = torch.stack([bragg, torch.ones_like(bragg)], 1)
        sol = torch.linalg.lstsq(A, o[:, None]).solution[:, 0]
        s, c = float(sol[0]), float(sol[1])
        if s > 0:
            x[i_s[0]] = x[i_s[0]] + math.log(s)
            x[i_c[0]] = x[i_c[0]] + (c - float(plane0))
    elif i_s:
        num, den = float((o - plane0).sum()), float(bragg.sum())
        if num > 0 and den > 0:
            x[i_s[0]] = x[i_s[0]] + math.log(num / den)
    else:
        x[i_c[0]] = x[i_c[0]] + float((o - model).mean())
    return x


def trust_bounds(par, x: torch.Tensor, trust: Optional[float]):
    """(lower, upper) [n] confining every scalar except the linear background to x ± trust·typical (None: no
    trust region)."""
    if trust is None:
        return None, None
    width = par.typical() * float(trust)
    lin_bg = torch.tensor([s.group == "background" and s.kind == "linear" for s in par.scalars], device=x.device)
    width = torch.where(lin_bg, torch.full_like(width, float("inf")), width)
    return x - width, x + width
