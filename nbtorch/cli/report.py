"""What the command line prints: the set-up summary, nanoBragg's image statistics and per-pixel diagnostics."""
from __future__ import annotations

import math
from typing import Dict, NamedTuple, TextIO

import numpy as np
import torch

from .. import kernel
from ..pixels import panel_extent_mask, rendered_mask, rendered_pixels, roi_mask
from ..shape import round_half_down
from ..simulate import pixel_tile
from ..types import Params, Setup
from ..units import mm_to_m, rad2deg

__all__ = ["ImageStats", "image_statistics", "pixel_diagnostics", "print_setup", "print_statistics",
           "print_pixel_block", "print_all_pixels"]


class ImageStats(NamedTuple):
    """Summary of a float image as nanoBragg prints it.

    max_I: largest visited pixel (photons; 0 if none is positive); max_fast, max_slow: its pixel indices (first in
    raster order); mean, rms: over visited pixels (ROI and mask), rms = sqrt(Σv²/(n−1)); rmsd: sqrt(Σ(v−mean)²/(m−1))
    over the m ROI pixels (masked ones included, as nanoBragg; a panel detector's ROI is every pixel of its panels);
    total: Σv (photons); n: visited pixels; max_panel: the panel of the largest pixel (0 for one panel).
    """

    max_I: float
    max_fast: int
    max_slow: int
    mean: float
    rms: float
    rmsd: float
    total: float
    n: int
    max_panel: int = 0


def image_statistics(image: np.ndarray, setup: Setup) -> ImageStats:
    """nanoBragg's image statistics of ``image`` (``setup.image_shape`` float32 photons: ``[spixels, fpixels]``, or
    ``[P, spixels, fpixels]`` for a detector of panels) for ``setup``'s ROI/mask.

    Reproduces the C program's printed max_I, mean, rms and rmsd (its rms and rmsd divide by n − 1; its rmsd loop
    covers the whole ROI, including masked pixels, around the mean of the visited pixels).
    """
    img = np.asarray(image, dtype=np.float32).astype(np.float64)
    roi = roi_mask(img.shape, setup.roi) if setup.panels is None else panel_extent_mask(setup)
    visited = rendered_mask(setup)
    v = img[visited]
    n = int(v.size)
    total = float(v.sum())
    mean = total / max(n, 1)
    rms = math.sqrt(float((v * v).sum()) / (max(n, 2) - 1))
    m = int(roi.sum())
    rmsd = math.sqrt(float(((img[roi] - mean) ** 2).sum()) / (max(m, 2) - 1))
    max_I, mf, ms, mp = 0.0, 0, 0, 0
    S, F = img.shape[-2:]
    if n:
        flat = np.where(visited, img, -np.inf).reshape(-1)
        k = int(np.argmax(flat))
        if flat[k] > 0:
            max_I, mp, ms, mf = float(flat[k]), k // (S * F), (k // F) % S, k % F
    return ImageStats(max_I, mf, ms, mean, rms, rmsd, total, n, mp)


def pixel_diagnostics(params: Params, setup: Setup, fast, slow) -> Dict[str, torch.Tensor]:
    """Per-pixel diagnostics of the **first** sample (sensor layer 0, sub-pixel 0, source 0, orientation 0 = first phi
    step and mosaic domain), the sample at which nbtorch (like nanoBragg) evaluates polarization and solid angle.

    ``fast``, ``slow``: pixel indices (ints or ``[P]`` integer tensors).  Returns a dict of tensors with a leading
    ``[P]`` dimension: ``position`` [P,3] (mm, lab frame), ``R`` (mm), ``twotheta`` (deg), ``stol`` (sin θ/λ, Å⁻¹),
    ``d`` (Å), ``hkl`` [P,3] (fractional Miller indices), ``hkl0`` [P,3] (nearest, nanoBragg rounding), ``F_cell``,
    ``F_latt``, ``I_sample`` (= F_cell²·F_latt²), ``polar`` (Kahn factor, 1 with -nopolar), ``omega`` (sr, or 1/R² in
    m⁻² with -point_pixel), ``capture`` (capture fraction of the last sensor layer, as used in the final scaling).
    Every term is the kernel's own (:mod:`nbtorch.kernel`), evaluated on a one-orientation, one-source tile.
    Not differentiable-API material: a helper for ``-printout``/``-printout_pixel``.
    """
    spec, tp, tc = pixel_tile(params, setup, fast, slow)
    tp = tp._replace(A=tp.A[:1])
    tc = tc._replace(incident=tc.incident_all[:1], lam_factor=tc.lam_factor_all[:1], weight=tc.weight_all[:1])
    pos = kernel.sample_positions(tp, tc, spec, first_subpixel=True)  # 3 × [T, 1, P]
    d, R2, R = kernel.unit_directions(pos)
    d0 = [c[0, 0] for c in d]  # the first sample's direction, 3 × [P]
    lam = kernel.source_wavelengths(tp, tc.lam_factor)
    stol = 0.5 * kernel.q_length(d0, tc.incident, lam)[0]
    h = [c[0, 0, 0] for c in kernel.miller_indices(torch.stack(d0)[:, None, :], tp.A, tc.incident, 1.0 / lam)]
    F_cell, F_latt = kernel.sample_factors(h, tp.ncells, tp.B0, tp.F, tp.default_F, tc.hkl_min, spec)
    F_cell = torch.broadcast_to(F_cell, F_latt.shape)
    if spec.nopolar:
        polar = torch.ones_like(stol)
    else:
        polar = kernel.polarization(tc.incident[0], d0, tc.polar_axis, tp.polarization)
    hkl = torch.stack(h, -1)
    cos2t = sum(d0[j] * tc.incident[0, j] for j in range(3)).clamp(-1.0, 1.0)
    return {
        "position": torch.stack([c[0, 0] for c in pos], -1), "R": R[0, 0], "twotheta": rad2deg(torch.acos(cos2t)),
        "stol": stol, "d": 0.5 / stol, "hkl": hkl, "hkl0": round_half_down(hkl), "F_cell": F_cell, "F_latt": F_latt,
        "I_sample": (F_cell * F_latt) ** 2, "polar": polar,
        "omega": kernel.solid_angle(R2[0, 0], R[0, 0], tp, tc, spec), "capture": kernel.pixel_capture(d, tp, tc, spec),
    }


def print_setup(out: TextIO, params: Params, setup: Setup) -> None:
    """The few lines that say what will be simulated (size, convention or panels, samples per pixel, crystal
    model)."""
    ncells = "x".join(f"{v:g}" for v in params.crystal.ncells.tolist())
    if setup.panels is None:
        detector = (f"{setup.fpixels}x{setup.spixels} pixels of {setup.pixel_size:g} mm, {setup.convention} "
                    f"convention, {setup.pivot} pivot")
    else:
        detector = (f"{setup.n_panels} panels (up to {setup.fpixels}x{setup.spixels} pixels of about "
                    f"{setup.pixel_size:g} mm), {len(rendered_pixels(setup))} pixels rendered, beam along "
                    f"{' '.join(f'{x:g}' for x in setup.beam)}")
    out.write(
        f"  {detector}\n"
        f"  {setup.n_sources} sources x {setup.n_domains} mosaic domains x {setup.phisteps} phi steps x "
        f"{setup.oversample}x{setup.oversample} sub-pixels = {setup.steps} steps; {setup.thicksteps} sensor layer(s)\n"
        f"  {setup.shape} crystal {ncells} cells, {'tricubic' if setup.interpolate else 'nearest'} structure factors\n"
    )


def print_statistics(out: TextIO, stats: ImageStats, setup: Setup) -> None:
    """nanoBragg's statistics lines (max_I with its position in metres, or its panel for a detector of panels,
    mean/rms/rmsd, total)."""
    p, n = setup.pixel_size, setup.oversample
    last_sub = p - p / n / 2.0  # nanoBragg reports the position of the pixel's last sub-pixel (spec Q20)
    if setup.panels is None:
        where = f"at {mm_to_m(stats.max_fast * p + last_sub):g} {mm_to_m(stats.max_slow * p + last_sub):g}  (pixel"
    else:
        where = f"on panel {setup.panels.panels[stats.max_panel].name!r} (panel {stats.max_panel},"
    out.write(f"max_I = {stats.max_I:g}  {where} fast {stats.max_fast}, slow {stats.max_slow})\n")
    out.write(f"mean= {stats.mean:g} rms= {stats.rms:g} rmsd= {stats.rmsd:g}\n")
    out.write(f"total= {stats.total:g} photons in {stats.n} pixels\n")


def print_pixel_block(out: TextIO, diag: Dict[str, torch.Tensor], i: int, f: int, s: int, value: float,
                      setup: Setup) -> None:
    """``-printout_pixel``: the diagnostics of entry ``i`` of ``diag`` (pixel fast ``f``, slow ``s``) and its
    rendered ``value`` (photons)."""
    g = {k: v[i].detach().cpu().tolist() for k, v in diag.items()}
    x, y, z = g["position"]
    h, k, l = g["hkl"]
    h0, k0, l0 = (int(v) for v in g["hkl0"])
    out.write(
        f"### pixel fast {f} slow {s}: {value:.9g} photons\n"
        f"  first sample: sensor layer 0, sub-pixel 0, source 0, phi {setup.phi0:g} deg, mosaic domain 0\n"
        f"  position   {x:.9g} {y:.9g} {z:.9g} mm  (R = {g['R']:.9g} mm, 2theta = {g['twotheta']:.6f} deg)\n"
        f"  stol       {g['stol']:.9g} 1/Å  (d = {g['d']:.6g} Å)\n"
        f"  hkl        {h:.6f} {k:.6f} {l:.6f}  hkl0= {h0} {k0} {l0}\n"
        f"  F_cell     {g['F_cell']:.9g}\n"
        f"  F_latt     {g['F_latt']:.9g}\n"
        f"  I_sample   {g['I_sample']:.9g}  (F_cell^2 F_latt^2)\n"
        f"  steps      {setup.steps}\n"
        f"  polar      {g['polar']:.10g}\n"
        f"  omega      {g['omega']:.10g}\n"
        f"  capture    {g['capture']:.10g}\n"
        f"  pixel      {value:.10g}\n"
    )


def print_all_pixels(out: TextIO, params: Params, setup: Setup, image: np.ndarray, chunk: int = 4096) -> None:
    """``-printout`` without a pixel: one line of diagnostics per visited pixel of ``image`` ``[S, F]``."""
    idx = rendered_pixels(setup)
    F = setup.fpixels
    out.write("# fast slow  stol(1/Å)  h k l  F_cell F_latt polar omega capture pixel  (first sample)\n")
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        diag = pixel_diagnostics(params, setup, torch.as_tensor(part % F), torch.as_tensor(part // F))
        d = {k: v.detach().cpu().numpy() for k, v in diag.items()}
        for j, flat in enumerate(part):
            f, s = int(flat % F), int(flat // F)
            h = d["hkl"][j]
            out.write(f"{f:4d} {s:4d} {d['stol'][j]:.6g} {h[0]:.6f} {h[1]:.6f} {h[2]:.6f} {d['F_cell'][j]:.6g} "
                      f"{d['F_latt'][j]:.6g} {d['polar'][j]:.6g} {d['omega'][j]:.6g} {d['capture'][j]:.6g} "
                      f"{image[s, f]:.9g}\n")
