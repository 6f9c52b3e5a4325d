"""The per-tile pixel sum of spec §5, written for speed and for derivatives.

A *tile* is a list of pixels.  Its value splits into three stages:

* **pixel stage** (:func:`pixel_geometry`, cost ∝ pixels × layers × sub-pixels): unit scattered directions ``d`` of
  every (layer, sub-pixel) sample, the once-per-pixel factor Ω·P·C (solid angle, polarization, sensor capture) and the
  ``-dmin`` keep mask;
* **sample stage** (the hot loop, cost ∝ pixels × layers × sub-pixels × sources × orientations): Miller indices
  h = a·(d − i)/λ for every source i and orientation a, and the sum S = Σ x of x = (F_cell·F_latt)²;
* **combine** (in :mod:`nbtorch.simulate`): value = scale·S·factor with S = I_bg + Σ x.

Sample tensors are laid out ``[TN, K, O, P]`` (layer·sub-pixel, source, orientation, pixel) with the pixel axis
innermost, so a compiler vectorises over pixels and reduces over samples in registers.  Miller indices are formed from
two small matrix products (``A·d`` per orientation and pixel sample, ``A·i`` per orientation and source), so the sample
loop only reads three numbers per index.

Forward-mode derivatives of the sample stage are written out (:func:`derivative_moments`, :func:`jvp_from_moments`)
for the common case (:func:`has_fast_derivatives`: square lattice factor, no F table, flat detector), so that one
pass over the samples serves any number of tangent directions — what ``jacfwd`` in Levenberg–Marquardt needs.
Reverse mode is autograd of the tile recomputed in the backward pass (:mod:`nbtorch.fused`).  Everything here is a
pure function of tensors: :mod:`nbtorch.fused` compiles the forward tile, and the same code runs eagerly under
``torch.func`` transforms.
"""
from __future__ import annotations

import dataclasses
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import shape as shapes
from .structure import lookup_nearest_hkl, lookup_tricubic_hkl
from .units import M_PER_MM


class TileParams(NamedTuple):
    """Differentiable inputs of a tile (every leaf a tensor; units as in the API).

    pix0, fdet, sdet, odet: [3, P] every pixel's panel frame: the outer corner of its panel's pixel (0, 0) (mm), the
    lab steps of one pixel over the pixel size (unit vectors for nanoBragg's detector) and the outward unit normal;
    close: [P] perpendicular sample–plane distance of the pixel's panel (mm, for Ω); distance: [] radius of the
    curved detector (mm); A: [O,3,3] rows a, b, c (Å) of every
    orientation of this tile's chunk; B0: [3,3] unrotated reciprocal basis (Å⁻¹, gauss/tophat); wavelength: [] λ0
    (Å); ncells: [3]; polarization: [] Kahn factor; F: [nh,nk,nl] amplitude table; default_F: []; I_bg: [] background
    added to every pixel's sum before the final scaling (nanoBragg's water term, spec Q10); lam_shift: [] Å added to
    every source's wavelength, λ_k = λ0·factor_k + lam_shift (a spectrum's shift; 0 for nanoBragg).
    """

    pix0: torch.Tensor
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    close: torch.Tensor
    distance: torch.Tensor
    A: torch.Tensor
    B0: torch.Tensor
    wavelength: torch.Tensor
    ncells: torch.Tensor
    polarization: torch.Tensor
    F: torch.Tensor
    default_F: torch.Tensor
    I_bg: torch.Tensor
    lam_shift: torch.Tensor


class TileConsts(NamedTuple):
    """Non-differentiable inputs of a tile (tensors of the working dtype unless stated).

    fast, slow: [P] pixel indices (as floats); offsets: [n²,2] sub-pixel centres from the pixel corner (mm, fast and
    slow); layers: [T, P] sensor-layer offsets along the normal of each pixel's panel (mm); incident: [K,3] and lam_factor: [K] sources of this
    chunk (unit propagation directions, λ_k = λ0·factor_k); incident_all: [Ka,3] and lam_factor_all: [Ka] every
    source (polarization and the ``-dmin`` rule look at the first sample of the pixel); polar_axis: [3] E vector;
    beam: [3] beam direction (curved detector); pixel: [] pixel size (mm); area: [P] the pixel's area (mm²; the
    pixel size squared for nanoBragg's detector); capture_k: [P] layer thickness × μ of each pixel's panel;
    dmin: [] Å (0 = off); hkl_min: [3] first Miller index of the table; weight: [K] and weight_all: [Ka] each
    source's weight (1 for nanoBragg's sources; a spectrum's channel weights, mean 1).
    """

    fast: torch.Tensor
    slow: torch.Tensor
    offsets: torch.Tensor
    layers: torch.Tensor
    incident: torch.Tensor
    lam_factor: torch.Tensor
    incident_all: torch.Tensor
    lam_factor_all: torch.Tensor
    polar_axis: torch.Tensor
    beam: torch.Tensor
    pixel: torch.Tensor
    area: torch.Tensor
    capture_k: torch.Tensor
    dmin: torch.Tensor
    hkl_min: torch.Tensor
    weight: torch.Tensor
    weight_all: torch.Tensor


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Everything that changes the code of a tile (hashable: a compile-cache key).

    shape: lattice-factor model; fudge: its ρ² scale; table: an F table is present; interpolate: tricubic F;
    nopolar, point_pixel, curved, thick (sensor with thickness), dmin (resolution cut on): switches of the pixel stage;
    running_thick/_polar/_omega: nanoBragg's ``-oversample_thick/_polar/_omega`` running-sum accumulation (spec Q7).
    """

    shape: str = "square"
    fudge: float = 1.0
    table: bool = False
    interpolate: bool = False
    nopolar: bool = False
    point_pixel: bool = False
    curved: bool = False
    thick: bool = False
    dmin: bool = False
    running_thick: bool = False
    running_polar: bool = False
    running_omega: bool = False

    @property
    def running_sum(self) -> bool:
        """Whether any ``-oversample_*`` flag asks for nanoBragg's running-sum accumulation (eager code only)."""
        return self.running_thick or self.running_polar or self.running_omega


class Geometry(NamedTuple):
    """Pixel-stage results: d [3,TN,P] unit directions; factor [P] = Ω·P·C; keep [TN,K,P] bool or None."""

    d: torch.Tensor
    factor: torch.Tensor
    keep: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# pixel stage


def _dot3(u: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def sample_coordinates(tc: TileConsts) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detector-plane coordinates of every (layer, sub-pixel) sample: fast and slow offsets from pix0 (mm) ``[n², P]``
    and the layer offset along the normal (mm) ``[T, 1, P]``."""
    F = tc.fast[None, :] * tc.pixel + tc.offsets[:, 0, None]
    S = tc.slow[None, :] * tc.pixel + tc.offsets[:, 1, None]
    return F, S, tc.layers[:, None, :]


def sample_positions(tp: TileParams, tc: TileConsts, spec: KernelSpec, first_subpixel: bool = False,
                     flat: bool = False):
    """Lab positions (mm) of every (layer, sub-pixel) sample: three tensors x, y, z of shape [T, n², P] (n² = 1 with
    ``first_subpixel``), or [T·n², P] with ``flat`` (the same values: a compiled tile splits the loops over that
    grid across threads, where a loop over the layers alone has one iteration without a sensor)."""
    F, S, L = sample_coordinates(tc)
    if first_subpixel:
        F, S = F[:1], S[:1]
    if flat:
        T, n2, P = L.shape[0], F.shape[0], F.shape[1]
        F, S, L = (c.expand(T, n2, P).reshape(T * n2, P) for c in (F, S, L))
    pos = [tp.pix0[j] + F * tp.fdet[j] + S * tp.sdet[j] + L * tp.odet[j] for j in range(3)]
    if spec.curved:
        pos = curve(pos, tp.fdet, tp.sdet, tc.beam, tp.distance)
    return tuple(pos)


def _rotate(v: Sequence[torch.Tensor], u: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
    """Rodrigues rotation of the vector field ``v`` (3 tensors) about the unit axis ``u`` [3] by angles ``t``."""
    c, s = torch.cos(t), torch.sin(t)
    udv = _dot3(v, u)
    cross = [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]]
    return [v[j] * c + cross[j] * s + u[j] * udv * (1.0 - c) for j in range(3)]


def curve(pos: Sequence[torch.Tensor], fdet: torch.Tensor, sdet: torch.Tensor, beam: torch.Tensor,
          D: torch.Tensor) -> List[torch.Tensor]:
    """nanoBragg's curved detector (spec §5.3): AX(f', Z/D)·AX(s', Y/D)·(D·beam), Y and Z the lab y, z (mm) of the
    flat positions ``pos`` (3 tensors of one shape); ``fdet``, ``sdet`` [3] rotated unit axes, ``beam`` [3] unit
    beam direction, ``D`` [] radius (mm).  Returns 3 tensors of that shape (mm), every point at distance D."""
    v = [torch.ones_like(pos[1]) * (D * beam[j]) for j in range(3)]
    v = _rotate(v, sdet, pos[1] / D)
    return _rotate(v, fdet, pos[2] / D)


def polarization(inc: torch.Tensor, d: Sequence[torch.Tensor], E: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Kahn factor ½(1 + cos²2θ − K·cos2ψ·sin²2θ) for incident ``inc`` [...,3] (broadcast against the components of
    ``d``) and scattered unit directions ``d`` (3 tensors); written without atan2: cos2ψ·sin²2θ = x² − y² with x, y
    the components of d along E_in = unit(i × B) and B = unit(E × i).

    A source along the E vector ``E`` [3] has no polarization plane (E × inc = 0; nanoBragg divides by zero and
    gives NaN): there the K term is dropped, ½(1 + cos²2θ), the factor averaged over every orientation of the
    plane (a deliberate deviation, docs/nanobragg-differences.md).  Value and gradient stay finite (double where)."""
    i = [inc[..., j] for j in range(3)]
    B = [E[1] * i[2] - E[2] * i[1], E[2] * i[0] - E[0] * i[2], E[0] * i[1] - E[1] * i[0]]
    nb2 = _dot3(B, B)
    plane = nb2 > torch.finfo(nb2.dtype).tiny
    nb = torch.sqrt(torch.where(plane, nb2, torch.ones_like(nb2)))
    B = [b / nb for b in B]
    Ein = [i[1] * B[2] - i[2] * B[1], i[2] * B[0] - i[0] * B[2], i[0] * B[1] - i[1] * B[0]]
    ne2 = _dot3(Ein, Ein)
    ne = torch.sqrt(torch.where(plane, ne2, torch.ones_like(ne2)))
    c2t = _dot3(i, d)
    x = _dot3([e / ne for e in Ein], d)
    y = _dot3(B, d)
    return 0.5 * (1.0 + c2t * c2t - torch.where(plane, K * (x * x - y * y), torch.zeros_like(x)))


def q_length(d: Sequence[torch.Tensor], inc: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """|q| = |d − i|/λ (Å⁻¹, = 1/d-spacing = 2·sin θ/λ) for unit directions ``d`` (3 × [..., P]) and sources ``inc``
    [K, 3] (unit), ``lam`` [K] (Å) → [..., K, P]."""
    q2 = sum((d[j][..., None, :] - inc[:, j, None]) ** 2 for j in range(3)) / (lam[:, None] ** 2)
    return torch.sqrt(q2)


def _keep(d, inc: torch.Tensor, lam: torch.Tensor, dmin: torch.Tensor) -> torch.Tensor:
    """``-dmin`` test |q|·dmin ≤ 1 for directions ``d`` (3 × [...,P]) and sources ``inc`` [K,3], ``lam`` [K] →
    [..., K, P]."""
    return q_length(d, inc, lam) * dmin <= 1.0


def unit_directions(pos: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Unit directions, squared distances and distances of lab positions ``pos`` (3 tensors of one shape, mm):
    (d: 3 tensors of that shape, R² (mm²), R (mm))."""
    x, y, z = pos
    R2 = x * x + y * y + z * z
    R = torch.sqrt(R2)
    return [x / R, y / R, z / R], R2, R


def solid_angle(R2: torch.Tensor, R: torch.Tensor, tp: TileParams, tc: TileConsts, spec: KernelSpec) -> torch.Tensor:
    """Solid angle Ω (sr) of a pixel seen from samples at squared distance ``R2`` (mm²) and distance ``R`` (mm), any
    one shape ending in the pixel axis: area/R²·close/R (full pixel area ``tc.area``, obliquity from the plane's
    perpendicular distance ``tp.close``);
    ``-point_pixel``: 1/R² with R in metres (nanoBragg's convention, not a solid angle)."""
    if spec.point_pixel:
        return 1.0 / (R2 * M_PER_MM**2)
    return tc.area / R2 * tp.close / R


def capture_fraction(d: Sequence[torch.Tensor], t, tp: TileParams, tc: TileConsts) -> torch.Tensor:
    """Fraction of photons absorbed in sensor layer ``t`` (an int or a tensor broadcasting against ``d``) along unit
    directions ``d`` (3 tensors of one shape): C_t = exp(−t·k/ρ) − exp(−(t+1)·k/ρ), ρ = d·odet, k = Δt·μ
    (``tc.capture_k``, dimensionless) → that shape."""
    rho = _dot3(d, tp.odet)
    return torch.exp(-t * tc.capture_k / rho) - torch.exp(-(t + 1) * tc.capture_k / rho)


def _factor(d, R2, R, tp: TileParams, tc: TileConsts, spec: KernelSpec) -> torch.Tensor:
    """Ω·C·P of every pixel from its sample directions ``d`` (3 × [T, n², P]; only sub-pixel 0 is needed unless
    ``-dmin`` is on) and distances: Ω at the first sub-pixel of layer 0, the capture fraction of the last layer at its
    first sub-pixel, the polarization at the first sample (layer, sub-pixel, source) that passes ``-dmin`` (0 when
    none does; spec Q8, Q18, Q23)."""
    factor = solid_angle(R2[0, 0], R[0, 0], tp, tc, spec)
    factor = factor * pixel_capture(d, tp, tc, spec)
    if spec.nopolar:
        return factor
    if not spec.dmin:
        return factor * polarization(tc.incident_all[0], [c[0, 0] for c in d], tc.polar_axis, tp.polarization)
    flat = [c.reshape(-1, c.shape[-1]) for c in d]
    keep_all = _keep(flat, tc.incident_all, source_wavelengths(tp, tc.lam_factor_all), tc.dmin)  # [TN, Ka, P]
    pol = polarization(tc.incident_all[:, None, :], [c[:, None, :] for c in flat], tc.polar_axis, tp.polarization)
    return factor * _first_kept(pol, keep_all)


def pixel_factor(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> torch.Tensor:
    """The once-per-pixel factor Ω·C·P [P] alone, from the few samples it needs (cheap to differentiate)."""
    d, R2, R = unit_directions(sample_positions(tp, tc, spec, first_subpixel=not spec.dmin))
    return _factor(d, R2, R, tp, tc, spec)


def directions(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit scattered directions d [3, TN, P] and distances R [TN, P] (mm) of every (layer, sub-pixel) sample."""
    d, _, R = unit_directions(sample_positions(tp, tc, spec, flat=True))
    return torch.stack(d), R


def keep_mask(d: torch.Tensor, tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Optional[torch.Tensor]:
    """``-dmin`` mask [TN, K, P] of this chunk's sources (None when the cut is off)."""
    if not spec.dmin:
        return None
    return _keep(list(d), tc.incident, source_wavelengths(tp, tc.lam_factor), tc.dmin)


def pixel_geometry(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Geometry:
    """Directions of every (layer, sub-pixel) sample, the once-per-pixel factor and the ``-dmin`` mask."""
    d, R2, R = unit_directions(sample_positions(tp, tc, spec, flat=True))  # each [TN, P]

    def grid(c):  # [TN, P] → [T, n², P]
        return c.reshape(tc.layers.shape[0], tc.offsets.shape[0], c.shape[-1])

    factor = _factor([grid(c) for c in d], grid(R2), grid(R), tp, tc, spec)
    flat = torch.stack(d)
    return Geometry(flat, factor, keep_mask(flat, tp, tc, spec))


def pixel_capture(d: Sequence[torch.Tensor], tp: TileParams, tc: TileConsts, spec: KernelSpec) -> torch.Tensor:
    """Capture fraction of the last sensor layer at its first sub-pixel, the one the final scaling uses (spec Q8; 1
    without a sensor thickness), from sample directions ``d`` (3 × [T, n², P]) → [P]."""
    if not spec.thick:
        return torch.ones_like(d[0][0, 0])
    return capture_fraction([c[-1, 0] for c in d], tc.layers.shape[0] - 1, tp, tc)


def _first_kept(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` [S1, S2, P] at the first (S1, S2) sample where ``keep`` is True, 0 where none is → [P]."""
    flat_keep = keep.reshape(-1, keep.shape[-1])
    first = torch.argmax(flat_keep.to(torch.int8), dim=0)
    picked = values.reshape(-1, values.shape[-1]).gather(0, first[None, :])[0]
    return torch.where(flat_keep.any(0), picked, torch.zeros_like(picked))


# ----------------------------------------------------------------------------------------------------------------
# sample stage


def a_dot_d(d: torch.Tensor, A: torch.Tensor, i: int) -> torch.Tensor:
    """a_oi·d of every orientation o and direction: row ``i`` of ``A`` [O,3,3] against ``d`` [3, TN, P] →
    [TN, 1, O, P], the dot product written out (a compiler fuses it into the loop over the samples instead of
    writing a matrix product's [O,3,TN,P] result to memory: a compiled forward tile with 4–9 samples per pixel
    takes ≈ 30 % less time)."""
    a = A[None, None, :, i, :, None]  # [1, 1, O, 3, 1]
    return d[0][:, None, None, :] * a[..., 0, :] + d[1][:, None, None, :] * a[..., 1, :] \
        + d[2][:, None, None, :] * a[..., 2, :]


def miller_parts(d: torch.Tensor, A: torch.Tensor, inc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of h = a·(d − i)/λ as matrix products: ``Ad`` [O,3,TN,P] (a·d per orientation and
    direction) and ``Ai`` [K,O,3] (a·i per source and orientation).  The derivative-moments kernel, which keeps
    per-sample values in memory anyway, runs faster on one matrix product than on the written-out form of
    :func:`miller_indices` (measured in place: case B's reverse pass took up to 1.6× longer with it)."""
    O = A.shape[0]
    A2 = A.reshape(O * 3, 3)
    Ad = torch.mm(A2, d.reshape(3, -1)).reshape(O, 3, d.shape[1], d.shape[2])
    Ai = torch.mm(inc, A2.t()).reshape(inc.shape[0], O, 3)
    return Ad, Ai


def miller_indices(d: torch.Tensor, A: torch.Tensor, inc: torch.Tensor, invlam: torch.Tensor) -> List[torch.Tensor]:
    """h_i = a_oi·(d − i_k)/λ_k of every sample: directions ``d`` [3, TN, P], orientations ``A`` [O,3,3] (Å),
    sources ``inc`` [K,3] (unit) and ``invlam`` [K] (Å⁻¹) → 3 × [TN, K, O, P]."""
    Ai = torch.einsum("kj,oij->koi", inc, A)  # [K, O, 3]
    il = invlam[None, :, None, None]
    return [(a_dot_d(d, A, i) - Ai[None, :, :, i, None]) * il for i in range(3)]


def sample_factors(h: Sequence[torch.Tensor], N: torch.Tensor, B0: torch.Tensor, F: torch.Tensor,
                   default_F: torch.Tensor, hkl_min: torch.Tensor, spec: KernelSpec, values_only: bool = False):
    """(F_cell, F_latt) of every sample from its fractional Miller indices ``h`` (3 tensors of one shape): F_latt of
    that shape (the lattice factor of h − round(h), nanoBragg's rounding); F_cell of that shape from the table
    ``F`` [nh, nk, nl] (nearest or tricubic, ``default_F`` outside it), or ``default_F`` [] itself without a table.
    ``N`` [3] cells, ``B0`` [3, 3] reciprocal basis (Å⁻¹), ``hkl_min`` [3] first index of the table;
    ``values_only``: nothing will differentiate the result (:func:`nbtorch.shape.sincg_reduced`)."""
    h0 = [shapes.round_half_down(c) for c in h]
    dh = [c - c0 for c, c0 in zip(h, h0)]
    F_latt = shapes.lattice_factor_components(spec.shape, dh, N, B0, spec.fudge, values_only)
    if not spec.table:
        return default_F, F_latt
    if spec.interpolate:
        return lookup_tricubic_hkl(h, F, default_F, hkl_min), F_latt
    return lookup_nearest_hkl(h0, F, default_F, hkl_min), F_latt


def source_wavelengths(tp: TileParams, lam_factor: torch.Tensor) -> torch.Tensor:
    """λ_k = λ0·factor_k + lam_shift (Å) of the sources with wavelength factors ``lam_factor`` [K] → [K]."""
    return tp.wavelength * lam_factor + tp.lam_shift


def _source_weight(tc: TileConsts) -> torch.Tensor:
    """The sources' weights shaped for the sample tensors [TN, K, O, P] → [1, K, 1, 1]."""
    return tc.weight[None, :, None, None]


def sample_x(h: Sequence[torch.Tensor], N: torch.Tensor, B0: torch.Tensor, F: torch.Tensor, default_F: torch.Tensor,
             hkl_min: torch.Tensor, spec: KernelSpec, values_only: bool = False) -> torch.Tensor:
    """x = (F_cell·F_latt)² of every sample from its Miller indices ``h`` (3 tensors of one shape) → that shape
    (``values_only`` as :func:`sample_factors`)."""
    F_cell, F_latt = sample_factors(h, N, B0, F, default_F, hkl_min, spec, values_only)
    return (F_cell * F_latt) ** 2


def tile_sums(tp: TileParams, tc: TileConsts, spec: KernelSpec,
              values_only: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The forward tile: (S [P] = I_bg + Σ_samples x, factor [P]); the pixel value is scale·S·factor.
    ``values_only``: the caller records no derivatives of the result (eager code then takes faster forms whose
    gradients are not finite everywhere; see :func:`nbtorch.shape.sincg_reduced`)."""
    if spec.running_sum:
        return running_sum_tile(tp, tc, spec)
    geo = pixel_geometry(tp, tc, spec)
    invlam = 1.0 / source_wavelengths(tp, tc.lam_factor)
    h = miller_indices(geo.d, tp.A, tc.incident, invlam)
    x = sample_x(h, tp.ncells, tp.B0, tp.F, tp.default_F, tc.hkl_min, spec, values_only) * _source_weight(tc)
    if geo.keep is not None:
        x = torch.where(geo.keep[:, :, None, :], x, torch.zeros_like(x))
    return tp.I_bg + x.sum((0, 1, 2)), geo.factor


# ----------------------------------------------------------------------------------------------------------------
# derivatives, written out for the hot case (flat detector, square crystal, default_F)


def has_fast_derivatives(spec: KernelSpec) -> bool:
    """Whether :func:`tile_sums_jvp` / :func:`tile_sums_vjp` cover ``spec`` (otherwise autograd of :func:`tile_sums`
    gives the derivatives)."""
    return spec.shape == "square" and not spec.table and not spec.curved and not spec.running_sum


class Partials(NamedTuple):
    """Per-sample partial derivatives of x: ∂x/∂h_i and ∂x/∂N_i (3 tensors each) and ∂x/∂default_F."""

    h: List[torch.Tensor]
    N: List[torch.Tensor]
    default_F: torch.Tensor


def square_partials(h, N: torch.Tensor, F: torch.Tensor) -> Tuple[torch.Tensor, Partials]:
    """x = (F·Π f_i)², f_i = sincg_reduced(Δh_i, N_i), and its partials at every sample (``h``: 3 tensors of one
    shape)."""
    fs, gs, ms = [], [], []
    for i in range(3):
        dh = h[i] - shapes.round_half_down(h[i])
        f, g, m = shapes.sincg_reduced_and_derivatives(dh, N[i])
        fs.append(f)
        gs.append(g)
        ms.append(m)
    others = [fs[1] * fs[2], fs[0] * fs[2], fs[0] * fs[1]]
    F_latt = fs[0] * others[0]
    two = 2.0 * F * F * F_latt
    x = (F * F_latt) ** 2
    dh = [two * gs[i] * others[i] for i in range(3)]
    dN = [two * ms[i] * others[i] for i in range(3)]
    return x, Partials(dh, dN, 2.0 * F * F_latt * F_latt)


def _coordinates(tc: TileConsts, TN: int) -> torch.Tensor:
    """(1, F, S, L) of every (layer·sub-pixel, pixel) sample → [4, TN, P]: pos = pix0 + F·fdet + S·sdet + L·odet."""
    F, S, L = sample_coordinates(tc)
    T, n2, P = L.shape[0], F.shape[0], F.shape[1]
    flat = [c.expand(T, n2, P).reshape(TN, P) for c in (F, S, L)]
    return torch.stack([torch.ones_like(flat[0])] + flat)


#: The frame vectors whose tangents move every sample position (pos = pix0 + F·fdet + S·sdet + L·odet).
FRAME = ("pix0", "fdet", "sdet", "odet")
#: The leaves the once-per-pixel factor depends on (its Jacobian has one row per scalar of these).
FACTOR_FIELDS = ("pix0", "fdet", "sdet", "odet", "close", "distance", "wavelength", "polarization")


class PixelMoments(NamedTuple):
    """Per-pixel moments of a tile from which every first derivative follows (each [..., P]; see
    :func:`derivative_moments`).

    S = I_bg-free Σ x; M [O,3,3,P] = Σ_tn (U_i·d_j − V_ij) (∂S/∂a_oij); Q [4,3,P] = Σ_tn c_m·(Σ_oi a_oij U_i −
    d_j·Σ_oi U_i·(a_oi·d))/R (∂S/∂v_mj for the frame vectors v = pix0, fdet, sdet, odet with c = 1, F, S, L);
    Y = Σ Y·λ0·factor_k/λ_k and Ys = Σ Y·λ0/λ_k (∂S/∂λ0 = −Y/λ0, ∂S/∂lam_shift = −Ys/λ0; Y = Σ_i ∂x/∂h_i·h_i);
    N [3,P]; F = Σ F; factor [P] and its Jacobian J [n, P] over the scalars of :data:`FACTOR_FIELDS`.
    """

    S: torch.Tensor
    M: torch.Tensor
    Q: torch.Tensor
    Y: torch.Tensor
    Ys: torch.Tensor
    N: torch.Tensor
    F: torch.Tensor
    factor: torch.Tensor
    J: torch.Tensor


#: The frame vectors and scalars that the factor of a flat detector varies with (the factor's Jacobian rows for
#: ``distance`` — the curved detector's radius — and ``wavelength`` — which only moves the ``-dmin`` cut, a step —
#: are zero).
_FACTOR_VARYING = ("pix0", "fdet", "sdet", "odet", "close", "polarization")


def factor_jacobian(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """The once-per-pixel factor [P] and its Jacobian [n, P] over the scalars of :data:`FACTOR_FIELDS`, for a flat
    detector (:func:`has_fast_derivatives` cases).

    Each pixel's factor depends on the parameters only through its own samples, so giving every pixel its own copy
    of them (the frame leaves already are per pixel) makes one reverse pass over Σ_p factor_p return every pixel's
    partials at once (pixel-level work only, a few dozen operations)."""
    P = tc.fast.shape[0]
    with torch.enable_grad():
        leaves = {k: _per_pixel(getattr(tp, k).detach(), k, P).clone().requires_grad_() for k in _FACTOR_VARYING}
        factor = pixel_factor(tp._replace(**leaves), tc, spec)
        grads = dict(zip(leaves, torch.autograd.grad(factor.sum(), list(leaves.values()), allow_unused=True,
                                                     materialize_grads=True)))
    rows = [grads[k].reshape(-1, P) if k in grads else torch.zeros(getattr(tp, k).numel(), P, dtype=factor.dtype,
                                                                     device=factor.device) for k in FACTOR_FIELDS]
    return factor.detach(), torch.cat(rows)


#: The TileParams leaves that hold one value (or vector) per pixel: [3, P] or [P].
PER_PIXEL = ("pix0", "fdet", "sdet", "odet", "close")


def _per_pixel(t: torch.Tensor, field: str, P: int) -> torch.Tensor:
    """A leaf of ``field`` as one copy per pixel (trailing axis P): per-pixel leaves as they are, others expanded."""
    return t if field in PER_PIXEL else t[..., None].expand(*t.shape, P)


def _masked(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return x if keep is None else torch.where(keep, x, torch.zeros_like(x))


def derivative_moments(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> PixelMoments:
    """The one pass over every sample that first derivatives need (:func:`has_fast_derivatives` cases): the
    sample moments (:func:`sample_moments`) and the once-per-pixel factor with its Jacobian."""
    return PixelMoments(*sample_moments(tp, tc, spec), *factor_jacobian(tp, tc, spec))


class SampleTerms(NamedTuple):
    """The per-sample terms that the moment kernels start from (:func:`sample_terms`)."""

    d: torch.Tensor  # [3, TN, P] unit directions
    R: torch.Tensor  # [TN, P] distances (mm)
    keep: Optional[torch.Tensor]  # [TN, K, 1, P] ``-dmin`` mask, or None
    invlam: torch.Tensor  # [K] 1/λ_k (Å⁻¹)
    Ad: Optional[torch.Tensor]  # [O, 3, TN, P] a·d (None when written out)
    h: List[torch.Tensor]  # 3 × [TN, K, O, P] Miller indices
    x: torch.Tensor  # [TN, K, O, P] x times the source weight
    parts: Partials  # its partials, times the source weight
    W: List[torch.Tensor]  # 3 × [TN, K, O, P] W_i = ∂x/∂h_i/λ_k, 0 where ``-dmin`` rejects


def sample_terms(tp: TileParams, tc: TileConsts, spec: KernelSpec, written_out: bool = False) -> SampleTerms:
    """Directions, Miller indices, x and its partials of every sample (:func:`has_fast_derivatives` cases).
    ``written_out``: the Miller indices of :func:`miller_indices` and no ``Ad`` (None) — faster compiled for the
    orientation moment's one fused loop; else from the matrix products of :func:`miller_parts`."""
    d, R = directions(tp, tc, spec)
    keep = keep_mask(d, tp, tc, spec)
    keep = None if keep is None else keep[:, :, None, :]
    invlam = 1.0 / source_wavelengths(tp, tc.lam_factor)
    il = invlam[None, :, None, None]
    if written_out:
        Ad, h = None, miller_indices(d, tp.A, tc.incident, invlam)
    else:
        Ad, Ai = miller_parts(d, tp.A, tc.incident)
        h = [(Ad[:, i].transpose(0, 1)[:, None] - Ai[None, :, :, i, None]) * il for i in range(3)]
    x, parts = square_partials(h, tp.ncells, tp.default_F)
    w = _source_weight(tc)  # x and its partials are linear in the weight: every moment carries it
    x, parts = x * w, Partials([p * w for p in parts.h], [n * w for n in parts.N], parts.default_F * w)
    W = [_masked(parts.h[i] * il, keep) for i in range(3)]
    return SampleTerms(d, R, keep, invlam, Ad, h, x, parts, W)


def _orientation_moment(t: SampleTerms, tc: TileConsts) -> torch.Tensor:
    """M [O, 3, 3, P] = Σ_tn,k W_i·(d_j − i_kj) = ∂S/∂a_oij of every pixel."""
    dj = [t.d[j][:, None, None, :] for j in range(3)]  # [TN, 1, 1, P]
    inc = [tc.incident[None, :, j, None, None] for j in range(3)]  # [1, K, 1, 1]
    M = torch.stack([torch.stack([(t.W[i] * (dj[j] - inc[j])).sum((0, 1)) for j in range(3)]) for i in range(3)])
    return M.permute(2, 0, 1, 3)


#: The leaves whose reverse-mode gradient needs the orientation moment M alone (:func:`orientation_moments`): the
#: orientations, and the leaves that a :func:`has_fast_derivatives` tile does not depend on (B0, distance, F).
ORIENTATION_FIELDS = ("A", "B0", "distance", "F")


def orientation_moments(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Tuple[torch.Tensor]:
    """(M,): the orientation moment of :func:`sample_moments` alone, [O, 3, 3, P] — what reverse mode needs for
    the leaves of :data:`ORIENTATION_FIELDS` (a gradient of crystal parameters: cell, misset, mosaic), at about half
    the cost of every moment (no frame, wavelength or N moments)."""
    return (_orientation_moment(sample_terms(tp, tc, spec, written_out=True), tc),)


def sample_moments(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Tuple[torch.Tensor, ...]:
    """The sample part of :func:`derivative_moments`: (S, M, Q, Y, Ys, N, F) of :class:`PixelMoments`.

    Per sample, with W_i = ∂x/∂h_i/λ_k (``-dmin`` rejects 0) and a = the orientation's rows: ∂x/∂a_oij = W_i·(d_j −
    i_kj); through the directions, ∂x/∂d_j = Σ_i W_i·a_oij and ∂d/∂pos = (1 − d dᵀ)/R, so a frame vector v_m (pix0,
    fdet, sdet, odet with coordinate c_m = 1, F, S, L) enters as c_m/R·Σ_i W_i·(a_oij − d_j·(a_oi·d)).  Every
    moment is one sum over the layer·sub-pixel and source axes of a per-sample expression (kept per orientation,
    [O, P]), so a compiler can take them all in the loops that compute x and its partials, without writing
    per-sample values to memory.  Forward mode for any number of tangents (:func:`jvp_from_moments`) is a small
    product of the moments, which is what makes ``jacfwd`` over many parameters cost one pass over the samples.
    """
    t = sample_terms(tp, tc, spec)
    d, R, keep, invlam, Ad, h, x, parts, W = t
    dj = [d[j][:, None, None, :] for j in range(3)]  # [TN, 1, 1, P]
    Adi = [Ad[:, i].transpose(0, 1)[:, None] for i in range(3)]  # [TN, 1, O, P]
    a = tp.A[None, None, :, :, :, None]  # [1, 1, O, 3, 3, 1]
    G = W[0] * Adi[0] + W[1] * Adi[1] + W[2] * Adi[2]
    e = [W[0] * a[..., 0, j, :] + W[1] * a[..., 1, j, :] + W[2] * a[..., 2, j, :] - dj[j] * G for j in range(3)]
    c = (_coordinates(tc, R.shape[0]) / R)[:, :, None, None, :]  # [4, TN, 1, 1, P]

    def red(t):  # Σ over layers·sub-pixels and sources → [O, P]
        return t.sum((0, 1))

    def total(t):
        return red(_masked(t, keep)).sum(0)

    Q = torch.stack([torch.stack([red(c[m] * e[j]) for j in range(3)]) for m in range(4)]).sum(2)  # [4, 3, P]
    hh = parts.h[0] * h[0] + parts.h[1] * h[1] + parts.h[2] * h[2]
    q = (tp.wavelength * invlam)[None, :, None, None]  # λ0/λ_k
    return (total(x), _orientation_moment(t, tc), Q, total(hh * (q * tc.lam_factor[None, :, None, None])),
            total(hh * q), torch.stack([total(n) for n in parts.N]), total(parts.default_F))


def jvp_from_moments(pm: PixelMoments, tp: TileParams, tangents: TileParams) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Ṡ [C, P], ḟactor [C, P]) for C tangent directions: a TileParams whose leaves carry a leading C axis, or are
    None (no tangent; F must be None).  Cost ∝ C × pixels, independent of the samples (the frame's tangents are
    per pixel, [C, 3, P])."""
    C = next(t.shape[0] for t in tangents if t is not None)
    like = pm.S

    def tan(k):
        t = getattr(tangents, k)
        return torch.zeros((C,) + getattr(tp, k).shape, dtype=like.dtype, device=like.device) if t is None else t

    v = torch.stack([tan(k) for k in FRAME], 1)  # [C, 4, 3, P]: the frame is per pixel
    P = pm.S.shape[0]
    Sdot = (v * pm.Q).sum((1, 2))
    if tangents.A is not None:
        Sdot = Sdot + tangents.A.reshape(C, -1) @ pm.M.reshape(-1, P)
    if tangents.wavelength is not None:
        Sdot = Sdot - (tangents.wavelength / tp.wavelength)[:, None] * pm.Y
    if tangents.lam_shift is not None:
        Sdot = Sdot - (tangents.lam_shift / tp.wavelength)[:, None] * pm.Ys
    if tangents.ncells is not None:
        Sdot = Sdot + tangents.ncells @ pm.N
    if tangents.default_F is not None:
        Sdot = Sdot + tangents.default_F[:, None] * pm.F
    if tangents.I_bg is not None:
        Sdot = Sdot + tangents.I_bg[:, None]
    xdot = torch.cat([_per_pixel(tan(k), k, P).reshape(C, -1, P) for k in FACTOR_FIELDS], 1)  # [C, n, P]
    return Sdot, (xdot * pm.J).sum(1)


def vjp_from_moments(moments: Sequence[torch.Tensor], tp: TileParams, tc: TileConsts, spec: KernelSpec,
                     gS: torch.Tensor, gf: torch.Tensor, fields: Optional[Sequence[str]] = None) -> dict:
    """Reverse mode of a tile (:func:`has_fast_derivatives` cases): the gradients of ⟨gS, S⟩ + ⟨gf, factor⟩ (gS, gf:
    [P]) with respect to the leaves of ``tp`` they reach, as a dict field → tensor of the leaf's shape.

    The sample part is the transpose of :func:`jvp_from_moments`: each moment of :func:`sample_moments` (``moments``)
    contracted with gS over pixels; the factor part is one reverse pass through :func:`pixel_factor` (pixel-level
    work), run only when ``fields`` (the leaves asked for; None: all) names a leaf the factor varies with — a
    gradient of the cell alone needs none.  Leaves reached by neither (B0, distance, F) are absent; leaves that the
    factor varies with are absent too when ``fields`` leaves them out.  ``moments`` may also be the (M,) of
    :func:`orientation_moments` when ``fields`` lie within :data:`ORIENTATION_FIELDS`: then "A" alone is returned."""
    if len(moments) == 1:
        return {"A": moments[0] @ gS}
    _, M, Q, Y, Ys, N, F = moments
    grads = {"A": M @ gS, "wavelength": -(Y @ gS) / tp.wavelength, "lam_shift": -(Ys @ gS) / tp.wavelength,
             "ncells": N @ gS, "default_F": F @ gS, "I_bg": gS.sum()}
    varying = [k for k in _FACTOR_VARYING if fields is None or k in fields]
    if not varying:
        return grads
    frame = Q * gS  # [4, 3, P]: the frame leaves are per pixel
    with torch.enable_grad():
        leaves = {k: getattr(tp, k).detach().requires_grad_(k in varying) for k in _FACTOR_VARYING}
        factor = pixel_factor(tp._replace(**leaves), tc, spec)
        asked = [leaves[k] for k in varying]
        fgrads = (torch.autograd.grad(factor @ gf, asked, allow_unused=True, materialize_grads=True)
                  if factor.requires_grad else [torch.zeros_like(v) for v in asked])
    for k, g in zip(varying, fgrads):
        grads[k] = g + frame[FRAME.index(k)] if k in FRAME else g
    return grads


# ----------------------------------------------------------------------------------------------------------------
# nanoBragg's -oversample_thick/_polar/_omega accumulation (eager only)


def _per_sample_factors(tp: TileParams, tc: TileConsts, spec: KernelSpec):
    """Directions d (3 × [TN, P]), Ω [T, n², P], capture C_t [T, n², P] and polarization [TN, K, P] of every sample."""
    d, R2, R = unit_directions(sample_positions(tp, tc, spec))
    x = d[0]
    omega = solid_angle(R2, R, tp, tc, spec)
    if spec.thick:
        t = torch.arange(x.shape[0], dtype=x.dtype, device=x.device)[:, None, None]
        capture = capture_fraction(d, t, tp, tc)
    else:
        capture = torch.ones_like(x)
    T, n2, P = x.shape
    flat = [c.reshape(T * n2, P) for c in d]
    if spec.nopolar:
        pol = torch.ones((T * n2, tc.incident.shape[0], P), dtype=x.dtype, device=x.device)
    else:
        pol = polarization(tc.incident[:, None, :], [c[:, None, :] for c in flat], tc.polar_axis, tp.polarization)
    return flat, omega, capture, pol


def _times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b with 0·inf = 0."""
    return torch.where(a == 0, torch.zeros_like(b), a * b)


def running_sum_tile(tp: TileParams, tc: TileConsts, spec: KernelSpec) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S, factor) with nanoBragg's running-sum accumulation (spec Q7), in closed form.

    The C program multiplies the running sum by each sample's factors: I_n = (I_{n−1} + x_n)·c_n over the samples in
    loop order (layer, sub-pixel, source, orientation), skipping samples cut by ``-dmin`` or with F_latt = 0 (no
    water).  Hence S = I_bg·Π c + Σ_n x_n·Π_{m≥n} c_m (a reverse cumulative product); ``factor`` holds the
    once-per-pixel factors whose flags are off.  Needs every sample of a pixel in one tile.
    """
    flat, omega, capture, pol = _per_sample_factors(tp, tc, spec)
    TN, K, P = pol.shape
    invlam = 1.0 / source_wavelengths(tp, tc.lam_factor)
    h = miller_indices(torch.stack(flat), tp.A, tc.incident, invlam)
    F_cell, F_latt = sample_factors(h, tp.ncells, tp.B0, tp.F, tp.default_F, tc.hkl_min, spec)
    x = (F_cell * F_latt) ** 2 * _source_weight(tc)
    keep = _keep(flat, tc.incident, source_wavelengths(tp, tc.lam_factor), tc.dmin)[:, :, None, :] if spec.dmin else None
    c = torch.ones_like(x)
    if spec.running_thick:
        c = c * capture.reshape(TN, 1, 1, P)
    if spec.running_omega:
        c = c * omega.reshape(TN, 1, 1, P)
    if spec.running_polar:
        c = c * pol[:, :, None, :]
    skip = (F_latt == 0) & (tp.I_bg == 0)
    if keep is not None:
        skip = skip | ~keep
        x = torch.where(keep, x, torch.zeros_like(x))
    c = torch.where(skip, torch.ones_like(c), c).reshape(-1, P)
    suffix = torch.flip(torch.cumprod(torch.flip(c, [0]), 0), [0])
    # the products can overflow (e.g. -point_pixel Ω ~ 1e3 per sample): a zero term stays zero, as in the C loop
    S = _times(tp.I_bg, suffix[0]) + _times(x.reshape(-1, P), suffix).sum(0)
    factor = torch.ones_like(S)
    if not spec.running_thick:
        factor = factor * capture[-1, 0]
    if not spec.running_omega:
        factor = factor * omega[0, 0]
    if not spec.running_polar and not spec.nopolar:
        if spec.dmin:
            factor = factor * _first_kept(pol, keep[:, :, 0, :])
        else:
            factor = factor * pol[0, 0]
    return S, factor
