"""The refinable scalars, one entry each: what :mod:`refine.model.parameters` packs, unpacks, bounds and reports.

Each :class:`ScalarSpec` names the ``Params`` leaf it moves (and the component), how an increment ``x`` acts on it
(its *transform*), the scale of the increment, the units of the reported value and of ``x``, a typical error of ``x``
(which preconditions gradient optimisers and sizes trust regions) and any default bound.  The nanoBragg flag a value
is written as comes from the flag table (:data:`nbtorch.args.table.FLAGS`, matched by the leaf path), so it is stated
there only.  Adding a refinable parameter means adding one entry to :data:`SCALARS` (and, when it starts a new
group, its :class:`GroupSpec` with the group's roles to :data:`GROUP_SPECS`), nothing else.

Transforms (``leaf_ref`` the reference value of the leaf component, ``s`` the entry's ``scale``):

* ``linear``: leaf = leaf_ref + s·x (detector distance in mm, beam centre in mm, tilts: x in mrad, leaf in degrees);
* ``log``: leaf = leaf_ref·exp(s·x) (positive quantities; ``index=None`` scales every component of a vector leaf,
  e.g. isotropic N);
* ``rotation``: a small rotation of the crystal about a lab axis, x in mrad (code of its own in
  :mod:`refine.model.parameters`: U = Φz·Φy·Φx·U_ref, DIALS' U = Φ3·Φ2·Φ1·U0);
* ``cell``: a free cell value of the crystal system; tied values move with it (code of its own:
  :mod:`refine.model.cells`).

The leaf ``plane`` is refine's own background plane (c0, c_fast, c_slow) in photons/pixel (:mod:`refine.model.predict`),
not part of ``Params``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Tuple

from nbtorch.args.table import FLAGS
from nbtorch.units import DEG_PER_MRAD

TRANSFORMS = ("linear", "log", "rotation", "cell")
#: How a typical error is given: absolute (x units), relative to the reference value, or in pixels (× pixel size).
TYPICAL_PER = ("", "ref", "pixel")


@dataclasses.dataclass(frozen=True)
class ScalarSpec:
    """Description of one refinable scalar.

    name: e.g. ``"detector_rotation.y"``; group: the group that frees it (:data:`GROUPS`); leaf: the ``Params``
    path (``"detector.rotation"``) or ``"plane"``; index: the component of the leaf (None: the leaf is a scalar, or
    every component moves together); transform: one of :data:`TRANSFORMS`; scale: leaf units per increment unit
    (linear) or per ln-unit (log); unit: the reported value's unit; x_unit: the increment's unit; typical: a typical
    error of x, absolute or times ``typical_per`` ('ref': the reference value, 'pixel': the pixel size in mm);
    relative: the reported value is leaf/leaf_ref (the scale); lower: a default lower bound in reported units;
    flag: the nanoBragg flag when the flag table has none for the leaf (orientation).
    """

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
    def field(self) -> str:
        """The flag table's field path of this scalar's leaf component (``params.detector.beam_center[0]``)."""
        base = f"params.{self.leaf}"
        return base if self.index is None else f"{base}[{self.index}]"

    @property
    def flags(self) -> Tuple[str, ...]:
        """nanoBragg flags that carry this value (from :data:`nbtorch.args.table.FLAGS`), e.g. ``('-Xbeam',
        '-ORGX')``; the entry's own ``flag`` where the table has none."""
        if self.flag:
            return (self.flag,)
        base = f"params.{self.leaf}"
        hits = [f.name for f in FLAGS.values() if f.field in (self.field, base)]
        if not hits and self.index is None:  # a vector moved as a whole: its components' flags
            hits = [f.name for f in FLAGS.values() if f.field.startswith(base + "[")]
        return tuple(hits)


def _lengths_and_angles():
    out = []
    for k, ax in enumerate(("a", "b", "c")):
        out.append(ScalarSpec(f"cell.{ax}", "cell", "crystal.cell", k, "cell", 1.0, "Å", "Å", 0.005, "ref"))
    for k, ax in enumerate(("alpha", "beta", "gamma")):
        out.append(ScalarSpec(f"cell.{ax}", "cell", "crystal.cell", 3 + k, "cell", 1.0, "deg", "deg", 0.1))
    return out


def _axes(group, leaf, transform, scale, unit, x_unit, typical, names="xyz", **kw):
    return [ScalarSpec(f"{group}.{ax}", group, leaf, k, transform, scale, unit, x_unit, typical, **kw)
            for k, ax in enumerate(names)]


#: Every refinable scalar, in the order of the flat vector x.
SCALARS: Tuple[ScalarSpec, ...] = tuple([
    *_lengths_and_angles(),
    *_axes("orientation", "crystal.orientation", "rotation", 1.0, "mrad", "mrad", 2.0, flag="-misset"),
    ScalarSpec("distance", "distance", "detector.distance", None, "linear", 1.0, "mm", "mm", 0.5),
    *_axes("beam_center", "detector.beam_center", "linear", 1.0, "mm", "mm", 1.0, names="xy", typical_per="pixel"),
    *_axes("detector_rotation", "detector.rotation", "linear", DEG_PER_MRAD, "deg", "mrad", 2.0),
    ScalarSpec("twotheta", "twotheta", "detector.twotheta", None, "linear", DEG_PER_MRAD, "deg", "mrad", 2.0),
    ScalarSpec("wavelength", "wavelength", "beam.wavelength", None, "log", 1.0, "Å", "ln", 1e-3),
    ScalarSpec("ncells", "ncells", "crystal.ncells", None, "log", 1.0, "cells", "ln", 0.1, lower=1.0),
    *_axes("ncells", "crystal.ncells", "log", 1.0, "cells", "ln", 0.1, names="abc", lower=1.0),
    ScalarSpec("mosaic", "mosaic", "crystal.mosaic_spread", None, "log", 1.0, "deg", "ln", 0.1),
    ScalarSpec("scale", "scale", "beam.fluence", None, "log", 1.0, "", "ln", 0.1, relative=True),
    ScalarSpec("background.constant", "background", "plane", 0, "linear", 1.0, "photons", "photons", 1.0),
    ScalarSpec("background.fast", "background", "plane", 1, "linear", 1.0, "photons", "photons", 1.0),
    ScalarSpec("background.slow", "background", "plane", 2, "linear", 1.0, "photons", "photons", 1.0),
    # nanoBragg's water intensity goes as water_size³: x = ln of the intensity scale, so the size scales by e^(x/3)
    ScalarSpec("background.water", "background", "background.water_size", None, "log", 1.0 / 3.0, "µm", "ln", 0.1),
])
SPECS: Dict[str, ScalarSpec] = {s.name: s for s in SCALARS}



@dataclasses.dataclass(frozen=True)
class GroupSpec:
    """The roles of one group of scalars.

    name: the group (the prefix of its scalars' names); moves_spots: it moves spots on the detector (a broadened
    stage runs only when such a group is free); coarse: refined in the broadened coarse stages (geometry, scale and
    background; never what the broadened spots cannot determine); search_unit / search_range / search_suffix: the
    unit, default half-width and trial-parameter suffix of a global search over it ('' = not searchable);
    report: the reported quantities ({name: length}, in :data:`REPORT_FIELDS` order); requires: {scalar: (test of
    (params, setup), why not)} conditions the starting model must meet for the scalar to be free.
    """

    name: str
    moves_spots: bool = False
    coarse: bool = False
    search_unit: str = ""
    search_range: float = 0.0
    search_suffix: str = ""
    report: Tuple[Tuple[str, int], ...] = ()
    requires: Tuple[Tuple[str, Callable, str], ...] = ()


#: Every group, in report order.
GROUP_SPECS: Tuple[GroupSpec, ...] = (
    GroupSpec("cell", search_unit="percent", search_range=3.0, search_suffix="_pct", report=(("cell", 6),)),
    GroupSpec("orientation", moves_spots=True, coarse=True, search_unit="deg", search_range=5.0,
              search_suffix="_deg", report=(("misset_deg", 3),)),
    GroupSpec("distance", moves_spots=True, coarse=True, search_unit="mm", search_range=5.0, search_suffix="_mm",
              report=(("distance_mm", 1),)),
    GroupSpec("beam_center", moves_spots=True, coarse=True, search_unit="px", search_range=10.0, search_suffix="_px",
              report=(("beam_center", 2), ("beam_center_px", 2))),
    GroupSpec("detector_rotation", moves_spots=True, coarse=True, report=(("detector_rotation_deg", 3),)),
    GroupSpec("twotheta", moves_spots=True, coarse=True, report=(("twotheta_deg", 1),)),
    GroupSpec("wavelength", report=(("wavelength_A", 1),)),
    GroupSpec("ncells", report=(("ncells", 3),)),
    GroupSpec("mosaic", report=(("mosaic_deg", 1),), requires=(
        ("mosaic", lambda p, s: s.n_domains >= 2 and float(p.crystal.mosaic_spread) > 0,
         "mosaic can only be refined when the starting model has a mosaic spread > 0 and at least 2 mosaic domains "
         "(-mosaic S -mosaic_domains M)"),)),
    GroupSpec("scale", coarse=True, report=(("fluence", 1), ("scale", 1))),
    GroupSpec("background", coarse=True, report=(("background", 3), ("water_size_um", 1)), requires=(
        ("background.water", lambda p, s: float(p.background.water_size) > 0,
         "background.water needs a starting water_size > 0 (-water SIZE_um)"),)),
)
#: Groups in report order (each the prefix of its scalars' names).
GROUPS = tuple(g.name for g in GROUP_SPECS)
assert GROUPS == tuple(dict.fromkeys(s.group for s in SCALARS)), "every group has a GroupSpec, in scalar order"
#: Groups refined while spots are broadened (never cell, wavelength, ncells, mosaic).
GEOMETRY_GROUPS = tuple(g.name for g in GROUP_SPECS if g.coarse)
#: A broadened stage that minimises runs only when one of these is free (spot positions to find).
POSITION_GROUPS = tuple(g.name for g in GROUP_SPECS if g.moves_spots)
#: Searchable groups and the units of their search ranges; default half-widths; trial-parameter suffixes.
SEARCH_UNITS = {g.name: g.search_unit for g in GROUP_SPECS if g.search_unit}
DEFAULT_RANGES = {g.name: g.search_range for g in GROUP_SPECS if g.search_unit}
SEARCH_SUFFIX = {g.name: g.search_suffix for g in GROUP_SPECS if g.search_unit}
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
