"""simulate(params, setup) → image [slow, fast]: the nanoBragg pixel sum, in tiles of bounded memory.

The pixel value follows spec §5: for every (layer, sub-pixel) sample of a pixel its scattered direction d; for every
source q = (d − i)/λ; for every (phi step, mosaic domain) orientation of the real-space basis the Miller indices
h = a·q, the lattice factor and the structure factor; summed as |F|²·F_latt² and scaled by
r_e²·fluence/steps·capture·polarization·Ω.  The per-tile math is in :mod:`nbtorch.kernel`; :mod:`nbtorch.fused`
compiles it and makes it differentiable tile by tile.  Here the image is cut into tiles (pixels, and when one pixel
alone has more samples than ``Setup.sample_budget``, chunks of its orientations and sources) and put back together.
"""
from __future__ import annotations

import functools
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from . import detector as detmod
from . import fused as fusedmod
from .kernel import KernelSpec, TileConsts, TileParams, sample_positions
from .lattice import lattice
from .pixels import rendered_pixels
from .rotation import rot_axis, rot_xyz
from .setup_checks import MAX_SAMPLES
from .types import Params, Setup
from .units import AVOGADRO, CM3_PER_M3, R_E_SQUARED_M2, WATER_F, WATER_G_PER_CM3, WATER_G_PER_MOL, deg2rad, um_to_m, \
    um_to_mm
from .validate import check_params

#: Work (samples) from which ``simulate(fused=None)`` runs compiled kernels (built once per kernel spec and machine,
#: then loaded in milliseconds); below it the eager code is fast enough.
FUSED_MIN_SAMPLES = 1 << 22


class Crystal3D(NamedTuple):
    """Oriented crystal for the kernel: ``A`` [O,3,3] rows = rotated real vectors a, b, c (Å) per orientation
    (phi-major, mosaic-minor); ``B0`` [3,3] unrotated reciprocal basis (columns, Å⁻¹) used by gauss/tophat."""

    A: torch.Tensor
    B0: torch.Tensor


def crystal_rotation(crystal) -> torch.Tensor:
    """The rotation ``XYZ(misset)·orientation`` [3, 3] applied to the reciprocal basis of ``crystal`` (a
    :class:`~nbtorch.types.Crystal`; misset in degrees)."""
    return rot_xyz(deg2rad(crystal.misset)) @ crystal.orientation


def crystal_orientations(params: Params, setup: Setup) -> Crystal3D:
    """Real-space basis for every (phi step, mosaic domain) sample: ``A[o] = (U_m·R_φ·M0)ᵀ`` (rows a, b, c in Å)."""
    c = params.crystal
    M0, B0 = lattice(c.cell, crystal_rotation(c), nanobragg=setup.nanobragg_cell)
    like = c.cell
    spindle = torch.tensor(setup.spindle, dtype=like.dtype, device=like.device)
    phis = setup.phi0 + setup.phistep * torch.arange(setup.phisteps, dtype=like.dtype, device=like.device)
    Rphi = rot_axis(spindle.expand(setup.phisteps, 3), deg2rad(phis))  # [Φ,3,3]
    axes = torch.tensor(setup.mosaic_axes, dtype=like.dtype, device=like.device)  # [M,3]
    fr = torch.tensor(setup.mosaic_fractions, dtype=like.dtype, device=like.device)
    U = rot_axis(axes, deg2rad(c.mosaic_spread) * fr)  # [M,3,3]
    rot = U[None, :] @ Rphi[:, None]  # [Φ,M,3,3]
    A = (rot @ M0).transpose(-1, -2).reshape(-1, 3, 3)
    return Crystal3D(A, B0)


def water_intensity(params: Params) -> torch.Tensor:
    """nanoBragg's water background per electron² unit: F_w²·r_e²·fluence·N_mol (N_mol molecules in a cube of
    edge ``water_size`` µm); it is scaled a second time by r_e²·fluence/steps like the Bragg sum (spec Q10)."""
    w_m = um_to_m(params.background.water_size)
    n_mol = w_m**3 * (CM3_PER_M3 * WATER_G_PER_CM3) * AVOGADRO / WATER_G_PER_MOL
    return WATER_F**2 * R_E_SQUARED_M2 * params.beam.fluence * n_mol


def kernel_spec(params: Params, setup: Setup) -> KernelSpec:
    """The static switches of the tile code for this set-up (a compile-cache key)."""
    return KernelSpec(
        shape=setup.shape, fudge=float(setup.fudge), table=params.structure.F.numel() > 0,
        interpolate=bool(setup.interpolate), nopolar=bool(setup.nopolar), point_pixel=bool(setup.point_pixel),
        curved=bool(setup.curved_det), thick=setup.has_sensor, dmin=setup.dmin > 0.0,
        running_thick=bool(setup.oversample_thick), running_polar=bool(setup.oversample_polar),
        running_omega=bool(setup.oversample_omega),
    )


# ----------------------------------------------------------------------------------------------------------------
# planning: which pixels, how many per tile, and chunks of a pixel's samples


class Plan(NamedTuple):
    """How an image is cut: ``tile`` pixels per tile, ``o_chunk``/``k_chunk`` orientations/sources per pass over a
    tile, ``samples`` in all (pixels × layers × sub-pixels × sources × orientations)."""

    tile: int
    o_chunk: int
    k_chunk: int
    samples: int


def samples_per_pixel(setup: Setup) -> int:
    """Layers × sub-pixels × sources × (phi steps × mosaic domains) of one pixel."""
    return setup.thicksteps * setup.oversample**2 * setup.n_sources * setup.phisteps * setup.n_domains


def plan(setup: Setup, n_pixels: int) -> Plan:
    """Tile size and sample chunks for ``n_pixels`` pixels within ``setup.sample_budget`` samples per tile.

    A pixel with more samples than the budget is rendered in chunks of orientations (then of sources).  Raises a
    ``ValueError`` naming the counts to lower when the request is absurd for one machine or cannot be split.
    """
    TN = setup.thicksteps * setup.oversample**2
    K, O = setup.n_sources, setup.phisteps * setup.n_domains
    per = TN * K * O
    total = per * max(n_pixels, 1)
    budget = setup.sample_budget
    if total > MAX_SAMPLES:
        raise ValueError(
            f"this image needs {total:.3g} samples ({n_pixels} pixels × {setup.thicksteps} layers × "
            f"{setup.oversample}² sub-pixels × {K} sources × {O} orientations), beyond {MAX_SAMPLES:.0e}: lower "
            "-oversample, -mosaic_domains, -phisteps, -divsteps/-dispsteps or the detector size")
    if per <= budget:  # tiles of equal size up to the budget: a last tile of a few pixels would be padded to a full
        most = max(1, budget // per)  # one (1024² pixels of 9 samples: 19 tiles of 55 189, not 18 of 58 254 + 4)
        tiles = -(-max(n_pixels, 1) // most)
        return Plan(-(-max(n_pixels, 1) // tiles), O, K, total)
    if any((setup.oversample_thick, setup.oversample_polar, setup.oversample_omega)):
        raise ValueError(
            f"-oversample_thick/_polar/_omega need all {per} samples of a pixel at once, more than sample_budget="
            f"{budget}: raise sample_budget or lower the sample counts")
    if TN * K <= budget:
        return Plan(1, max(1, budget // (TN * K)), K, total)
    if TN > budget:
        raise ValueError(f"one pixel has {TN} (layer, sub-pixel) samples, more than sample_budget={budget}: lower "
                         "-oversample or -detector_thicksteps, or raise sample_budget")
    return Plan(1, 1, max(1, budget // TN), total)


# ----------------------------------------------------------------------------------------------------------------
# rendering


def choose_fused(fused: Optional[bool], setup: Setup, n_pixels: int) -> int:
    """Resolve ``simulate(fused=...)`` for a job that renders ``n_pixels`` pixels of ``setup`` (in one call or in
    many — a refinement renders the same pixels chunk by chunk at every iteration) → a
    :class:`~nbtorch.fused.Compiled` value: an explicit value wins, then the environment variable ``NBTORCH_FUSED``
    (both build a missing kernel first), else compiled kernels when the job has at least :data:`FUSED_MIN_SAMPLES`
    samples — used when they are in the cache, left to a background builder otherwise (``NBTORCH_BUILD=wait``:
    built first).  A :class:`~nbtorch.fused.Compiled` value is already resolved and returned as it is."""
    if isinstance(fused, fusedmod.Compiled):
        return fused
    if fused is None:
        fused = fusedmod.fused_default()
    if fused is not None:
        return fusedmod.Compiled(bool(fused))
    if n_pixels * samples_per_pixel(setup) < FUSED_MIN_SAMPLES:
        return fusedmod.Compiled.NO
    return fusedmod.Compiled.WHEN_READY if fusedmod.build_in_background() else fusedmod.Compiled.YES


def _use_fused(fused: Optional[bool], spec: KernelSpec, setup: Setup, n_pixels: int, like: torch.Tensor) -> int:
    """:func:`choose_fused` for one call; the running-sum quirk path is always eager.  (A kernel that cannot be built
    here falls back to eager code, warned once.)"""
    if spec.running_sum or like.device.type not in ("cpu", "cuda"):
        return fusedmod.Compiled.NO
    return choose_fused(fused, setup, n_pixels)


def _tile_params(params: Params, setup: Setup) -> TileParams:
    """The differentiable tile inputs of the whole image (all orientations), the frame leaves per panel ([P, 3],
    [P]; :func:`_pixel_frames` picks each pixel's)."""
    frame = detmod.panel_frames(params.detector, setup)
    xtal = crystal_orientations(params, setup)
    st = params.structure
    return TileParams(frame.pix0, frame.fdet, frame.sdet, frame.odet, frame.close, frame.distance, xtal.A, xtal.B0,
                      params.beam.wavelength, params.crystal.ncells, params.beam.polarization, st.F, st.default_F,
                      water_intensity(params), params.beam.spectrum_shift)


def _per_pixel(t: torch.Tensor, panel: Optional[torch.Tensor], n: int) -> torch.Tensor:
    """Every listed pixel's entry of a per-panel tensor ``t`` [P, ...] → [..., n]: gathered by ``panel`` [n] (long),
    or, with ``panel`` None (a detector of one panel), panel 0's entry copied to the n pixels (no gather; a copy,
    not a broadcast view: the compiled tiles read contiguous inputs, and forward-mode transforms write into
    tangents shaped like these)."""
    if panel is None:
        return t[0].unsqueeze(-1).expand(*t.shape[1:], n).contiguous()
    return t.index_select(0, panel).movedim(0, -1)


#: The tile inputs given per pixel from per-panel values (trailing axis: pixels): frame leaves and constants.
PANEL_PARAMS = ("pix0", "fdet", "sdet", "odet", "close")
PANEL_CONSTS = ("layers", "area", "capture_k")


def _pixel_frames(tp: TileParams, panel: Optional[torch.Tensor], n: int) -> TileParams:
    """``tp`` with its per-panel frame leaves replaced by every listed pixel's ([3, n], [n]); ``panel`` [n] long, or
    None for a detector of one panel (see :func:`_per_pixel`)."""
    return tp._replace(**{k: _per_pixel(getattr(tp, k), panel, n) for k in PANEL_PARAMS})


def pixel_indices(index: torch.Tensor, setup: Setup) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(panel [n] long — None for a detector of one panel —, fast [n], slow [n] (float64)) of the flat pixel indices
    ``index`` [n] (long; panel·spixels·fpixels + slow·fpixels + fast).

    Float64 arithmetic, exact here: for integers k < 2⁵⁰ and m ≥ 1, (k + ½)/m lies at least 1/(2m) from an integer
    and its rounding error is below that, so floor((k + ½)/m) is k // m (integer division has no vector
    instructions on most CPUs: it cost as much as the compiled tile with a few samples per pixel)."""
    k = index.to(torch.float64)
    row = torch.floor((k + 0.5) / setup.fpixels)
    fast = k - row * setup.fpixels
    if setup.n_panels == 1:
        return None, fast, row
    panel = torch.floor((row + 0.5) / setup.spixels)
    return panel.long(), fast, row - panel * setup.spixels


@functools.lru_cache(maxsize=8)
def _rendered_coordinates(setup: Setup) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """:func:`pixel_indices` of :func:`~nbtorch.pixels.rendered_pixels` (CPU tensors), once per Setup: the
    finite-difference forwards of a gradient check, a fit's evaluations, all render the same pixels (≈ 10 ms per
    1024² image saved per call).  Never written to: the tiles read slices of them."""
    return pixel_indices(torch.as_tensor(rendered_pixels(setup)), setup)


class PanelConsts(NamedTuple):
    """Per-panel constants of the pixel stage, each [P]: pixel ``area`` (mm²; the pixel size squared for nanoBragg's
    detector, |fast × slow| of a panel's steps), sensor layer ``step`` (mm) and ``capture_k`` (layer thickness × μ)."""

    area: torch.Tensor
    step: torch.Tensor
    capture_k: torch.Tensor


def panel_consts(setup: Setup, like: torch.Tensor) -> PanelConsts:
    """The :class:`PanelConsts` of ``setup``'s panels (one entry for nanoBragg's detector).  A panel with its own
    sensor keeps the set-up's layer rule scaled to its thickness (or thickness/thicksteps without a set-up sensor)."""
    def T(v):
        return torch.as_tensor(v, dtype=like.dtype, device=like.device).reshape(-1)

    if setup.panels is None:
        p = T(setup.pixel_size)
        return PanelConsts(p * p, T(um_to_mm(setup.thickstep_um)), T(setup.thickstep_um * setup.mu_per_um))
    steps, ks = [], []
    for q in setup.panels.panels:
        thick = setup.thickness_um if q.thickness_um is None else q.thickness_um
        mu = setup.mu_per_um if q.mu_per_um is None else q.mu_per_um
        step = setup.thickstep_um * thick / setup.thickness_um if setup.thickness_um > 0 else thick / setup.thicksteps
        steps.append(um_to_mm(step))
        ks.append(step * mu)
    return PanelConsts(T([q.area for q in setup.panels.panels]), T(steps), T(ks))


def _tile_consts(setup: Setup, like: torch.Tensor) -> TileConsts:
    """The non-differentiable tile inputs (pixel indices, areas and capture left empty, ``layers`` the layer numbers:
    set per tile by :func:`_tile_of`)."""
    dt, dev = like.dtype, like.device

    def T(v):
        return torch.as_tensor(v, dtype=dt, device=dev)

    inc = T([s[0] for s in setup.sources])
    lamf = T([s[1] for s in setup.sources])
    w = T(setup.normalised_source_weights)
    empty = T([])
    return TileConsts(
        fast=empty, slow=empty, offsets=detmod.subpixel_offsets(setup, dt, dev),
        layers=torch.arange(setup.thicksteps, dtype=dt, device=dev),
        incident=inc, lam_factor=lamf, incident_all=inc, lam_factor_all=lamf, polar_axis=T(setup.polar_axis),
        beam=T(setup.beam), pixel=T(setup.pixel_size), area=empty, capture_k=empty,
        dmin=T(setup.dmin), hkl_min=T(setup.hkl_min), weight=w, weight_all=w)


def _panel_inputs(tp: TileParams, tc: TileConsts, pc: PanelConsts, panel: Optional[torch.Tensor],
                  n: int) -> Tuple[TileParams, TileConsts]:
    """``tp``, ``tc`` (with the layer numbers as ``layers``) with the inputs of :data:`PANEL_PARAMS` and
    :data:`PANEL_CONSTS` given for n pixels of the panels ``panel`` ([n] long, or None for a detector of one panel:
    the same for every tile of n pixels); ``fast``, ``slow`` left as they are."""
    layers = tc.layers[:, None] * _per_pixel(pc.step, panel, n)[None, :]
    return _pixel_frames(tp, panel, n), tc._replace(layers=layers, area=_per_pixel(pc.area, panel, n),
                                                    capture_k=_per_pixel(pc.capture_k, panel, n))


def _first_pixels(tp: TileParams, tc: TileConsts, m: int) -> Tuple[TileParams, TileConsts]:
    """Per-pixel tile inputs (:func:`_panel_inputs`) cut to their first ``m`` pixels."""
    return (tp._replace(**{k: getattr(tp, k)[..., :m] for k in PANEL_PARAMS}),
            tc._replace(**{k: getattr(tc, k)[..., :m] for k in PANEL_CONSTS}))


def _tile_of(tp: TileParams, tc: TileConsts, pc: PanelConsts, panel: Optional[torch.Tensor], fast: torch.Tensor,
             slow: torch.Tensor, shared: Optional[Tuple[TileParams, TileConsts]] = None
             ) -> Tuple[TileParams, TileConsts]:
    """The tile inputs of the pixels (``panel``, ``slow``, ``fast``) ([n] tensors; ``panel`` long, or None for a
    detector of one panel) from the image's (``tc`` with the layer numbers as ``layers``).  ``shared``: for a
    detector of one panel, :func:`_panel_inputs` of at least n pixels, computed once for all tiles."""
    like, n = tc.pixel, fast.shape[0]
    tpk, tck = _panel_inputs(tp, tc, pc, panel, n) if shared is None else _first_pixels(*shared, n)
    return tpk, tck._replace(fast=fast.to(like.dtype), slow=slow.to(like.dtype))


def _padded(c: torch.Tensor, m: int) -> torch.Tensor:
    """``c`` [n ≤ m] followed by copies of its last entry up to m entries."""
    return torch.cat([c, c[-1:].expand(m - c.shape[0])])


def pixel_tile(params: Params, setup: Setup, fast, slow, panel=0) -> Tuple[KernelSpec, TileParams, TileConsts]:
    """The kernel inputs of one tile of the listed pixels: (spec, tile parameters, tile constants), for callers
    that want the kernel's per-sample terms themselves (diagnostics, tests).  ``fast``, ``slow``: [n] pixel indices
    (ints, numpy or tensors), ``panel``: their panel(s) (an int or [n]); all orientations and sources in one tile."""
    like = params.crystal.cell

    def T(v):
        return torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v, device=like.device).reshape(-1)

    fast, slow = T(fast), T(slow)
    panel = T(panel).long().expand(fast.shape[0])
    tp, tc = _tile_of(_tile_params(params, setup), _tile_consts(setup, like), panel_consts(setup, like), panel, fast,
                      slow)
    return kernel_spec(params, setup), tp, tc


def pixel_lab_positions(params: Params, setup: Setup, fast, slow, panel=0) -> torch.Tensor:
    """Lab positions (mm) of every (sensor layer, sub-pixel) sample of the listed pixels, as the kernel computes
    them (parallax shift along the normal per layer, ``-curved_det`` bent onto its sphere): ``fast``, ``slow`` [n]
    pixel indices of ``panel`` (an int or [n]) → [n, T, n², 3] (T layers, n = oversample; sub-pixels
    slow-major)."""
    spec, tp, tc = pixel_tile(params, setup, fast, slow, panel)
    return torch.stack(sample_positions(tp, tc, spec), -1).permute(2, 0, 1, 3)


def _tile_sum(spec, tc: TileConsts, tp: TileParams, p: Plan, fused: bool):
    """(S, factor) of one tile of pixels, summing chunks of orientations and sources when the plan asks for it."""
    S = factor = None
    O, K = tp.A.shape[0], tc.incident_all.shape[0]
    for o0 in range(0, O, p.o_chunk):
        for k0 in range(0, K, p.k_chunk):
            first = S is None
            tpc = tp._replace(A=tp.A[o0:o0 + p.o_chunk], I_bg=tp.I_bg if first else torch.zeros_like(tp.I_bg))
            tcc = tc._replace(incident=tc.incident_all[k0:k0 + p.k_chunk],
                              lam_factor=tc.lam_factor_all[k0:k0 + p.k_chunk],
                              weight=tc.weight_all[k0:k0 + p.k_chunk])
            s, f = fusedmod.apply_tile(spec, tcc, tpc, fused)
            S, factor = (s, f) if first else (S + s, factor)
    return S, factor


def render_pixels(params: Params, setup: Setup, index: torch.Tensor, fused: Optional[bool] = None,
                  progress: Optional[Callable[[int, int], None]] = None,
                  coords: Optional[Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]] = None
                  ) -> torch.Tensor:
    """Photons of the pixels with flat indices ``index`` [n] (long; into ``setup.image_shape``, slow-major in each
    panel) → [n], tile by tile: every panel's pixels in the one stream of tiles.

    No validation (see :func:`simulate`).  ``fused``: compiled kernels (True), eager (False) or by the amount of work
    (None); ``progress(done, total)`` is called after every tile; ``coords``: :func:`pixel_indices` of ``index``
    when the caller has them.
    """
    like = params.crystal.cell
    n = int(index.shape[0])
    p = plan(setup, n)
    spec = kernel_spec(params, setup)
    use = _use_fused(fused, spec, setup, n, like)
    tp, tc, pc = _tile_params(params, setup), _tile_consts(setup, like), panel_consts(setup, like)
    scale = R_E_SQUARED_M2 * params.beam.fluence / setup.steps
    if coords is None:
        coords = pixel_indices(index, setup)  # (panel or None, fast, slow), each cut into tiles below
    coords = tuple(None if c is None else c.to(like.device) for c in coords)
    # a detector of one panel: the per-pixel copies of the panel's inputs are the same for every tile
    shared = _panel_inputs(tp, tc, pc, None, min(p.tile, n)) if coords[0] is None else None
    out: List[torch.Tensor] = []
    for start in range(0, n, p.tile):
        cols = [None if c is None else c[start:start + p.tile] for c in coords]
        if use and cols[1].shape[0] < p.tile and n > p.tile:  # same tile shape throughout: no recompilation
            cols = [None if c is None else _padded(c, p.tile) for c in cols]
        tpk, t = _tile_of(tp, tc, pc, *cols, shared=shared)
        S, factor = _tile_sum(spec, t, tpk, p, use)
        out.append((scale * S * factor)[: min(p.tile, n - start)])
        if progress is not None:
            progress(min(start + p.tile, n), n)
    if not out:
        return torch.zeros(0, dtype=like.dtype, device=like.device)
    return torch.cat(out) if len(out) > 1 else out[0]


def simulate_pixels(params: Params, setup: Setup, index, check: bool = True, fused: Optional[bool] = None):
    """Photons of selected pixels: ``index`` [n] flat slow-major pixel indices (slow·fpixels + fast, plus
    panel·spixels·fpixels for a panel detector; ints, numpy or a long tensor) → [n] in the same order.  What :func:`simulate` computes for those pixels (ROI and mask are not
    applied: every listed pixel is rendered); memory and work scale with n, not with the detector."""
    if check:
        check_params(params, setup)
    dev = params.crystal.cell.device
    idx = torch.as_tensor(np.asarray(index, dtype=np.int64) if not torch.is_tensor(index) else index,
                          device=dev).reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= setup.n_pixels):
        raise ValueError(f"pixel indices must be within [0, {setup.n_pixels - 1}] (slow·fpixels + fast"
                         f"{'' if setup.panels is None else ' + panel·spixels·fpixels'})")
    return render_pixels(params, setup, idx, fused)


def simulate(params: Params, setup: Setup, check: bool = True, fused: Optional[bool] = None,
             progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Simulate a diffraction image.

    ``params``: :class:`~nbtorch.types.Params` pytree (all leaves the same dtype/device);
    ``setup``: :class:`~nbtorch.types.Setup`.  Returns photons per pixel, ``[spixels, fpixels]`` (slow, fast), the
    quantity nanoBragg writes with ``-floatfile``; pixels outside the ROI or masked are 0.  A panel detector
    (``setup.panels``) gives ``[P, spixels, fpixels]``, every panel rendered in the same stream of tiles (a panel
    smaller than the largest is padded with zeros).

    Pure function of its arguments; works under ``torch.func`` transforms (``grad``, ``jacrev``, ``jacfwd``,
    ``vmap``, ``hessian``).  ``fused``: True runs compiled kernels (:mod:`nbtorch.fused`), False eager code, None
    (default; or the environment variable ``NBTORCH_FUSED=0/1``) compiles when the image has at least
    :data:`FUSED_MIN_SAMPLES` samples; both give the same image to rounding.  Memory is bounded by
    ``setup.sample_budget`` samples per tile, in the forward and the backward pass.  With ``check=True`` parameter
    values are validated (a ``ValueError`` names the bad field) whenever they are concrete tensors.
    ``progress(done, total)``: called with pixel counts after every tile.
    """
    if check:
        check_params(params, setup)
    like = params.crystal.cell
    idx_np = rendered_pixels(setup)
    idx = torch.as_tensor(idx_np, device=like.device)
    vals = render_pixels(params, setup, idx, fused, progress, coords=_rendered_coordinates(setup))
    npix = setup.n_pixels
    if len(idx_np) == npix:
        return vals.reshape(setup.image_shape)
    image = torch.zeros(npix, dtype=vals.dtype, device=vals.device).index_put((idx,), vals)
    return image.reshape(setup.image_shape)
