"""The refinable scalars, one :class:`ScalarSpec` each, and the roles of their groups, one :class:`GroupSpec` each:
pack, unpack, bounds and reports (:mod:`refine.model.parameters`) derive from them and a value's flag from
:data:`nbtorch.args.table.FLAGS` (by leaf), so a new refinable parameter is one entry here, nothing else.

Transforms (``leaf_ref`` the leaf component's reference value, ``s`` the entry's ``scale``): ``linear`` leaf =
leaf_ref + s·x; ``log`` leaf = leaf_ref·exp(s·x) (``index=None`` scales every component of a vector leaf, e.g.
isotropic N); ``rotation`` a small crystal rotation about a lab axis, x in mrad; ``cell`` a free cell value of the
crystal system, tied values moving with it (:mod:`refine.model.cells`).  The leaf ``plane`` is refine's own
background plane (c0, c_fast, c_slow) in photons/pixel (:mod:`refine.model.predict`), not part of ``Params``.

A panel detector (``Setup.panels``) has one rigid body per node of its hierarchy (:mod:`nbtorch.panels`): the six
``panel_group.*`` entries are stated once and :func:`node_specs` derives each node's six, named
``panel_group:NAME.shift_x`` … ``panel_group:NAME.rotation_z`` (index 3·node + axis of the flattened ``[G, 3]``
leaf); :func:`node_selection` resolves the names that free them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, List, Optional, Tuple

from nbtorch.args.table import FLAGS
from nbtorch.units import DEG_PER_MRAD

TRANSFORMS = ("linear", "log", "rotation", "cell")
#: How a typical error is given: absolute (x units), relative to the reference value, or in pixels (× pixel size).
TYPICAL_PER = ("", "ref", "pixel")


@dataclasses.dataclass(frozen=True)
class ScalarSpec:
    """One refinable scalar: name, e.g. ``"detector_rotation.y"``; group: the group that frees it (:data:`GROUPS`);
    leaf: the ``Params`` path (``"detector.rotation"``) or ``"plane"``; index: the component of the leaf (None: the
    leaf is a scalar, or every component moves together); transform: one of :data:`TRANSFORMS`; scale: leaf units per
    increment unit (linear) or per ln-unit (log); unit: the reported value's unit; x_unit: the increment's unit;
    typical: a typical error of x, absolute or times ``typical_per`` ('ref': the reference value, 'pixel': the pixel
    size in mm); relative: the reported value is leaf/leaf_ref (the scale); lower: a default lower bound in reported
    units; flag: the nanoBragg flag when the flag table has none for the leaf (orientation)."""

    name: str
    group: str
    leaf: str
    index: Optional[int]
    transform: str
    scale: float
    unit: str
    x_unit: str
    typical: float
    typical_per: str = ""
    relative: bool = False
    lower: Optional[float] = None
    flag: str = ""

    def __post_init__(self):
        if self.transform not in TRANSFORMS or self.typical_per not in TYPICAL_PER:
            raise ValueError(f"{self.name}: transform must be one of {TRANSFORMS}, typical_per one of {TYPICAL_PER}")

    @property
    def flags(self) -> Tuple[str, ...]:
        """nanoBragg flags that carry this value, e.g. ``('-Xbeam', '-ORGX')``: the flag table's for its leaf component
        (for a vector moved as a whole, its components'), or the entry's own ``flag``."""
        if self.flag:
            return (self.flag,)
        base = f"params.{self.leaf}"
        field = base if self.index is None else f"{base}[{self.index}]"
        hits = [f.name for f in FLAGS.values() if f.field in (field, base)]
        if not hits and self.index is None:
            hits = [f.name for f in FLAGS.values() if f.field.startswith(base + "[")]
        return tuple(hits)


def _axes(group, leaf, transform, scale, unit, x_unit, typical, names="xyz", first=0, **kw):
    return [ScalarSpec(f"{group}.{ax}", group, leaf, first + k, transform, scale, unit, x_unit, typical, **kw)
            for k, ax in enumerate(names)]


#: The group of the panel hierarchy's rigid bodies; its entries are templates of one node's six scalars.
NODE_GROUP = "panel_group"
#: What carries a node's motion out of a fit: the refined detector written as a CrystFEL file (``--out-geom``).
GEOM_FLAG = "-geom"
#: The names that free nodes: every node of the first level, of a level (``panel_groups.LEVEL``), one node.
NODE_LEVELS, NODE_PREFIX = "panel_groups", NODE_GROUP + ":"
#: What a node's scalars are called after ``panel_group:NAME.``.
NODE_AXES = ("shift_x", "shift_y", "shift_z", "rotation_x", "rotation_y", "rotation_z")

#: Every refinable scalar, in the order of the flat vector x.
SCALARS: Tuple[ScalarSpec, ...] = tuple([
    *_axes("cell", "crystal.cell", "cell", 1.0, "Å", "Å", 0.005, names="abc", typical_per="ref"),
    *_axes("cell", "crystal.cell", "cell", 1.0, "deg", "deg", 0.1, names=("alpha", "beta", "gamma"), first=3),
    *_axes("orientation", "crystal.orientation", "rotation", 1.0, "mrad", "mrad", 2.0, flag="-misset"),
    ScalarSpec("distance", "distance", "detector.distance", None, "linear", 1.0, "mm", "mm", 0.5),
    *_axes("beam_center", "detector.beam_center", "linear", 1.0, "mm", "mm", 1.0, names="xy", typical_per="pixel"),
    *_axes("detector_rotation", "detector.rotation", "linear", DEG_PER_MRAD, "deg", "mrad", 2.0),
    ScalarSpec("twotheta", "twotheta", "detector.twotheta", None, "linear", DEG_PER_MRAD, "deg", "mrad", 2.0),
    *_axes(NODE_GROUP, "detector.group_shift", "linear", 1.0, "mm", "mm", 0.5, typical_per="pixel", flag=GEOM_FLAG,
           names=NODE_AXES[:3]),
    *_axes(NODE_GROUP, "detector.group_rotation", "linear", DEG_PER_MRAD, "deg", "mrad", 2.0, flag=GEOM_FLAG,
           names=NODE_AXES[3:]),
    ScalarSpec("wavelength", "wavelength", "beam.wavelength", None, "log", 1.0, "Å", "ln", 1e-3),
    # a spectrum's λ' = lam0 + lam1·λ (diffBragg's; nbtorch.spectrum): lam0 the shift (Å), lam1 λ0's scale; both
    # carried out of a fit by a spectrum file (-spectrum).  lam1 and wavelength move one leaf: never free together
    ScalarSpec("spectrum.lam0", "spectrum", "beam.spectrum_shift", None, "linear", 1.0, "Å", "Å", 1e-3,
               flag="-spectrum"),
    ScalarSpec("spectrum.lam1", "spectrum", "beam.wavelength", None, "log", 1.0, "", "ln", 1e-3, relative=True,
               flag="-spectrum"),
    ScalarSpec("ncells", "ncells", "crystal.ncells", None, "log", 1.0, "cells", "ln", 0.1, lower=1.0),
    *_axes("ncells", "crystal.ncells", "log", 1.0, "cells", "ln", 0.1, names="abc", lower=1.0),
    ScalarSpec("mosaic", "mosaic", "crystal.mosaic_spread", None, "log", 1.0, "deg", "ln", 0.1),
    ScalarSpec("scale", "scale", "beam.fluence", None, "log", 1.0, "", "ln", 0.1, relative=True),
    ScalarSpec("background.constant", "background", "plane", 0, "linear", 1.0, "photons", "photons", 1.0),
    ScalarSpec("background.fast", "background", "plane", 1, "linear", 1.0, "photons", "photons", 1.0),
    ScalarSpec("background.slow", "background", "plane", 2, "linear", 1.0, "photons", "photons", 1.0),
    # nanoBragg's water intensity goes as water_size³: x = ln of the intensity scale, so the size scales by e^(x/3)
    ScalarSpec("background.water", "background", "background.water_size", None, "log", 1.0 / 3.0, "µm", "ln", 0.1),
    # the detector's point-spread function: its FWHM (refine's own, like the plane: refine.model.psf)
    ScalarSpec("psf", "psf", "psf", None, "log", 1.0, "µm", "ln", 0.1, flag="-psf_fwhm"),
])
SPECS: Dict[str, ScalarSpec] = {s.name: s for s in SCALARS}
#: One node's six scalars (templates: :func:`node_specs` names and indexes them per node).
_NODE_TEMPLATE = tuple(s for s in SCALARS if s.group == NODE_GROUP)


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The roles of one group of scalars: name, the prefix of its scalars' names; moves_spots: it moves spots on the
    detector (a broadened stage runs only when such a group is free); coarse: refined in the broadened coarse stages
    (geometry, scale and background; never what broadened spots cannot determine); search: (unit, default half-width,
    trial-parameter suffix) of a global search over it (empty: not searchable); report: the reported quantities
    ({name: length}, in :data:`REPORT_FIELDS` order); requires: {scalar: (test of (params, setup), why not)}
    conditions the starting model must meet for the scalar to be free."""

    name: str
    moves_spots: bool = False
    coarse: bool = False
    search: Tuple = ()
    report: Tuple[Tuple[str, int], ...] = ()
    requires: Tuple[Tuple[str, Callable, str], ...] = ()


#: Every group, in report order.
GROUP_SPECS: Tuple[GroupSpec, ...] = (
    GroupSpec("cell", search=("percent", 3.0, "_pct"), report=(("cell", 6),)),
    GroupSpec("orientation", moves_spots=True, coarse=True, search=("deg", 5.0, "_deg"), report=(("misset_deg", 3),)),
    GroupSpec("distance", moves_spots=True, coarse=True, search=("mm", 5.0, "_mm"), report=(("distance_mm", 1),)),
    GroupSpec("beam_center", moves_spots=True, coarse=True, search=("px", 10.0, "_px"),
              report=(("beam_center", 2), ("beam_center_px", 2))),
    GroupSpec("detector_rotation", moves_spots=True, coarse=True, report=(("detector_rotation_deg", 3),)),
    GroupSpec("twotheta", moves_spots=True, coarse=True, report=(("twotheta_deg", 1),)),
    GroupSpec(NODE_GROUP, moves_spots=True, coarse=True),  # reported per node: refine.pipeline.report
    GroupSpec("wavelength", report=(("wavelength_A", 1),)),
    GroupSpec("spectrum", report=(("spectrum_lam0_A", 1), ("spectrum_lam1", 1), ("spectrum_mean_A", 1))),
    GroupSpec("ncells", report=(("ncells", 3),)),
    GroupSpec("mosaic", report=(("mosaic_deg", 1),), requires=(
        ("mosaic", lambda p, s: s.n_domains >= 2 and float(p.crystal.mosaic_spread) > 0,
         "mosaic can only be refined when the starting model has a mosaic spread > 0 and at least 2 mosaic domains "
         "(-mosaic S -mosaic_domains M)"),)),
    GroupSpec("scale", coarse=True, report=(("fluence", 1), ("scale", 1))),
    GroupSpec("background", coarse=True, report=(("background", 3), ("water_size_um", 1)), requires=(
        ("background.water", lambda p, s: float(p.background.water_size) > 0,
         "background.water needs a starting water_size > 0 (-water SIZE_um)"),)),
    GroupSpec("psf", report=(("psf_fwhm_um", 1),)),  # the FWHM (µm; 0 without a point-spread function)
)
#: The group of the point-spread function's FWHM; refine's own leaves (not part of Params): the background plane
#: and the PSF FWHM (refine.model.parameters keeps their reference values).
PSF_GROUP = "psf"
OWN_LEAVES = ("plane", PSF_GROUP)
#: Groups in report order (each the prefix of its scalars' names).
GROUPS = tuple(g.name for g in GROUP_SPECS)
assert GROUPS == tuple(dict.fromkeys(s.group for s in SCALARS)), "every group has a GroupSpec, in scalar order"
#: Groups refined while spots are broadened (never cell, wavelength, ncells, mosaic).
GEOMETRY_GROUPS = tuple(g.name for g in GROUP_SPECS if g.coarse)
#: A broadened stage that minimises runs only when one of these is free (spot positions to find).
POSITION_GROUPS = tuple(g.name for g in GROUP_SPECS if g.moves_spots)
#: Searchable groups and the units of their search ranges; default half-widths; trial-parameter suffixes.
SEARCH_UNITS = {g.name: g.search[0] for g in GROUP_SPECS if g.search}
DEFAULT_RANGES = {g.name: g.search[1] for g in GROUP_SPECS if g.search}
SEARCH_SUFFIX = {g.name: g.search[2] for g in GROUP_SPECS if g.search}
#: Every reported quantity of a result and its length, in order (:mod:`refine.pipeline.report`).
REPORT_FIELDS = tuple(f for g in GROUP_SPECS for f in g.report)
#: {scalar name: (test(params, setup), why not)}: what the starting model needs for the scalar to be free.
REQUIRES = {name: (test, why) for g in GROUP_SPECS for name, test, why in g.requires}
#: Named parts of a group.
SUBGROUPS: Dict[str, Tuple[str, ...]] = {
    "background.constant": ("background.constant",),
    "background.plane": ("background.constant", "background.fast", "background.slow"),
    "background.water": ("background.water",),
    "water": ("background.water",),
}
#: Groups refined by default (:func:`refine.fit`).
DEFAULT_FREE = ("cell", "orientation", "distance", "beam_center", "scale")


@functools.lru_cache(maxsize=32)
def node_specs(layout) -> Tuple[ScalarSpec, ...]:
    """Every node's six scalars (node by node, in ``layout.nodes`` order) from the table's ``panel_group`` entries:
    ``panel_group:NAME.shift_x`` …, index 3·node + axis of the flattened ``[G, 3]`` leaf (empty without a layout)."""
    if layout is None:
        return ()
    return tuple(dataclasses.replace(s, name=f"{NODE_PREFIX}{node.name}.{axis}", index=3 * g + s.index)
                 for g, node in enumerate(layout.nodes) for s, axis in zip(_NODE_TEMPLATE, NODE_AXES))


#: The background plane's three scalars (one plane for the image: index c of the [3] leaf).
PLANE_SPECS = tuple(s for s in SCALARS if s.leaf == "plane")


@functools.lru_cache(maxsize=32)
def box_specs(n_boxes: int) -> Tuple[ScalarSpec, ...]:
    """The background planes of a spot-ROI fit's ``n_boxes`` regions (:mod:`refine.targets.boxes`), region by region:
    ``background.constant[k]``, ``background.fast[k]``, ``background.slow[k]``, index 3·k + c of the flattened
    ``[B, 3]`` plane leaf."""
    return tuple(dataclasses.replace(s, name=f"{s.name}[{k}]", index=3 * k + s.index)
                 for k in range(n_boxes) for s in PLANE_SPECS)


def box_names(name: str, n_boxes: int) -> Tuple[str, ...]:
    """A plane scalar's name (``background.constant`` …) → the same scalar of every one of ``n_boxes`` regions (the
    name itself without regions)."""
    return (name,) if not n_boxes else tuple(f"{name}[{k}]" for k in range(n_boxes))


def catalogue(layout, n_boxes: int = 0) -> Tuple[ScalarSpec, ...]:
    """Every scalar a set-up with the panel layout ``layout`` (None: nanoBragg's one panel) can free, in x order:
    :data:`SCALARS` with the ``panel_group`` templates replaced by every node's six (:func:`node_specs`) and, in a
    spot-ROI fit of ``n_boxes`` regions, the background plane by one plane per region (:func:`box_specs`)."""
    first = min(i for i, s in enumerate(SCALARS) if s.group == NODE_GROUP)
    rest = tuple(s for s in SCALARS if s.group != NODE_GROUP)
    out = rest[:first] + node_specs(layout) + rest[first:]
    if not n_boxes:
        return out
    at = out.index(PLANE_SPECS[0])
    return out[:at] + box_specs(n_boxes) + tuple(s for s in out[at:] if s.leaf != "plane")


def is_node_name(name: str) -> bool:
    """Whether ``name`` names panel-group nodes (``panel_groups``, ``panel_groups.LEVEL``, ``panel_group:NAME`` or
    one of its scalars), to be resolved against a layout by :func:`node_selection`."""
    return name == NODE_LEVELS or name.startswith(NODE_LEVELS + ".") or name.startswith(NODE_PREFIX)


def _node_and_axis(text: str, names) -> Tuple[str, str]:
    """(node name, scalar suffix or '') of ``panel_group:``'s ``text``: a node's name may itself hold dots."""
    for axis in NODE_AXES:
        if text not in names and text.endswith("." + axis):
            return text[:-len(axis) - 1], axis
    return text, ""


def node_selection(name: str, layout) -> List[str]:
    """The scalar names (:func:`node_specs`) that ``name`` frees on ``layout`` (None: nanoBragg's one panel).

    ``panel_groups``: every node of level 1 (the root's children); ``panel_groups.LEVEL``: every node of that level;
    ``panel_group:NAME``: one node (a group or a panel); ``panel_group:NAME.shift_x`` …: one scalar.  ValueError (one
    line naming what exists) for a one-panel detector or a group or level this detector does not have."""
    if layout is None or layout.n_panels < 2:
        raise ValueError(f"{name}: panel groups need a detector of several panels (-geom FILE or -expt FILE, or "
                         "nbtorch.detector.with_panels); this detector has one panel")
    names = [n.name for n in layout.nodes]
    if name.startswith(NODE_PREFIX):
        node, axis = _node_and_axis(name[len(NODE_PREFIX):], names)
        if node not in names:
            shown = ", ".join(names[:40]) + (f" … ({len(names)} in all)" if len(names) > 40 else "")
            raise ValueError(f"{name}: no panel group or panel {node!r}; this detector has {shown}")
        g = names.index(node)
        return [s.name for s in node_specs(layout)[6 * g: 6 * g + 6] if not axis or s.name.endswith("." + axis)]
    level = name[len(NODE_LEVELS) + 1:] if name != NODE_LEVELS else "1"
    if not (level.isdigit() and 1 <= int(level) <= layout.depth):
        raise ValueError(f"{name}: the panel hierarchy has levels 1 to {layout.depth} (panel_groups.LEVEL; 1 = the "
                         f"children of {layout.root!r})")
    return [s.name for g in layout.nodes_at_level(int(level)) for s in node_specs(layout)[6 * g: 6 * g + 6]]
