"""Parameterisation: the free parts of the model as increments x about a reference model (:func:`parameterise`).

A fit starts at x = 0 and every entry is well scaled; what an entry means (leaf, transform, units, typical error) is
its :data:`refine.model.table.SCALARS` entry, from which pack, unpack, bounds, priors and reports are derived.  With
the orientation free, ``unpack`` returns ``crystal.orientation = Φz·Φy·Φx·XYZ(misset_ref)·U_ref`` and ``misset = 0``
(the rotation ``simulate`` applies).  ``pack``/``unpack`` are pure; ``unpack`` is differentiable (``torch.func``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from nbtorch.pytree import get_leaf, replace_leaf as set_leaf
from nbtorch.rotation import rot_xyz, xyz_angles  # noqa: F401  (xyz_angles re-exported)
from nbtorch.simulate import crystal_rotation
from nbtorch.types import Params, Setup
from nbtorch.units import mrad2rad, rad2mrad

from .cells import CELL_ROWS, CRYSTAL_SYSTEMS, resolve_crystal_system, symmetrize_cell
from .table import (DEFAULT_FREE, GROUPS, NODE_GROUP, NODE_LEVELS, NODE_PREFIX, REQUIRES, SCALARS,  # noqa: F401
                    SUBGROUPS, ScalarSpec, catalogue, is_node_name, node_selection)
from .psf import PointSpread
from .table import OWN_LEAVES, PSF_GROUP, box_names

#: Log scalars stay within e^±LOG_RANGE of their reference by default.
LOG_RANGE = 10.0
#: How N (cells per domain) is refined: one ln-scale for Na, Nb, Nc, three, or isotropic when they are equal.
NCELLS_MODES = ("auto", "isotropic", "anisotropic")


@dataclasses.dataclass(frozen=True)
class Scalar:
    """One free scalar of the flat vector: its table entry ``spec`` and, about the reference model, ``ref`` (the
    reported value at x = 0), ``typical`` (a typical error of x, x units), ``lower``/``upper`` (bounds on x, ±inf when
    none) and ``prior`` ((mean, sigma) in reported units, or None)."""

    spec: ScalarSpec
    ref: float
    typical: float
    lower: float = -math.inf
    upper: float = math.inf
    prior: Optional[Tuple[float, float]] = None

    name = property(lambda self: self.spec.name, doc="Scalar name, e.g. 'cell.a'.")
    group = property(lambda self: self.spec.group, doc="Its group.")
    unit = property(lambda self: self.spec.unit, doc="Unit of the reported value.")
    x_unit = property(lambda self: self.spec.x_unit, doc="Unit of the increment.")
    kind = property(lambda self: "log" if self.spec.transform == "log" else "linear",
                    doc="'log' (value = ref·exp(factor·x)) or 'linear' (value = ref + factor·x).")
    factor = property(lambda self: self.spec.scale if self.spec.transform in ("linear", "log") else 1.0,
                      doc="Reported units per increment unit (linear) or per ln-unit (log).")

    def value(self, x):
        """Reported value of increment ``x`` (tensor, any shape)."""
        return self.ref * torch.exp(self.factor * x) if self.kind == "log" else self.ref + self.factor * x

    def to_x(self, u: float) -> float:
        """Increment giving reported value ``u`` (inverse of :meth:`value`; -inf for a log value 0, NaN below)."""
        if self.kind == "log":
            if not u > 0:
                return -math.inf if u == 0 else math.nan
            return math.log(u / self.ref) / self.factor
        return (u - self.ref) / self.factor

    def dvalue_dx(self, x: float) -> float:
        """Derivative of the reported value with respect to the increment at ``x``."""
        return self.ref * self.factor * math.exp(self.factor * x) if self.kind == "log" else self.factor


def total_rotation(params: Params) -> torch.Tensor:
    """The crystal rotation ``XYZ(misset)·orientation`` [3, 3] that ``simulate`` applies to the reciprocal basis."""
    return crystal_rotation(params.crystal)


@dataclasses.dataclass(frozen=True, eq=False)
class Parameterisation:
    """Free scalars about a reference model (build with :func:`parameterise`); ``pack``/``unpack`` between a flat
    vector x [n] and :class:`Params`.  Fields: ``ref`` (reference Params), ``setup``, ``scalars`` (of :class:`Scalar`),
    ``crystal_system`` (``crystal_system_note`` when chosen automatically), ``cell_base`` [6] (the reference cell made
    exactly symmetric), ``R0`` [3, 3] (reference crystal rotation), ``background_ref`` [3] (reference plane,
    photons/pixel; [B, 3] with ``boxes``), ``ncells_iso``, ``psf`` (the point-spread function or None), ``boxes``
    (a spot-ROI fit's :class:`~refine.targets.boxes.SpotBoxes`, one background plane per region, or None)."""

    ref: Params
    setup: Setup
    scalars: Tuple[Scalar, ...]
    crystal_system: str
    cell_base: torch.Tensor
    R0: torch.Tensor
    background_ref: torch.Tensor
    ncells_iso: bool
    crystal_system_note: str = ""
    psf: Optional[PointSpread] = None  # the detector's point-spread function (None: no blur); psf_fwhm(x) its FWHM
    boxes: Optional[object] = None  # spot-ROI regions (refine.targets.boxes.SpotBoxes): one plane per region

    names = property(lambda self: [s.name for s in self.scalars], doc="Names of the free scalars, in x order.")
    n = property(lambda self: len(self.scalars), doc="Length of x.")
    dtype = property(lambda self: self.ref.crystal.cell.dtype, doc="The reference model's dtype.")
    device = property(lambda self: self.ref.crystal.cell.device, doc="The reference model's device.")

    @functools.cached_property
    def _slot(self) -> Dict[str, int]:
        return {s.name: i for i, s in enumerate(self.scalars)}

    @functools.cached_property
    def _leaves(self) -> Dict[str, List[Tuple[int, Scalar]]]:
        """Leaf path → its (slot, scalar) pairs, for the linear and log scalars (the table-driven ones)."""
        out: Dict[str, List[Tuple[int, Scalar]]] = {}
        for i, s in enumerate(self.scalars):
            if s.spec.transform in ("linear", "log"):
                out.setdefault(s.spec.leaf, []).append((i, s))
        return out

    @functools.cached_property
    def cell_rows(self) -> Mapping[str, Tuple[int, ...]]:
        """Free cell value (``'a'``, ``'beta'`` …) → the rows of the cell 6-vector it drives (read-only)."""
        rows = CELL_ROWS[self.crystal_system]
        return types.MappingProxyType({s.name[5:]: rows[s.name[5:]] for s in self.scalars if s.group == "cell"})

    @functools.cached_property
    def _cell_map(self) -> Tuple[List[int], torch.Tensor]:
        """(slots of the free cell values, M [6, k]): cell = cell_base + M·x[slots] (tied rows move together)."""
        slots = [self._slot[f"cell.{nm}"] for nm in self.cell_rows]
        M = torch.zeros(6, len(slots), dtype=self.dtype, device=self.device)
        for j, rows in enumerate(self.cell_rows.values()):
            M[list(rows), j] = 1.0
        return slots, M

    def groups(self) -> List[str]:
        """The groups with at least one free scalar, in :data:`GROUPS` order."""
        present = {s.group for s in self.scalars}
        return [g for g in GROUPS if g in present]

    def index(self, name_or_group: str) -> List[int]:
        """Positions in x of a scalar name or of every scalar of a group / sub-group."""
        if name_or_group in self._slot:
            return [self._slot[name_or_group]]
        if name_or_group in SUBGROUPS:
            return [self._slot[n] for n in SUBGROUPS[name_or_group] if n in self._slot]
        return [i for i, s in enumerate(self.scalars) if s.group == name_or_group]

    def zeros(self) -> torch.Tensor:
        """The reference point x = 0 ([n], the reference dtype/device)."""
        return torch.zeros(self.n, dtype=self.dtype, device=self.device)

    def _vector(self, values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=self.dtype, device=self.device)

    def bounds(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds on x ([n] each; ±inf where none)."""
        return self._vector(s.lower for s in self.scalars), self._vector(s.upper for s in self.scalars)

    def typical(self) -> torch.Tensor:
        """Typical error of each entry of x ([n], x units): preconditions gradient optimisers, sizes trust regions."""
        return self._vector(s.typical for s in self.scalars)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Reported values of every free scalar at ``x`` ([..., n]); differentiable."""
        if not self.scalars:
            return x
        return torch.stack([s.value(x[..., i]) for i, s in enumerate(self.scalars)], -1)

    def has_plane(self) -> bool:
        """True when the background plane is non-zero or free (so it must be added to the model)."""
        return bool((self.background_ref != 0).any()) or "plane" in self._leaves

    def _leaf(self, x: torch.Tensor, items: List[Tuple[int, Scalar]], ref: torch.Tensor) -> torch.Tensor:
        """A linear/log leaf at x: ref + inc or ref·exp(inc), inc from the entries that move it."""
        # scale·x on the whole vector, then indexed: a 0-dim tensor times a Python float gets a float64 tangent under
        # torch.func.jacfwd (torch 2.13), which would mix dtypes in a float32 fit
        if ref.dim() == 0 or items[0][1].spec.index is None:
            (slot, s), = items
            inc = (s.spec.scale * x)[..., slot]
            inc = inc[..., None] if ref.dim() else inc
        else:  # index: of the flattened leaf (a panel detector's [G, 3] motions, a spot-ROI fit's [B, 3] planes)
            slots, M = self._index_map(items[0][1].spec.leaf, ref.numel())
            inc = (x.index_select(-1, slots) @ M).reshape(*x.shape[:-1], *ref.shape)
        return ref * torch.exp(inc) if items[0][1].spec.transform == "log" else ref + inc

    @functools.cached_property
    def _index_maps(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        return {}  # filled by _index_map, one entry per indexed leaf

    def _index_map(self, leaf: str, numel: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(slots [k], M [k, numel]) of an indexed leaf: its increment (flattened) = x[slots] @ M, M holding each
        scalar's scale at its index (one entry per row: the product is exact).  One matrix product instead of a
        Python loop over B·3 entries per evaluation (a spot-ROI fit has hundreds)."""
        cache = self._index_maps
        if leaf not in cache:
            items = self._leaves[leaf]
            M = torch.zeros(len(items), numel, dtype=self.dtype, device=self.device)
            for j, (_, s) in enumerate(items):
                M[j, s.spec.index] = s.spec.scale
            cache[leaf] = (torch.tensor([slot for slot, _ in items], device=self.device), M)
        return cache[leaf]

    def unpack(self, x: torch.Tensor) -> Params:
        """Flat increments ``x`` [n] → :class:`Params` (pure, differentiable; works under ``torch.func``)."""
        p = self.ref
        if self.cell_rows:
            slots, M = self._cell_map
            p = set_leaf(p, "crystal.cell", self.cell_base + x[..., slots] @ M.T)
        rot = {s.spec.index: i for i, s in enumerate(self.scalars) if s.spec.transform == "rotation"}
        if rot:  # increments about lab x, y, z (mrad)
            zero = x.new_zeros(x.shape[:-1])
            ang = mrad2rad(torch.stack([x[..., rot[k]] if k in rot else zero for k in range(3)], -1))
            p = set_leaf(p, "crystal.orientation", rot_xyz(ang) @ self.R0)
            p = set_leaf(p, "crystal.misset", torch.zeros_like(self.ref.crystal.misset))
        for leaf, items in self._leaves.items():
            if leaf not in OWN_LEAVES:
                p = set_leaf(p, leaf, self._leaf(x, items, get_leaf(self.ref, leaf)))
        return p

    def plane(self, x: torch.Tensor) -> torch.Tensor:
        """Refine-owned background coefficients (c0, c_fast, c_slow) [..., 3] (photons/pixel) at ``x``; [..., B, 3]
        with ``boxes``, one plane per region."""
        items = self._leaves.get("plane")
        if not items:
            return self.background_ref.expand(*x.shape[:-1], *self.background_ref.shape)
        return self._leaf(x, items, self.background_ref)

    def psf_fwhm(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The point-spread function's FWHM (µm) [...] at ``x`` (None without a PSF; differentiable)."""
        if self.psf is None:
            return None
        ref = torch.tensor(self.psf.fwhm_um, dtype=self.dtype, device=self.device)
        items = self._leaves.get(PSF_GROUP)
        return self._leaf(x, items, ref) if items else ref.expand(x.shape[:-1])

    def _pack_one(self, s: Scalar, params: Params, plane, R, psf_fwhm=None) -> torch.Tensor:
        sp = s.spec
        if sp.transform == "rotation":
            return R[sp.index]
        if sp.leaf == PSF_GROUP:
            cur = torch.as_tensor(self.psf.fwhm_um if psf_fwhm is None else psf_fwhm, dtype=self.dtype,
                                  device=self.device)
            ref = torch.tensor(self.psf.fwhm_um, dtype=self.dtype, device=self.device)
        elif sp.leaf == "plane":
            cur, ref = torch.as_tensor(plane, dtype=self.dtype, device=self.device), self.background_ref
        else:
            cur = get_leaf(params, sp.leaf)
            ref = self.cell_base if sp.transform == "cell" else get_leaf(self.ref, sp.leaf)
        if sp.index is not None:
            if ref.dim() > 1:  # index of the flattened leaf ([G, 3] rigid motions)
                cur, ref = cur.flatten(-ref.dim()), ref.flatten()
            cur, ref = cur[..., sp.index], ref[..., sp.index]
        v = torch.log(cur / ref) if sp.transform == "log" else cur - ref
        return (v.mean(-1) if v.dim() else v) / sp.scale

    def pack(self, params: Params, plane: Optional[torch.Tensor] = None, psf_fwhm=None) -> torch.Tensor:
        """:class:`Params` (and optional plane coefficients [3], photons/pixel, and PSF FWHM, µm) → increments x [n]
        about the reference (pure).  Inverse of :meth:`unpack` for models of the parameterised family (fixed parts
        equal to the reference)."""
        if not self.scalars:
            return self.zeros()
        plane = self.background_ref if plane is None else plane
        R = None
        if any(s.spec.transform == "rotation" for s in self.scalars):
            R = rad2mrad(xyz_angles(total_rotation(params) @ self.R0.transpose(-1, -2)))
        out = [self._pack_one(s, params, plane, R, psf_fwhm) for s in self.scalars]
        return torch.stack([torch.as_tensor(v, dtype=self.dtype, device=self.device) for v in out])

    def describe(self) -> str:
        """One line per free scalar: name, transform, reference value and unit, increment unit, nanoBragg flags,
        bounds, prior."""
        lines = []
        for s in self.scalars:
            b = "" if (s.lower == -math.inf and s.upper == math.inf) else f" x∈[{s.lower:g}, {s.upper:g}]"
            p = "" if s.prior is None else f" prior {s.prior[0]:g}±{s.prior[1]:g} {s.unit}"
            lines.append(f"{s.name:24s} {s.spec.transform:8s} ref {s.ref:.6g} {s.unit} (x in {s.x_unit}) "
                         f"{'/'.join(s.spec.flags) or '-'}{b}{p}")
        return "\n".join(lines)


def expand_free(free: Iterable[str]) -> List[str]:
    """Groups, sub-groups and scalar names (a list, or one string split on commas/spaces) → the requested group and
    scalar names (sub-groups expanded), validated."""
    if isinstance(free, str):
        free = free.replace(",", " ").split()
    wanted: List[str] = []
    for f in (str(f).strip() for f in free):
        if is_node_name(f):  # resolved against the detector's hierarchy by parameterise
            wanted.append(f)
            continue
        if f.split(".")[0] == NODE_GROUP or not (
                f in GROUPS or f in SUBGROUPS or ("." in f and f.split(".")[0] in GROUPS)):
            groups = ", ".join(g for g in GROUPS if g != NODE_GROUP)
            raise ValueError(
                f"unknown parameter group {f!r}; allowed: {groups} (sub-groups: {', '.join(SUBGROUPS)}; or single "
                f"scalars such as cell.a, orientation.z, ncells.c; a panel detector's {NODE_LEVELS}, "
                f"{NODE_LEVELS}.LEVEL, {NODE_PREFIX}NAME)")
        wanted.extend(SUBGROUPS.get(f, (f,)))
    return wanted


def resolve_nodes(wanted: Sequence[str], layout) -> List[str]:
    """``wanted`` (:func:`expand_free`'s names) with every panel-group name replaced by the scalars it frees on the
    panel ``layout`` (:func:`~refine.model.table.node_selection`; ValueError for a one-panel detector or a group or
    level it does not have)."""
    out: List[str] = []
    for w in wanted:
        out.extend(node_selection(w, layout) if is_node_name(w) else (w,))
    return list(dict.fromkeys(out))


def _selected(spec: ScalarSpec, wanted: Sequence[str], system: str, ncells_iso: bool, has_water: bool) -> bool:
    """Whether ``spec`` is free given the requested names."""
    if spec.group == "cell":
        return spec.name[len("cell."):] in CRYSTAL_SYSTEMS[system] and ("cell" in wanted or spec.name in wanted)
    if spec.group == "ncells":
        return (spec.name == "ncells") == ncells_iso and ("ncells" in wanted or spec.name in wanted)
    if spec.name == "background.water":
        return spec.name in wanted or ("background" in wanted and has_water)
    return spec.group in wanted or spec.name in wanted


def _check_names(wanted: Sequence[str], system: str, ncells_iso: bool, layout=None, n_boxes: int = 0) -> None:
    """ValueError for scalar names that this parameterisation cannot free."""
    known = {s.name for s in catalogue(layout, n_boxes)}
    for w in wanted:
        if w.startswith("cell.") and w[5:] not in CRYSTAL_SYSTEMS[system]:
            raise ValueError(f"{w} is not a free cell value of a {system} cell "
                             f"(free: {', '.join(CRYSTAL_SYSTEMS[system])})")
        if w.startswith("ncells.") and ncells_iso:
            raise ValueError("ncells.a/.b/.c need ncells_mode='anisotropic'")
        if "." in w and w not in known:
            raise ValueError(f"unknown parameter {w!r}; scalars: {', '.join(sorted(known))}")


def _check_shared_leaves(specs: Sequence[ScalarSpec]) -> None:
    """ValueError (one line) when two free scalars would move the same leaf component (``wavelength`` and
    ``spectrum.lam1`` both scale λ0, ``beam.wavelength``)."""
    seen: Dict[str, List[ScalarSpec]] = {}
    for sp in specs:
        if sp.transform not in ("linear", "log"):
            continue
        for other in seen.get(sp.leaf, ()):
            if None in (sp.index, other.index) or sp.index == other.index:
                raise ValueError(f"{other.name} and {sp.name} both move {sp.leaf}: free one of them, not both")
        seen.setdefault(sp.leaf, []).append(sp)


def resolve_boxes(wanted: Sequence[str], n_boxes: int) -> List[str]:
    """``wanted`` with the background plane's scalar names (``background.constant`` …, as ``background.plane``
    expands) replaced by every region's (:func:`~refine.model.table.box_names`) in a spot-ROI fit of ``n_boxes``
    regions (unchanged without regions)."""
    if not n_boxes:
        return list(wanted)
    plane = {s.name for s in SCALARS if s.leaf == "plane"}
    return list(dict.fromkeys(n for w in wanted for n in (box_names(w, n_boxes) if w in plane else (w,))))


def _plane_reference(background, boxes, dt, dev) -> torch.Tensor:
    """The reference plane: [3] (c0, c_fast, c_slow), or [B, 3] with ``boxes`` (3 numbers: every region's; or [B, 3]),
    photons/pixel, zeros by default.  ValueError naming ``background``."""
    shape = (3,) if boxes is None else (boxes.n, 3)
    if background is None:
        return torch.zeros(shape, dtype=dt, device=dev)
    ref = background.detach().to(dtype=dt, device=dev) if torch.is_tensor(background) else torch.as_tensor(
        np.asarray(background, dtype=np.float64), dtype=dt, device=dev)
    if boxes is not None and ref.shape == (3,):
        ref = ref.expand(shape).clone()
    if tuple(ref.shape) != shape or not bool(torch.isfinite(ref).all()):
        want = "3 numbers (c0, c_fast, c_slow)" + ("" if boxes is None else f" or [{boxes.n}, 3], one per region")
        raise ValueError(f"background must be {want} in photons/pixel, finite; got shape {list(ref.shape)}")
    return ref


def _make_scalar(spec: ScalarSpec, params: Params, setup: Setup, cell_base, plane_ref,
                 psf: Optional[PointSpread] = None) -> Scalar:
    """A :class:`Scalar` about the reference, with the entry's typical error and default bounds in x."""
    if spec.transform == "rotation" or spec.relative:
        ref = 0.0 if spec.transform == "rotation" else 1.0
    elif spec.transform == "cell":
        ref = float(cell_base[spec.index])
    elif spec.leaf == PSF_GROUP:
        if psf is None:
            raise ValueError("psf can only be refined with a point-spread function (refine: psf='gauss' or 'fiber' "
                             "with psf_fwhm µm; nbtorch flags -psf gauss|fiber -psf_fwhm µm)")
        ref = psf.fwhm_um
    else:
        leaf = plane_ref if spec.leaf == "plane" else get_leaf(params, spec.leaf)
        ref = float(leaf.reshape(-1)[spec.index or 0])
    s = Scalar(spec, ref, spec.typical * {"": 1.0, "ref": abs(ref), "pixel": setup.pixel_size}[spec.typical_per])
    lo, hi = (-LOG_RANGE / s.factor, LOG_RANGE / s.factor) if spec.transform == "log" else (-math.inf, math.inf)
    if spec.lower is not None:
        lo = max(lo, min(0.0, s.to_x(spec.lower)))
    return dataclasses.replace(s, lower=lo, upper=hi)


def _constrain(par: Parameterisation, bounds, priors) -> Parameterisation:
    """``par`` with the user's bounds and priors (reported units, per scalar, group or sub-group) applied."""
    scalars = list(par.scalars)

    def targets(key, what):
        if not par.index(key):
            raise ValueError(f"{what} given for {key!r}, which is not a free scalar or group "
                             f"(free: {', '.join(par.names) or 'none'})")
        return par.index(key)

    for key, (lo, hi) in (bounds or {}).items():
        for i in targets(key, "bounds"):
            s = scalars[i]
            xlo = -math.inf if lo is None else s.to_x(float(lo))
            xhi = math.inf if hi is None else s.to_x(float(hi))
            if math.isnan(xlo) or math.isnan(xhi) or not xlo < xhi:
                raise ValueError(f"bounds for {s.name} must satisfy lower < upper ({s.unit}); got {(lo, hi)}")
            if not xlo <= 0.0 <= xhi:
                raise ValueError(f"bounds {(lo, hi)} for {s.name} exclude the starting value {s.ref:g} {s.unit}")
            scalars[i] = dataclasses.replace(s, lower=xlo, upper=xhi)
    for key, (mean, sigma) in (priors or {}).items():
        if not float(sigma) > 0:
            raise ValueError(f"prior sigma for {key} must be > 0; got {sigma}")
        for i in targets(key, "prior"):
            scalars[i] = dataclasses.replace(scalars[i], prior=(float(mean), float(sigma)))
    return dataclasses.replace(par, scalars=tuple(scalars))


def parameterise(params: Params, setup: Setup, free: Iterable[str] = DEFAULT_FREE, *, crystal_system: str = "auto",
                 ncells_mode: str = "auto", background: Optional[Sequence[float]] = None,
                 bounds: Optional[Mapping[str, Tuple[Optional[float], Optional[float]]]] = None,
                 priors: Optional[Mapping[str, Tuple[float, float]]] = None,
                 psf: Optional[PointSpread] = None, boxes=None) -> Parameterisation:
    """Build a :class:`Parameterisation` about the reference ``params`` (Å, mm, degrees) and ``setup``.

    Args:
        free: groups (:data:`GROUPS`), sub-groups (:data:`~refine.model.table.SUBGROUPS`) or scalar names
            (``cell.a``, ``orientation.z``, ``ncells.c`` …); a string is split on commas/spaces.  A panel detector
            (``setup.panels``) also takes ``panel_groups`` (every node of level 1), ``panel_groups.LEVEL`` and
            ``panel_group:NAME`` (one group or panel; ``panel_group:NAME.shift_x`` … one scalar): six scalars per
            node, shifts in mm and rotations as mrad increments (reported in degrees).
        crystal_system: 'auto' (default: the highest symmetry the starting cell satisfies,
            :func:`~refine.model.cells.detect_crystal_system`) or one of :data:`CRYSTAL_SYSTEMS`; the reference cell is
            made exactly symmetric (``ValueError`` if it is more than 2 % / 1° off).
        ncells_mode: 'isotropic' (one ln-scale for Na, Nb, Nc), 'anisotropic' (three), or 'auto' (isotropic when the
            reference Na = Nb = Nc).
        background: reference background plane (c0, c_fast, c_slow) in photons/pixel (default zeros).
        bounds: {scalar, group or sub-group: (lower, upper)} in reported units (None = unbounded side); by default
            ``ncells`` ≥ 1 (nanoBragg's smallest crystal) and log scalars stay within e^±10 of the reference.
        priors: {scalar, group or sub-group: (mean, sigma)} Gaussian restraints in reported units.
        psf: the detector's point-spread function (:func:`refine.model.psf.point_spread`; None: no blur), whose FWHM
            the ``psf`` group frees.
        boxes: a spot-ROI fit's regions (:func:`refine.targets.boxes.spot_boxes`): one background plane per region
            (``background.constant[k]`` …; ``background`` then [B, 3] or 3 numbers for every region).

    Raises:
        ValueError: unknown names, a group this model cannot refine (``mosaic`` with one mosaic domain,
            ``background.water`` with water_size = 0), two scalars that move one leaf (``wavelength`` with
            ``spectrum.lam1``), bad bounds or priors.
    """
    if ncells_mode not in NCELLS_MODES:
        raise ValueError(f"ncells_mode must be one of {', '.join(NCELLS_MODES)}; got {ncells_mode!r}")
    c, dt, dev = params.crystal, params.crystal.cell.dtype, params.crystal.cell.device
    N = [float(v) for v in c.ncells.detach().cpu()]
    ncells_iso = ncells_mode == "isotropic" or (ncells_mode == "auto" and max(N) - min(N) <= 1e-9 * max(N))
    n_boxes = 0 if boxes is None else boxes.n
    wanted = resolve_boxes(resolve_nodes(expand_free(free), setup.panels), n_boxes)
    cell_ref = [float(v) for v in c.cell.detach().cpu()]
    system, note = resolve_crystal_system(crystal_system, cell_ref)
    _check_names(wanted, system, ncells_iso, setup.panels, n_boxes)
    has_water = float(params.background.water_size) > 0
    specs = [sp for sp in catalogue(setup.panels, n_boxes) if _selected(sp, wanted, system, ncells_iso, has_water)]
    _check_shared_leaves(specs)
    for test, why in (REQUIRES[sp.name] for sp in specs if sp.name in REQUIRES):
        if not test(params, setup):
            raise ValueError(why)
    cell_free = any(sp.group == "cell" for sp in specs)
    cell_base = torch.tensor(symmetrize_cell(cell_ref, system), dtype=dt, device=dev) if cell_free else c.cell
    plane_ref = _plane_reference(background, boxes, dt, dev)
    scalars = tuple(_make_scalar(sp, params, setup, cell_base, plane_ref, psf) for sp in specs)
    par = Parameterisation(params, setup, scalars, system, cell_base, total_rotation(params), plane_ref, ncells_iso,
                           note if cell_free else "", psf, boxes)
    return _constrain(par, bounds, priors)


def unpack(par: Parameterisation, x: torch.Tensor) -> Params:
    """Functional form of :meth:`Parameterisation.unpack`: increments ``x`` [n] → :class:`Params`."""
    return par.unpack(x)


def pack(par: Parameterisation, params: Params, plane: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form of :meth:`Parameterisation.pack`: :class:`Params` → increments [n]."""
    return par.pack(params, plane)
