"""Detectors of many panels: the static layout (panels and their hierarchy of rigid groups) and the lab frame of
every panel for given detector parameters.

A :class:`PanelLayout` is part of the frozen :class:`~nbtorch.types.Setup` (``Setup.panels``): every panel's
nominal lab geometry — the outer corner of its first pixel and the lab steps of one pixel along fast and slow (mm,
as the file gives them: not necessarily unit length or orthogonal) — its pixel counts, and the hierarchy (panels in
groups, groups in groups, one root).  Every node below the root (a group, or a panel) is a rigid body whose motion is
a shift (mm) and a rotation (three XYZ angles, degrees) about its nominal centre: the leaves
``Detector.group_shift`` and ``Detector.group_rotation`` ``[G, 3]`` of the parameters, G = ``len(layout.nodes)``.
The whole detector moves as nanoBragg's beam pivot does: ``beam_center`` (mm) is the point of the detector, in its
nominal frame relative to where the beam met it, that the beam meets; ``rotation`` (degrees, XYZ) turns the detector
about that point; ``distance`` (mm) places that point along the beam; ``twotheta`` (degrees) swings everything
about the sample.

Images of a panel detector are ``[P, S, F]`` with S, F the largest panel's pixel counts (smaller panels are padded
with pixels that are never rendered); a one-panel nanoBragg detector keeps ``[S, F]``.  Built from the readers of
:mod:`nbtorch.io.crystfel` and :mod:`nbtorch.io.dials` by :func:`layout_from_crystfel` and :func:`layout_from_dials`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .rotation import rot_axis, rot_xyz
from .units import deg2rad

__all__ = ["PanelSpec", "PanelNode", "PanelLayout", "PanelFrames", "layout_frames", "layout_from_crystfel",
           "layout_from_dials", "panel_lab_vectors"]

Vec3 = Tuple[float, float, float]


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b))


def _dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def _cross(a, b) -> Vec3:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _norm(a) -> float:
    return math.sqrt(_dot(a, a))


@dataclasses.dataclass(frozen=True)
class PanelSpec:
    """One panel at its nominal place (lab frame, mm): ``corner`` the outer corner of pixel (0, 0), ``fast`` and
    ``slow`` the lab steps of one pixel, ``fpixels`` × ``spixels`` pixels; pixel (f, s) has its centre at
    corner + (f + ½)·fast + (s + ½)·slow.  ``thickness_um`` (µm) and ``mu_per_um`` (attenuation, 1/µm): the panel's
    own sensor, None to take the set-up's (``Setup.thickness_um``, ``Setup.mu_per_um``).  A panel's own sensor is
    sampled in ``Setup.thicksteps`` layers spaced as the set-up's are, scaled to its thickness (thickness /
    thicksteps apart when the set-up has no sensor)."""

    name: str
    corner: Vec3
    fast: Vec3
    slow: Vec3
    fpixels: int
    spixels: int
    thickness_um: Optional[float] = None
    mu_per_um: Optional[float] = None

    @property
    def centre(self) -> Vec3:
        """Lab position (mm) of the panel's centre."""
        return tuple(c + 0.5 * (self.fpixels * f + self.spixels * s)
                     for c, f, s in zip(self.corner, self.fast, self.slow))

    @property
    def area(self) -> float:
        """Area of one pixel (mm²): |fast × slow|."""
        return _norm(_cross(self.fast, self.slow))

    @property
    def facing(self) -> float:
        """+1 where fast × slow points away from the sample (a right-handed panel), −1 where it points towards it."""
        return 1.0 if _dot(_cross(self.fast, self.slow), self.centre) >= 0 else -1.0


@dataclasses.dataclass(frozen=True)
class PanelNode:
    """A rigid body of the hierarchy below the root: ``name``, ``level`` (1 = a child of the root), ``parent`` (the
    index of its parent node in ``PanelLayout.nodes``, −1 for the root), ``panels`` (indices of the panels it
    holds) and ``centre`` (mm, the mean of those panels' nominal centres, about which it rotates)."""

    name: str
    level: int
    parent: int
    panels: Tuple[int, ...]
    centre: Vec3


@dataclasses.dataclass(frozen=True)
class PanelLayout:
    """A detector of panels (hashable; see the module docstring).  ``panels`` in file order; ``nodes`` the rigid
    bodies below the root (groups and panels, parents before children); ``root`` the root's name; ``distance`` (mm)
    the nominal distance of the point where the beam meets the detector (the reference that
    ``Detector.distance`` starts at); ``beam`` the unit direction of the beam the layout was described with."""

    panels: Tuple[PanelSpec, ...]
    nodes: Tuple[PanelNode, ...]
    root: str
    distance: float
    beam: Vec3

    @property
    def n_panels(self) -> int:
        return len(self.panels)

    @property
    def fpixels(self) -> int:
        """The largest panel's fast pixel count (the image's fast extent)."""
        return max(p.fpixels for p in self.panels)

    @property
    def spixels(self) -> int:
        """The largest panel's slow pixel count (the image's slow extent)."""
        return max(p.spixels for p in self.panels)

    @property
    def equal_panels(self) -> bool:
        """Whether every panel has the same pixel counts (no padding in ``[P, S, F]`` images)."""
        return len({(p.fpixels, p.spixels) for p in self.panels}) == 1

    def node_index(self, name: str) -> int:
        """Index in ``nodes`` of the group or panel called ``name`` (``KeyError`` naming the known ones)."""
        for i, n in enumerate(self.nodes):
            if n.name == name:
                return i
        raise KeyError(f"no panel group {name!r}; the groups are {', '.join(n.name for n in self.nodes)}")

    def nodes_at_level(self, level: int) -> Tuple[int, ...]:
        """Indices of the nodes ``level`` steps below the root."""
        return tuple(i for i, n in enumerate(self.nodes) if n.level == level)

    @property
    def depth(self) -> int:
        """The deepest level of the hierarchy (1 where every panel is a child of the root)."""
        return max(n.level for n in self.nodes)

    @functools.cached_property
    def level_members(self) -> Tuple[Tuple[int, ...], ...]:
        """For every level 1 … depth, the node holding each panel at that level (``len(nodes)`` where none does):
        ``[depth][P]`` indices into ``nodes`` plus one identity slot."""
        G = len(self.nodes)
        out = []
        for level in range(1, self.depth + 1):
            row = [G] * self.n_panels
            for i in self.nodes_at_level(level):
                for p in self.nodes[i].panels:
                    row[p] = i
            out.append(tuple(row))
        return tuple(out)

    def pixel_panel(self, index):
        """(panel, slow, fast) of flat pixel indices into ``[P, S, F]`` (integer tensors or numpy arrays)."""
        S, F = self.spixels, self.fpixels
        return index // (S * F), (index // F) % S, index % F


def make_layout(panels: Sequence[PanelSpec], tree: Dict[str, Sequence[str]], root: str,
                beam: Vec3 = (0.0, 0.0, 1.0)) -> PanelLayout:
    """A :class:`PanelLayout` from panels and a hierarchy ``tree`` {group name: member names (panels or groups)}
    whose top is ``root`` (a flat detector: ``{root: [every panel]}``).  Names must be unique; ``ValueError`` names
    a member that is neither a panel nor a group, a panel that is not in the tree, or one that is in it twice."""
    names = [p.name for p in panels]
    index = {n: i for i, n in enumerate(names)}
    if len(index) != len(names):
        raise ValueError(f"panel names must be unique: {', '.join(n for n in names if names.count(n) > 1)}")
    nodes: List[PanelNode] = []
    seen: Dict[str, int] = {}

    def under(name: str) -> Tuple[int, ...]:
        if name in index:
            return (index[name],)
        return tuple(p for m in tree[name] for p in under(m))

    def visit(name: str, level: int, parent: int) -> None:
        for m in tree[name]:
            if m not in index and m not in tree:
                raise ValueError(f"group {name!r}: member {m!r} is neither a panel nor a group")
            if m in seen:
                raise ValueError(f"{m!r} appears twice in the panel hierarchy (under {name!r} and elsewhere)")
            held = under(m)
            centre = tuple(sum(panels[p].centre[j] for p in held) / len(held) for j in range(3))
            seen[m] = len(nodes)
            nodes.append(PanelNode(m, level, parent, held, centre))
            if m in tree:
                visit(m, level + 1, seen[m])

    visit(root, 1, -1)
    missing = [n for n in names if n not in seen]
    if missing:
        raise ValueError(f"panels not in the hierarchy under {root!r}: {', '.join(missing)}")
    b = tuple(x / _norm(beam) for x in beam)
    distance = sum(_dot(p.centre, b) for p in panels) / len(panels)
    return PanelLayout(tuple(panels), tuple(nodes), root, float(distance), b)


# ----------------------------------------------------------------------------------------------------------------
# from the file readers


def without_panel_sensors(layout: PanelLayout) -> PanelLayout:
    """``layout`` with no panel's own sensor (every panel takes the set-up's: ``Setup.thickness_um``, 0 for none)."""
    return dataclasses.replace(layout, panels=tuple(dataclasses.replace(p, thickness_um=None, mu_per_um=None)
                                                    for p in layout.panels))


def layout_from_crystfel(geometry) -> PanelLayout:
    """The layout of a CrystFEL :class:`~nbtorch.io.crystfel.Geometry` (CrystFEL's lab frame: beam along +z):
    panels with their lab corners and steps (mm) and their own sensors (nbtorch's ``thickness_um``/``mu_per_um``
    keys, :attr:`~nbtorch.io.crystfel.Panel.sensor`), the hierarchy of its ``group_``/``rigid_group`` lines (root
    ``all``)."""
    panels = [PanelSpec(p.name, p.corner, p.fs_step, p.ss_step, p.n_fast, p.n_slow, *p.sensor)
              for p in geometry.panels]
    tree = {g.name: list(g.members) for g in geometry.groups}
    return make_layout(panels, tree, "all", (0.0, 0.0, 1.0))


def layout_from_dials(detector, beam_direction: Vec3 = (0.0, 0.0, 1.0)) -> PanelLayout:
    """The layout of a DIALS :class:`~nbtorch.io.dials.Detector` in DIALS's lab frame, whose beam travels along
    −``beam_direction`` (the ``.expt`` beam ``direction`` points from the sample to the source); a panel's
    ``thickness`` (mm) and ``mu`` (1/mm) become its own sensor.  Node names are the
    file's where they are unique and not empty, else their position (``group0.1``, ``panel3``)."""
    lab = detector.lab_panels
    pnames = [p.name if p.name and [q.name for q in lab].count(p.name) == 1 else f"panel{i}" for i, p in
              enumerate(lab)]
    sensors = [(1000.0 * p.thickness, p.mu / 1000.0) if p.thickness > 0 else (None, None) for p in detector.panels]
    panels = [PanelSpec(n, p.corner, p.fs_step, p.ss_step, p.n_fast, p.n_slow, *sensor)
              for n, p, sensor in zip(pnames, lab, sensors)]
    tree: Dict[str, List[str]] = {}
    used = set(pnames)

    def visit(node, path: str) -> str:
        name = node.name if node.name and node.name not in used else f"group{path}"
        used.add(name)
        tree[name] = [pnames[c] if isinstance(c, int) else visit(c, f"{path}.{k}") for k, c in
                      enumerate(node.children)]
        return name

    root = visit(detector.hierarchy, "0") if detector.hierarchy is not None else "detector"
    if detector.hierarchy is None:
        tree[root] = list(pnames)
    return make_layout(panels, tree, root, tuple(-c for c in beam_direction))


# ----------------------------------------------------------------------------------------------------------------
# the lab frame of every panel


class PanelFrames(NamedTuple):
    """Every panel's lab frame for given parameters: ``pix0`` [P, 3] outer corner of pixel (0, 0) (mm); ``fdet``,
    ``sdet`` [P, 3] the lab steps of one pixel divided by the set-up's pixel size (unit vectors for a nanoBragg
    detector); ``odet`` [P, 3] the unit normal pointing away from the sample; ``close`` [P] the perpendicular
    sample–plane distance (mm); ``distance`` [] the curved detector's radius (mm; one-panel detectors)."""

    pix0: torch.Tensor
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    close: torch.Tensor
    distance: torch.Tensor


def _apply_groups(layout: PanelLayout, det, corner, f, s):
    """Move the panels (corner, f, s: [P, 3]) by every node's rigid motion, deepest level first, each about its
    nominal centre."""
    like = corner
    G = len(layout.nodes)
    zero = torch.zeros(1, 3, dtype=like.dtype, device=like.device)
    R = torch.cat([rot_xyz(deg2rad(det.group_rotation)), torch.eye(3, dtype=like.dtype, device=like.device)[None]])
    t = torch.cat([det.group_shift, zero])
    c = torch.cat([torch.tensor([n.centre for n in layout.nodes], dtype=like.dtype, device=like.device).reshape(G, 3),
                   zero])
    for members in reversed(layout.level_members):
        k = torch.tensor(members, device=like.device)
        Rk, ck = R[k], c[k]
        corner = ck + (Rk @ (corner - ck)[..., None])[..., 0] + t[k]
        f = (Rk @ f[..., None])[..., 0]
        s = (Rk @ s[..., None])[..., 0]
    return corner, f, s


def in_plane_axes(beam: Vec3) -> Tuple[Vec3, Vec3]:
    """Two unit axes ⟂ ``beam`` along which ``beam_center`` counts: the lab x and y made orthogonal to the beam (y
    and z for a beam along x)."""
    first = (1.0, 0.0, 0.0) if abs(beam[0]) < 0.9 else (0.0, 1.0, 0.0)
    second = (0.0, 1.0, 0.0) if abs(beam[0]) < 0.9 else (0.0, 0.0, 1.0)
    e1 = _sub(first, tuple(_dot(first, beam) * b for b in beam))
    e1 = tuple(x / _norm(e1) for x in e1)
    e2 = _sub(second, tuple(_dot(second, beam) * b + _dot(second, e1) * e for b, e in zip(beam, e1)))
    return e1, tuple(x / _norm(e2) for x in e2)


def panel_lab_vectors(layout: PanelLayout, det, beam: Vec3, twotheta_axis: Vec3):
    """(corner, fast step, slow step) of every panel in the lab frame (mm, each [P, 3]) for the detector parameters
    ``det`` (:class:`~nbtorch.types.Detector`): group motions, then the whole detector (beam centre, rotation about
    the point the beam meets, distance along the unit ``beam``), then two-theta about the sample."""
    like = det.distance
    T = functools.partial(torch.tensor, dtype=like.dtype, device=like.device)
    corner, f, s = (T([getattr(p, k) for p in layout.panels]) for k in ("corner", "fast", "slow"))
    corner, f, s = _apply_groups(layout, det, corner, f, s)
    b = T(beam)
    e1, e2 = (T(e) for e in in_plane_axes(beam))
    R = rot_xyz(deg2rad(det.rotation))
    rel = corner - layout.distance * b - det.beam_center[..., 0, None] * e1 - det.beam_center[..., 1, None] * e2
    corner = det.distance[..., None] * b + (R @ rel[..., None])[..., 0]
    f, s = (R @ f[..., None])[..., 0], (R @ s[..., None])[..., 0]
    TT = rot_axis(T(twotheta_axis), deg2rad(det.twotheta))
    return (TT @ corner[..., None])[..., 0], (TT @ f[..., None])[..., 0], (TT @ s[..., None])[..., 0]


def layout_frames(layout: PanelLayout, det, setup) -> PanelFrames:
    """The lab frame of every panel of ``layout`` (the set-up's ``panels``) for the detector parameters ``det``
    (:func:`panel_lab_vectors`; ``setup`` gives the beam, two-theta axis and nominal pixel size)."""
    corner, f, s = panel_lab_vectors(layout, det, setup.beam, setup.twotheta_axis)
    facing = torch.tensor([p.facing for p in layout.panels], dtype=corner.dtype, device=corner.device)
    n = torch.linalg.cross(f, s)
    o = n / torch.linalg.vector_norm(n, dim=-1, keepdim=True) * facing[:, None]
    p = setup.pixel_size
    return PanelFrames(corner, f / p, s / p, o, (corner * o).sum(-1), det.distance)
