"""Parameterisation: which parts of the model are free, as increments about a reference, packed in a flat vector.

A :class:`Parameterisation` is built from a reference model (``Params`` + ``Setup``) and a list of free *groups*.  Its
flat vector ``x`` holds **increments** about the reference, so a fit starts at ``x = 0`` and every entry is well
scaled.  The units of ``x`` (what a minimiser sees) are, per group:

=====================  ===============================  ==================================================================
group                  scalars (names)                  meaning of x
=====================  ===============================  ==================================================================
``cell``               ``cell.a`` … ``cell.gamma``      increments of the free cell values (Å, degrees); which ones are
                       (subset per crystal system)      free depends on the crystal system (see :data:`CRYSTAL_SYSTEMS`)
``orientation``        ``orientation.x/.y/.z``          small rotations (mrad) about the lab x, y, z axes:
                                                        U = Φz·Φy·Φx·U_ref (DIALS' U = Φ3·Φ2·Φ1·U0)
``distance``           ``distance``                     shift (mm) of ``detector.distance``
``beam_center``        ``beam_center.x/.y``             shifts (mm) of the beam centre (converted to pixels for XDS/DIALS,
                                                        whose ``beam_center`` is ORGX/ORGY in pixels)
``detector_rotation``  ``detector_rotation.x/.y/.z``    tilts (mrad) added to ``-detector_rotx/y/z``
``twotheta``           ``twotheta``                     tilt (mrad) added to ``-twotheta``
``wavelength``         ``wavelength``                   ln(λ/λ_ref)
``ncells``             ``ncells`` or ``ncells.a/.b/.c`` ln(N/N_ref) (one isotropic scalar or three)
``mosaic``             ``mosaic``                       ln(spread/spread_ref)
``scale``              ``scale``                        ln(s), fluence = s·fluence_ref
``background``         ``background.constant``,         refine-owned background added to the model image (photons/pixel):
                       ``background.fast``,             b = c0 + c_f·u + c_s·v with u, v ∈ [−½, ½] the fast/slow pixel
                       ``background.slow``,             coordinates across the detector; ``background.water`` =
                       ``background.water``             ln of the water-scattering intensity scale
                                                        (water_size = w_ref·exp(x/3)); present when the reference has
                                                        ``water_size`` > 0
=====================  ===============================  ==================================================================

Sub-groups select parts of a group: ``background.constant`` (c0 only), ``background.plane`` (c0, c_f, c_s),
``background.water``; single scalars may also be named directly (``cell.a``, ``orientation.z``, ``ncells.c`` …).

Each scalar has a *user value* (what a result reports): linear scalars ``u = ref + factor·x`` (cell in Å/deg,
orientation increments in mrad, distance in mm, beam centre in mm or px, tilts in degrees, background in photons),
log scalars ``u = ref·exp(factor·x)`` (λ in Å, N, mosaic spread in degrees, scale, water size in µm).  Bounds and
Gaussian priors are given in user units and mapped onto ``x``.

Orientation (choice documented here): while the orientation is free, :meth:`Parameterisation.unpack` returns
``crystal.orientation = Φ(x)·XYZ(misset_ref)·U_ref`` and ``crystal.misset = 0``, which ``simulate`` turns into the same
rotation.  The refined model is written back as nanoBragg flags by :mod:`refine.result`: ``-cell`` models as
``-misset`` = the XYZ decomposition of the total rotation, ``-mat`` models as a new MOSFLM matrix.

``pack`` and ``unpack`` are pure functions of their arguments and the (frozen) parameterisation; ``unpack`` is
differentiable, so ``torch.func.jacfwd(lambda x: simulate(par.unpack(x), setup))(x)`` works.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from nbtorch.rotation import rot_xyz, xyz_angles  # noqa: F401  (xyz_angles re-exported)
from nbtorch.simulate import crystal_rotation
from nbtorch.types import Params, Setup
from nbtorch.units import DEG_PER_MRAD, mrad2rad, rad2mrad

GROUPS = (
    "cell", "orientation", "distance", "beam_center", "detector_rotation", "twotheta", "wavelength", "ncells",
    "mosaic", "scale", "background",
)
#: Groups refined by default (:func:`refine.fit`).
DEFAULT_FREE = ("cell", "orientation", "distance", "beam_center", "scale")

#: Crystal systems → the free cell values; the others are tied (b = a, …) or fixed (90°, 120°).
CRYSTAL_SYSTEMS = {
    "cubic": ("a",),
    "tetragonal": ("a", "c"),
    "orthorhombic": ("a", "b", "c"),
    "hexagonal": ("a", "c"),
    "monoclinic": ("a", "b", "c", "beta"),
    "triclinic": ("a", "b", "c", "alpha", "beta", "gamma"),
}
_CELL_INDEX = {"a": 0, "b": 1, "c": 2, "alpha": 3, "beta": 4, "gamma": 5}
# rows of the 6-vector each free cell value drives, per system
_CELL_ROWS = {
    "cubic": {"a": (0, 1, 2)},
    "tetragonal": {"a": (0, 1), "c": (2,)},
    "orthorhombic": {"a": (0,), "b": (1,), "c": (2,)},
    "hexagonal": {"a": (0, 1), "c": (2,)},
    "monoclinic": {"a": (0,), "b": (1,), "c": (2,), "beta": (4,)},
    "triclinic": {"a": (0,), "b": (1,), "c": (2,), "alpha": (3,), "beta": (4,), "gamma": (5,)},
}
_FIXED_ANGLES = {
    "cubic": (90.0, 90.0, 90.0), "tetragonal": (90.0, 90.0, 90.0), "orthorhombic": (90.0, 90.0, 90.0),
    "hexagonal": (90.0, 90.0, 120.0), "monoclinic": (90.0, None, 90.0), "triclinic": (None, None, None),
}
_SUBGROUPS = {
    "background.constant": ("background.constant",),
    "background.plane": ("background.constant", "background.fast", "background.slow"),
    "background.water": ("background.water",),
    "water": ("background.water",),
}
MRAD_TO_DEG = DEG_PER_MRAD


@dataclasses.dataclass(frozen=True)
class Scalar:
    """One free scalar of the flat vector.

    ``name`` (e.g. ``"cell.a"``), ``group`` (one of :data:`GROUPS`), ``kind`` ('linear' or 'log'), ``ref`` and
    ``factor`` (user value ``ref + factor·x`` or ``ref·exp(factor·x)``), ``unit`` (user unit), ``x_unit`` (unit of the
    increment), ``typical`` (a typical error of x, used to scale gradient-based optimisers), ``lower``/``upper``
    (bounds on x, ±inf when none), ``prior`` ((mean, sigma) in user units, or None).
    """

    name: str
    group: str
    kind: str
    ref: float
    factor: float
    unit: str
    x_unit: str
    typical: float
    lower: float = -math.inf
    upper: float = math.inf
    prior: Optional[Tuple[float, float]] = None

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """User value of increment ``x`` (tensor, any shape)."""
        if self.kind == "log":
            return self.ref * torch.exp(self.factor * x)
        return self.ref + self.factor * x

    def to_x(self, u: float) -> float:
        """Increment giving user value ``u`` (inverse of :meth:`value`)."""
        if self.kind == "log":
            if not u > 0:
                return -math.inf if u == 0 else math.nan
            return math.log(u / self.ref) / self.factor
        return (u - self.ref) / self.factor

    def dvalue_dx(self, x: float) -> float:
        """Derivative of the user value with respect to the increment at ``x``."""
        if self.kind == "log":
            return self.ref * self.factor * math.exp(self.factor * x)
        return self.factor


def total_rotation(params: Params) -> torch.Tensor:
    """The crystal rotation ``XYZ(misset)·orientation`` [3, 3] that ``simulate`` applies to the reciprocal basis."""
    return crystal_rotation(params.crystal)


def symmetrize_cell(cell: Sequence[float], system: str, tol_length: float = 0.02, tol_angle: float = 1.0):
    """The reference cell (a, b, c Å; α, β, γ deg) made exactly ``system``-symmetric (tied lengths averaged, fixed
    angles set).  ``ValueError`` if it deviates from the system by more than ``tol_length`` (relative) or
    ``tol_angle`` (degrees)."""
    if system not in CRYSTAL_SYSTEMS:
        raise ValueError(f"crystal_system must be one of {', '.join(CRYSTAL_SYSTEMS)}; got {system!r}")
    cell = [float(v) for v in cell]
    out = list(cell)
    for name, rows in _CELL_ROWS[system].items():
        vals = [cell[r] for r in rows]
        mean = sum(vals) / len(vals)
        if rows[0] < 3 and max(abs(v - mean) for v in vals) > tol_length * mean:
            raise ValueError(
                f"cell {cell} is not {system}: lengths {[('abc')[r] for r in rows]} differ by more than "
                f"{tol_length:.0%}; choose another crystal_system"
            )
        for r in rows:
            out[r] = mean
    for k, fixed in enumerate(_FIXED_ANGLES[system]):
        if fixed is not None:
            if abs(cell[3 + k] - fixed) > tol_angle:
                raise ValueError(
                    f"cell {cell} is not {system}: {('alpha', 'beta', 'gamma')[k]} = {cell[3 + k]:g} deg should be "
                    f"{fixed:g}; choose another crystal_system"
                )
            out[3 + k] = fixed
    if system == "cubic":
        out[0] = out[1] = out[2] = sum(cell[:3]) / 3.0
    return out


def _expand_free(free: Iterable[str]) -> List[str]:
    """Group/sub-group/scalar names → the ordered list of requested scalar names (validated)."""
    if isinstance(free, str):
        free = [f for f in free.replace(",", " ").split() if f]
    wanted: List[str] = []
    for f in free:
        f = f.strip()
        if f in GROUPS:
            wanted.append(f)
        elif f in _SUBGROUPS:
            wanted.extend(_SUBGROUPS[f])
        elif "." in f and f.split(".")[0] in GROUPS:
            wanted.append(f)
        else:
            raise ValueError(
                f"unknown parameter group {f!r}; allowed: {', '.join(GROUPS)} (sub-groups: "
                f"{', '.join(_SUBGROUPS)}; or single scalars such as cell.a, orientation.z, ncells.c)"
            )
    return wanted


class Parameterisation:
    """Free scalars about a reference model; ``pack``/``unpack`` between a flat vector and :class:`Params`.

    Build with :func:`parameterise`.  Attributes: ``ref`` (reference Params), ``setup``, ``scalars``
    (list of :class:`Scalar`), ``names``, ``n`` (length of x), ``crystal_system``, ``background_ref`` (reference
    plane coefficients [3], photons/pixel).
    """

    def __init__(self, ref: Params, setup: Setup, scalars: List[Scalar], crystal_system: str, cell_base,
                 cell_rows: Dict[str, Tuple[int, ...]], R0: torch.Tensor, background_ref: torch.Tensor,
                 ncells_iso: bool):
        self.ref = ref
        self.setup = setup
        self.scalars = scalars
        self.names = [s.name for s in scalars]
        self.n = len(scalars)
        self.crystal_system = crystal_system
        self.cell_base = cell_base  # [6] tensor
        self.cell_rows = cell_rows
        self.R0 = R0
        self.background_ref = background_ref
        self.ncells_iso = ncells_iso
        self._slot = {s.name: i for i, s in enumerate(scalars)}
        like = ref.crystal.cell
        # cell = cell_base + M·x[cell slots]: M [6, k] maps each free cell value onto the rows it drives
        self._cell_slots = [self._slot[f"cell.{nm}"] for nm in cell_rows]
        M = torch.zeros(6, len(cell_rows), dtype=like.dtype, device=like.device)
        for j, rows in enumerate(cell_rows.values()):
            M[list(rows), j] = 1.0
        self._cell_M = M
        self._log = torch.tensor([s.kind == "log" for s in scalars], device=like.device)
        self._refv = torch.tensor([s.ref for s in scalars], dtype=like.dtype, device=like.device)
        self._fac = torch.tensor([s.factor for s in scalars], dtype=like.dtype, device=like.device)

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self):
        return self.ref.crystal.cell.dtype

    @property
    def device(self):
        return self.ref.crystal.cell.device

    def groups(self) -> List[str]:
        """The groups with at least one free scalar, in :data:`GROUPS` order."""
        present = {s.group for s in self.scalars}
        return [g for g in GROUPS if g in present]

    def index(self, name_or_group: str) -> List[int]:
        """Positions in x of a scalar name or of every scalar of a group / sub-group."""
        if name_or_group in self._slot:
            return [self._slot[name_or_group]]
        if name_or_group in _SUBGROUPS:
            return [self._slot[n] for n in _SUBGROUPS[name_or_group] if n in self._slot]
        return [i for i, s in enumerate(self.scalars) if s.group == name_or_group]

    def _take(self, x: torch.Tensor, names: Sequence[str]) -> List[Optional[torch.Tensor]]:
        return [x[..., self._slot[n]] if n in self._slot else None for n in names]

    def zeros(self) -> torch.Tensor:
        """The reference point x = 0 ([n], the reference dtype/device)."""
        return torch.zeros(self.n, dtype=self.dtype, device=self.device)

    def bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds on x ([n] each; ±inf where none)."""
        lo = torch.tensor([s.lower for s in self.scalars], dtype=self.dtype, device=self.device)
        hi = torch.tensor([s.upper for s in self.scalars], dtype=self.dtype, device=self.device)
        return lo, hi

    def typical(self) -> torch.Tensor:
        """Typical error of each entry of x ([n]): used to precondition gradient-based optimisers."""
        return torch.tensor([s.typical for s in self.scalars], dtype=self.dtype, device=self.device)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """User values of every free scalar ([n]); differentiable."""
        return torch.where(self._log, self._refv * torch.exp(self._fac * x), self._refv + self._fac * x)

    # ------------------------------------------------------------------ unpack
    def unpack(self, x: torch.Tensor) -> Params:
        """Flat increments ``x`` [n] → :class:`Params` (pure, differentiable; works under ``torch.func``)."""
        ref = self.ref
        c, b, d, bg = ref.crystal, ref.beam, ref.detector, ref.background
        # cell
        cell = c.cell
        if self.cell_rows:
            cell = self.cell_base + x[..., self._cell_slots] @ self._cell_M.T
        # orientation
        misset, orientation = c.misset, c.orientation
        ox = self._take(x, ("orientation.x", "orientation.y", "orientation.z"))
        if any(v is not None for v in ox):
            zero = x.new_zeros(x.shape[:-1])
            ang = mrad2rad(torch.stack([v if v is not None else zero for v in ox], -1))
            orientation = rot_xyz(ang) @ self.R0
            misset = torch.zeros_like(c.misset)
        # ncells
        ncells = c.ncells
        if self.ncells_iso and "ncells" in self._slot:
            ncells = c.ncells * torch.exp(x[..., self._slot["ncells"]])[..., None]
        else:
            nx = self._take(x, ("ncells.a", "ncells.b", "ncells.c"))
            if any(v is not None for v in nx):
                zero = x.new_zeros(x.shape[:-1])
                ncells = c.ncells * torch.exp(torch.stack([v if v is not None else zero for v in nx], -1))
        mosaic = c.mosaic_spread
        if "mosaic" in self._slot:
            mosaic = c.mosaic_spread * torch.exp(x[..., self._slot["mosaic"]])
        crystal = c._replace(cell=cell, misset=misset, orientation=orientation, ncells=ncells, mosaic_spread=mosaic)
        # beam
        wavelength, fluence = b.wavelength, b.fluence
        if "wavelength" in self._slot:
            wavelength = b.wavelength * torch.exp(x[..., self._slot["wavelength"]])
        if "scale" in self._slot:
            fluence = b.fluence * torch.exp(x[..., self._slot["scale"]])
        beam = b._replace(wavelength=wavelength, fluence=fluence)
        # detector
        distance = d.distance
        if "distance" in self._slot:
            distance = d.distance + x[..., self._slot["distance"]]
        bc = d.beam_center
        bx = self._take(x, ("beam_center.x", "beam_center.y"))
        if any(v is not None for v in bx):
            zero = x.new_zeros(x.shape[:-1])
            shift = torch.stack([v if v is not None else zero for v in bx], -1)
            bc = d.beam_center + shift * self._bc_factor()
        rot = d.rotation
        rx = self._take(x, ("detector_rotation.x", "detector_rotation.y", "detector_rotation.z"))
        if any(v is not None for v in rx):
            zero = x.new_zeros(x.shape[:-1])
            rot = d.rotation + torch.stack([v if v is not None else zero for v in rx], -1) * MRAD_TO_DEG
        tt = d.twotheta
        if "twotheta" in self._slot:
            tt = d.twotheta + x[..., self._slot["twotheta"]] * MRAD_TO_DEG
        detector = d._replace(distance=distance, beam_center=bc, rotation=rot, twotheta=tt)
        water = bg.water_size
        if "background.water" in self._slot:
            water = bg.water_size * torch.exp(x[..., self._slot["background.water"]] / 3.0)
        return Params(crystal, beam, detector, ref.structure, bg._replace(water_size=water))

    def _bc_factor(self) -> float:
        """User beam-centre units per mm: 1 (mm conventions) or 1/pixel (XDS/DIALS ORGX/ORGY in pixels)."""
        return 1.0 / self.setup.pixel_size if self.setup.convention in ("XDS", "DIALS") else 1.0

    def plane(self, x: torch.Tensor) -> torch.Tensor:
        """Refine-owned background coefficients (c0, c_fast, c_slow) [3] (photons/pixel) at ``x``."""
        parts = self._take(x, ("background.constant", "background.fast", "background.slow"))
        out = []
        for k, v in enumerate(parts):
            out.append(self.background_ref[k] + v if v is not None else self.background_ref[k].expand(x.shape[:-1]))
        return torch.stack(out, -1)

    def has_plane(self) -> bool:
        """True when the background plane is non-zero or free (so it must be added to the model)."""
        return bool((self.background_ref != 0).any()) or any(
            n in self._slot for n in ("background.constant", "background.fast", "background.slow"))

    # ------------------------------------------------------------------ pack
    def pack(self, params: Params, plane: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:class:`Params` (and optional plane coefficients [3]) → increments x [n] about the reference (pure).

        Inverse of :meth:`unpack` for models of the parameterised family (fixed parts equal to the reference)."""
        ref = self.ref
        out = []
        R = None
        for s in self.scalars:
            g, name = s.group, s.name
            if g == "cell":
                key = name.split(".")[1]
                row = self.cell_rows[key][0]
                out.append(params.crystal.cell[row] - self.cell_base[row])
            elif g == "orientation":
                if R is None:
                    R = rad2mrad(xyz_angles(total_rotation(params) @ self.R0.transpose(-1, -2)))
                out.append(R["xyz".index(name[-1])])
            elif name == "distance":
                out.append(params.detector.distance - ref.detector.distance)
            elif g == "beam_center":
                k = "xy".index(name[-1])
                out.append((params.detector.beam_center[k] - ref.detector.beam_center[k]) / self._bc_factor())
            elif g == "detector_rotation":
                k = "xyz".index(name[-1])
                out.append((params.detector.rotation[k] - ref.detector.rotation[k]) / MRAD_TO_DEG)
            elif name == "twotheta":
                out.append((params.detector.twotheta - ref.detector.twotheta) / MRAD_TO_DEG)
            elif name == "wavelength":
                out.append(torch.log(params.beam.wavelength / ref.beam.wavelength))
            elif name == "ncells":
                out.append(torch.log(params.crystal.ncells / ref.crystal.ncells).mean())
            elif g == "ncells":
                k = "abc".index(name[-1])
                out.append(torch.log(params.crystal.ncells[k] / ref.crystal.ncells[k]))
            elif name == "mosaic":
                out.append(torch.log(params.crystal.mosaic_spread / ref.crystal.mosaic_spread))
            elif name == "scale":
                out.append(torch.log(params.beam.fluence / ref.beam.fluence))
            elif name == "background.water":
                out.append(3.0 * torch.log(params.background.water_size / ref.background.water_size))
            elif g == "background":
                k = ("background.constant", "background.fast", "background.slow").index(name)
                pl = self.background_ref if plane is None else torch.as_tensor(plane, dtype=self.dtype)
                out.append(pl[k] - self.background_ref[k])
            else:  # pragma: no cover - names are validated at construction
                raise ValueError(f"unknown scalar {name}")
        if not out:
            return self.zeros()
        return torch.stack([torch.as_tensor(v, dtype=self.dtype, device=self.device) for v in out])

    def describe(self) -> str:
        """One line per free scalar: name, user unit, increment unit, bounds, prior."""
        lines = []
        for s in self.scalars:
            b = "" if (s.lower == -math.inf and s.upper == math.inf) else f" x∈[{s.lower:g}, {s.upper:g}]"
            p = "" if s.prior is None else f" prior {s.prior[0]:g}±{s.prior[1]:g} {s.unit}"
            lines.append(f"{s.name:24s} {s.kind:6s} ref {s.ref:.6g} {s.unit} (x in {s.x_unit}){b}{p}")
        return "\n".join(lines)


def parameterise(
    params: Params,
    setup: Setup,
    free: Iterable[str] = DEFAULT_FREE,
    *,
    crystal_system: str = "triclinic",
    ncells_mode: str = "auto",
    background: Optional[Sequence[float]] = None,
    bounds: Optional[Mapping[str, Tuple[Optional[float], Optional[float]]]] = None,
    priors: Optional[Mapping[str, Tuple[float, float]]] = None,
) -> Parameterisation:
    """Build a :class:`Parameterisation` about the reference ``params``.

    Args:
        params, setup: the reference (starting) model.
        free: groups (:data:`GROUPS`), sub-groups (``background.plane``, ``background.constant``,
            ``background.water``) or single scalar names (``cell.a``, ``orientation.z``, ``ncells.c`` …); a string is
            split on commas/spaces.
        crystal_system: one of :data:`CRYSTAL_SYSTEMS` (constrains the free cell values; the reference cell is made
            exactly symmetric, ``ValueError`` if it is more than 2 % / 1° off).
        ncells_mode: 'isotropic' (one ln-scale for Na, Nb, Nc), 'anisotropic' (three), or 'auto' (isotropic when the
            reference Na = Nb = Nc).
        background: reference background plane (c0, c_fast, c_slow) in photons/pixel (default zeros).
        bounds: {scalar-or-group name: (lower, upper)} in **user units** (None = unbounded side).  ``ncells`` has a
            default lower bound of 1 (nanoBragg's smallest crystal), ``mosaic`` and ``scale`` are positive by
            construction.
        priors: {scalar-or-group name: (mean, sigma)} Gaussian restraints in user units.

    Raises:
        ValueError: unknown names, a group that cannot be refined with this model (e.g. ``mosaic`` with a single
            mosaic domain, ``background.water`` with water_size = 0), bad bounds or priors.
    """
    c = params.crystal
    dt, dev = c.cell.dtype, c.cell.device
    has_water = float(params.background.water_size) > 0
    if ncells_mode not in ("auto", "isotropic", "anisotropic"):
        raise ValueError(f"ncells_mode must be 'auto', 'isotropic' or 'anisotropic'; got {ncells_mode!r}")
    N = [float(v) for v in c.ncells.detach().cpu()]
    ncells_iso = ncells_mode == "isotropic" or (ncells_mode == "auto" and max(N) - min(N) <= 1e-9 * max(N))
    free_list = list(free) if not isinstance(free, str) else [f for f in free.replace(",", " ").split() if f]
    wanted = _expand_free(free_list)
    if crystal_system not in CRYSTAL_SYSTEMS:
        raise ValueError(f"crystal_system must be one of {', '.join(CRYSTAL_SYSTEMS)}; got {crystal_system!r}")

    def want(group, name=None):
        return group in wanted or (name is not None and name in wanted)

    scalars: List[Scalar] = []
    cell_rows: Dict[str, Tuple[int, ...]] = {}
    cell_ref = [float(v) for v in c.cell.detach().cpu()]
    cell_base = c.cell
    # ---- cell
    if want("cell") or any(w.startswith("cell.") for w in wanted):
        sym = symmetrize_cell(cell_ref, crystal_system)
        cell_base = torch.tensor(sym, dtype=dt, device=dev)
        for name in CRYSTAL_SYSTEMS[crystal_system]:
            if want("cell", f"cell.{name}"):
                cell_rows[name] = _CELL_ROWS[crystal_system][name]
                r0 = _CELL_ROWS[crystal_system][name][0]
                is_len = r0 < 3
                scalars.append(Scalar(f"cell.{name}", "cell", "linear", sym[r0], 1.0, "Å" if is_len else "deg",
                                      "Å" if is_len else "deg", 0.005 * sym[r0] if is_len else 0.1))
        bad = [w for w in wanted if w.startswith("cell.") and w[5:] not in CRYSTAL_SYSTEMS[crystal_system]]
        if bad:
            raise ValueError(f"{bad[0]} is not a free cell value of a {crystal_system} cell "
                             f"(free: {', '.join(CRYSTAL_SYSTEMS[crystal_system])})")
    # ---- orientation
    R0 = total_rotation(params)
    for ax in "xyz":
        if want("orientation", f"orientation.{ax}"):
            scalars.append(Scalar(f"orientation.{ax}", "orientation", "linear", 0.0, 1.0, "mrad", "mrad", 2.0))
    # ---- detector
    if want("distance"):
        scalars.append(Scalar("distance", "distance", "linear", float(params.detector.distance), 1.0, "mm", "mm", 0.5))
    px_conv = setup.convention in ("XDS", "DIALS")
    for k, ax in enumerate("xy"):
        if want("beam_center", f"beam_center.{ax}"):
            scalars.append(Scalar(f"beam_center.{ax}", "beam_center", "linear",
                                  float(params.detector.beam_center[k]), 1.0 / setup.pixel_size if px_conv else 1.0,
                                  "px" if px_conv else "mm", "mm", setup.pixel_size))
    for k, ax in enumerate("xyz"):
        if want("detector_rotation", f"detector_rotation.{ax}"):
            scalars.append(Scalar(f"detector_rotation.{ax}", "detector_rotation", "linear",
                                  float(params.detector.rotation[k]), MRAD_TO_DEG, "deg", "mrad", 2.0))
    if want("twotheta"):
        scalars.append(Scalar("twotheta", "twotheta", "linear", float(params.detector.twotheta), MRAD_TO_DEG, "deg",
                              "mrad", 2.0))
    # ---- beam
    if want("wavelength"):
        scalars.append(Scalar("wavelength", "wavelength", "log", float(params.beam.wavelength), 1.0, "Å", "ln", 1e-3))
    # ---- crystal size and mosaic
    if want("ncells") or any(w.startswith("ncells.") for w in wanted):
        if ncells_iso:
            if any(w.startswith("ncells.") for w in wanted):
                raise ValueError("ncells.a/.b/.c need ncells_mode='anisotropic'")
            scalars.append(Scalar("ncells", "ncells", "log", N[0], 1.0, "cells", "ln", 0.1,
                                  lower=min(0.0, math.log(1.0 / N[0]))))
        else:
            for k, ax in enumerate("abc"):
                if want("ncells", f"ncells.{ax}"):
                    scalars.append(Scalar(f"ncells.{ax}", "ncells", "log", N[k], 1.0, "cells", "ln", 0.1,
                                          lower=min(0.0, math.log(1.0 / N[k]))))
    if want("mosaic"):
        spread = float(c.mosaic_spread)
        if setup.n_domains < 2 or not spread > 0:
            raise ValueError("mosaic can only be refined when the starting model has a mosaic spread > 0 and at least "
                             "2 mosaic domains (-mosaic S -mosaic_domains M)")
        scalars.append(Scalar("mosaic", "mosaic", "log", spread, 1.0, "deg", "ln", 0.1))
    if want("scale"):
        scalars.append(Scalar("scale", "scale", "log", 1.0, 1.0, "", "ln", 0.1))
    # ---- background
    bg_ref = torch.zeros(3, dtype=dt, device=dev) if background is None else torch.as_tensor(
        [float(v) for v in background], dtype=dt, device=dev)
    if bg_ref.shape != (3,):
        raise ValueError(f"background must be 3 numbers (c0, c_fast, c_slow) in photons/pixel; got {list(background)}")
    for k, nm in enumerate(("background.constant", "background.fast", "background.slow")):
        if nm in wanted or "background" in wanted:
            scalars.append(Scalar(nm, "background", "linear", float(bg_ref[k]), 1.0, "photons", "photons", 1.0))
    if "background.water" in wanted or ("background" in wanted and has_water):
        if not has_water:
            raise ValueError("background.water needs a starting water_size > 0 (-water SIZE_um)")
        scalars.append(Scalar("background.water", "background", "log", float(params.background.water_size), 1.0 / 3.0,
                              "µm", "ln", 0.1))

    # ---- default bounds of log scalars: the user value stays within e^±10 of the reference
    for i, s in enumerate(scalars):
        if s.kind == "log":
            scalars[i] = dataclasses.replace(s, lower=max(s.lower, -10.0 / s.factor), upper=min(s.upper, 10.0 / s.factor))
    # ---- bounds and priors (user units)
    by_name = {s.name: i for i, s in enumerate(scalars)}

    def targets(key, what):
        if key in by_name:
            return [by_name[key]]
        hits = [i for i, s in enumerate(scalars) if s.group == key or (key in _SUBGROUPS and s.name in _SUBGROUPS[key])]
        if not hits:
            raise ValueError(f"{what} given for {key!r}, which is not a free scalar or group "
                             f"(free: {', '.join(by_name) or 'none'})")
        return hits

    for key, (lo, hi) in (bounds or {}).items():
        for i in targets(key, "bounds"):
            s = scalars[i]
            xlo = -math.inf if lo is None else s.to_x(float(lo))
            xhi = math.inf if hi is None else s.to_x(float(hi))
            if math.isnan(xlo) or math.isnan(xhi) or not xlo < xhi:
                raise ValueError(f"bounds for {s.name} must satisfy lower < upper (user units {s.unit}); got {(lo, hi)}")
            if not xlo <= 0.0 <= xhi:
                raise ValueError(f"bounds {(lo, hi)} for {s.name} exclude the starting value {s.ref:g} {s.unit}")
            scalars[i] = dataclasses.replace(s, lower=xlo, upper=xhi)
    for key, pr in (priors or {}).items():
        mean, sigma = pr
        if not float(sigma) > 0:
            raise ValueError(f"prior sigma for {key} must be > 0; got {sigma}")
        for i in targets(key, "prior"):
            scalars[i] = dataclasses.replace(scalars[i], prior=(float(mean), float(sigma)))

    return Parameterisation(params, setup, scalars, crystal_system, cell_base, cell_rows, R0, bg_ref, ncells_iso)


def unpack(par: Parameterisation, x: torch.Tensor) -> Params:
    """Functional form of :meth:`Parameterisation.unpack`: increments ``x`` [n] → :class:`Params`."""
    return par.unpack(x)


def pack(par: Parameterisation, params: Params, plane: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form of :meth:`Parameterisation.pack`: :class:`Params` → increments [n]."""
    return par.pack(params, plane)
