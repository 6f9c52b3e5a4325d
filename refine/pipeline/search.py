"""The search stage's tools: a global translation search, the beam-centre shift it implies, a distance grid, and
linear pre-fits of scale and background.

A sharp still has a narrow basin: with N ≈ 5–10 cells, spots are one or two pixels wide, so a beam centre 2–3 pixels
off leaves model and observed spots without overlap.  :func:`search_geometry` finds the translation between the
observed and model images by FFT cross-correlation for each distance of a grid (a distance error scales the pattern
about the beam, and spot lattices are periodic, so a translation alone can lock onto a neighbouring spot) and turns
the best into a beam-centre shift; :func:`prefit_scale` solves the scale and constant background linearly.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch.func import jacfwd

from nbtorch.detector import detector_frame
from nbtorch.types import Params, Setup

from ..model.predict import predict_image


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

    J = jacfwd(f)(x[act]).to(x.dtype)  # float64 tangents from 0-dim × float under torch 2.13 (float32 fits)
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
        model = predict_image(par, xc).cpu().numpy()
        df, ds, score = translation_search(observed, model, usable, max_shift if has_bc else 0, offt)
        if best is None or score > best[0]:
            best = (score, xc, df, ds, dd)
    score, xb, df, ds, dd = best
    if has_bc:
        xb = beam_center_shift(par, xb, (df, ds))
    info = {"translation_px": [float(df), float(ds)], "distance_change_mm": float(dd * D0),
            "correlation": float(score), "candidates": len(steps)}
    return xb, info


def prefit_scale(par, x: torch.Tensor, observed: torch.Tensor, bragg: torch.Tensor,
                 background: torch.Tensor) -> torch.Tensor:
    """Linear pre-fit of the free scale (and constant background): o − (b − c0) ≈ s·m + c over the given pixels.

    ``observed``, ``bragg`` (the simulated photons) and ``background`` (the plane, whose constant term is c0) [P] at
    the same pixels, the model at ``x``.  Returns new increments [n]; unchanged where the fit is not positive."""
    i_s, i_c = par.index("scale"), par.index("background.constant")
    if not i_s and not i_c:
        return x
    x = x.clone()
    if i_s and i_c:  # one plane (a spot-ROI fit's per-region planes have no background.constant: scale alone)
        c0 = float(par.plane(x)[0])
        rest = observed - (background - c0)  # observed less the plane's slopes
        A = torch.stack([bragg, torch.ones_like(bragg)], 1)
        s, c = (float(v) for v in torch.linalg.lstsq(A, rest[:, None]).solution[:, 0])
        if s > 0 and c >= 0:
            x[i_s[0]] += math.log(s)
            x[i_c[0]] += c - c0
            return x
        i_c = []  # a negative background (broadened spots explain the background): the scale alone
    if i_s:
        num, den = float((observed - background).sum()), float(bragg.sum())
        if num > 0 and den > 0:
            x[i_s[0]] += math.log(num / den)
    else:
        x[i_c[0]] += float((observed - bragg - background).mean())
    return x
