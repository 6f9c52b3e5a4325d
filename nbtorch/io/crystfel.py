"""CrystFEL geometry files (``.geom``): read a multi-panel detector, write it back (docs/io.md "CrystFEL geometry").

The file is a list of ``key = value`` lines (``;`` starts a comment).  ``panel/key`` sets a key of one panel (a panel
exists from its first mention); a bare ``key`` sets a default that every panel mentioned *later* takes, except the
truly global keys (``clen``, ``photon_energy``/``wavelength``, groups …).  ``bad…/key`` lines describe bad regions,
``group_NAME = a,b`` the panel hierarchy (top group ``all``), and the older ``rigid_group_NAME`` /
``rigid_group_collection_NAME`` lines are turned into a hierarchy when no ``group_`` line is present.

Lab frame (CrystFEL's): +z along the beam away from the source, +y up, +x completing a right-handed frame.  A panel's
``corner_x``/``corner_y`` (pixels of that panel) place the outer corner of its first pixel; its z is ``clen`` +
``coffset``; ``fs``/``ss`` are lab vectors in pixels.  Pixel (fs, ss) therefore has its centre at
corner + (fs + ½)·fs_step + (ss + ½)·ss_step.  :class:`Panel` keeps the file's own numbers (pixels, metres,
pixels per metre) so that read → write → read gives identical values; its properties give lab millimetres.

``readout_noise`` (a panel's read-out noise σ_r in ADU, >= 0; global as a default for later panels, or
``panel/readout_noise``) is an nbtorch extension key, not CrystFEL's (CrystFEL rejects unknown keys: strip it before
giving the file to CrystFEL): kept in :attr:`Panel.extra` and written back, it gives ``nbtorch-refine``'s Gaussian–
Poisson target its read-out noise (:func:`refine.targets.detector.from_crystfel`).  So are ``thickness_um`` (the
sensor's thickness, µm) and ``mu_per_um`` (its attenuation coefficient, 1/µm), global or per panel: a panel with them
absorbs in its own sensor, layer by layer (:attr:`Panel.sensor`, :func:`nbtorch.panels.layout_from_crystfel`: the
parallax of a thick sensor, as an ``.expt`` panel's ``thickness``/``mu`` give it).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

from ._atomic import atomic_write
from ._parse import display_name, read_bytes

__all__ = [
    "Panel", "Group", "BadRegion", "Mask", "Geometry", "GeometryFileError",
    "read_geom", "parse_geom", "write_geom", "format_geom", "pixel_centers", "panel_normal", "panel_with_lab_frame",
    "bad_pixels", "ORTHOGONALITY_TOLERANCE", "slab_shape", "slab_to_panels", "panels_to_slab", "geometry_mask",
    "moved_geometry", "data_file_masks",
]

Vec = Tuple[float, float, float]

#: Largest |cos| of the angle between a panel's fs and ss vectors that is still taken as orthogonal (≈ 0.57°).
ORTHOGONALITY_TOLERANCE = 0.01
#: Panel keys that nbtorch reads.
_PANEL_KEYS = ("fs", "ss", "corner_x", "corner_y", "coffset", "res", "clen", "min_fs", "max_fs", "min_ss", "max_ss",
               "adu_per_photon", "adu_per_eV", "data", "dimN", "mask", "mask_file", "mask_good", "mask_bad",
               "maskN_data", "maskN_file", "maskN_goodbits", "maskN_badbits", "no_index")
#: Panel keys CrystFEL knows that nbtorch keeps (and writes back) without using them.
_PANEL_KEPT = ("max_adu", "flag_lessthan", "flag_morethan", "flag_equal", "mask_edge_pixels", "saturation_map",
               "saturation_map_file", "badrow_direction", "peak_sep", "rail_direction", "clen_for_centering",
               "readout_noise", "thickness_um", "mu_per_um")
#: nbtorch's extension keys of a panel's sensor (module docstring): thickness (µm) and attenuation (1/µm).
_SENSOR_KEYS = ("thickness_um", "mu_per_um")
#: Global keys (not panel defaults) that nbtorch keeps and writes back (``detector_shift_x/_y`` move every panel;
#: ``photon_energy_scale``, of files for CrystFEL before 0.10, scales the file's photon energy; the others are
#: not used).
_GLOBAL_KEPT = ("peak_list", "peak_list_type", "bandwidth", "detector_shift_x", "detector_shift_y",
                "photon_energy_bandwidth", "photon_energy_scale", "peak_info_location")
_GLOBAL_KEYS = ("clen", "photon_energy", "wavelength", "group_NAME", "rigid_group_NAME",
                "rigid_group_collection_NAME") + _GLOBAL_KEPT
_BAD_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss", "min_x", "max_x", "min_y", "max_y", "panel")
_REQUIRED = ("fs", "ss", "corner_x", "corner_y", "res", "min_fs", "max_fs", "min_ss", "max_ss")
_MASK_ALIASES = {"mask": "mask0_data", "mask_file": "mask0_file", "mask_good": "mask0_goodbits",
                 "mask_bad": "mask0_badbits"}
_MASK_SPELLING = {v: k for k, v in _MASK_ALIASES.items()}
_MASK_RE = re.compile(r"mask([0-7])_(data|file|goodbits|badbits)\Z")
_DIM_RE = re.compile(r"dim(\d+)\Z")
_NUM = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_TERM_RE = re.compile(rf"([+-]?)({_NUM})?([xyz])")
_FLOAT_RE = re.compile(rf"[+-]?{_NUM}\Z")
_DEFAULT_DIMS = ("ss", "fs")
_DEFAULT_DATA = "/data/data"


class GeometryFileError(ValueError):
    """A malformed ``.geom`` file: the message is one line ``"<file>, line <n>: <key>: <problem>"``."""


@dataclass(frozen=True)
class Mask:
    """One bad-pixel mask of a panel (``maskN_data/_file/_goodbits/_badbits``; ``mask``… is mask 0).  ``data``: the
    location in the data (or mask) file; ``file``: a separate mask file or None (the image's own file).  A pixel is
    bad where its mask value lacks a bit of ``good_bits`` or has a bit of ``bad_bits`` (None: 0).  ``line``/``key``:
    where the file names the mask (its ``…_file`` line if it has one), for messages; not compared."""
    index: int
    data: Optional[str] = None
    file: Optional[str] = None
    good_bits: Optional[int] = None
    bad_bits: Optional[int] = None
    line: int = field(default=0, compare=False, repr=False)
    key: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class BadRegion:
    """A ``bad…`` region: either inclusive fs/ss ranges in the panel's data-slab coordinates (``panel`` names the
    panel; None where the detector has one panel), or x/y ranges in pixel units of the lab frame."""
    name: str
    panel: Optional[str] = None
    fs: Optional[Tuple[int, int]] = None
    ss: Optional[Tuple[int, int]] = None
    x: Optional[Tuple[float, float]] = None
    y: Optional[Tuple[float, float]] = None


@dataclass(frozen=True)
class Group:
    """A node of the panel hierarchy: ``members`` are panel names or names of other groups (the root is ``all``)."""
    name: str
    members: Tuple[str, ...]


@dataclass(frozen=True)
class Panel:
    """One detector panel, in the file's own units (exactly as read; see the properties for lab millimetres).

    ``corner_x``/``corner_y``: outer corner of the first pixel (pixels); ``fs``/``ss``: lab steps of one pixel along
    the fast and slow scan (pixels; not normalised, as the file gives them); ``res``: pixels per metre; ``clen_m``,
    ``coffset``: camera length and this panel's offset (m), the corner's z being their sum; ``clen``: the file's
    clen text (a number with optional unit, or a data-file location); ``min_fs`` … ``max_ss``: inclusive ranges in
    the data slab; ``data``/``dims``: where the slab is (``dims`` lists ``dim0``, ``dim1``, … as ``'%'``, ``'ss'``,
    ``'fs'`` or a fixed index); ``extra``: keys CrystFEL knows that nbtorch keeps without using them;
    ``shift_mm``: the file's whole-detector ``detector_shift_x``/``_y`` (mm), added to the corner's x and y.
    """
    name: str
    fs: Vec
    ss: Vec
    corner_x: float
    corner_y: float
    res: float
    clen_m: float
    clen: str
    min_fs: int
    max_fs: int
    min_ss: int
    max_ss: int
    coffset: float = 0.0
    adu_per_photon: Optional[float] = None
    adu_per_eV: Optional[float] = None
    data: str = _DEFAULT_DATA
    dims: Tuple[str, ...] = _DEFAULT_DIMS
    masks: Tuple[Mask, ...] = ()
    no_index: bool = False
    extra: Tuple[Tuple[str, str], ...] = ()
    shift_mm: Tuple[float, float] = (0.0, 0.0)

    @property
    def sensor(self) -> Tuple[Optional[float], Optional[float]]:
        """The panel's own sensor from nbtorch's extension keys: (thickness µm, attenuation 1/µm), or (None, None)
        without ``thickness_um`` (the set-up's sensor then applies)."""
        kept = dict(self.extra)
        if "thickness_um" not in kept:
            return None, None
        return float(kept["thickness_um"]), float(kept.get("mu_per_um", 0.0))

    @property
    def pixel_size(self) -> float:
        """Pixel size (mm) = 1000 / ``res``."""
        return 1000.0 / self.res

    @property
    def n_fast(self) -> int:
        """Pixels along the fast scan (``max_fs − min_fs + 1``)."""
        return self.max_fs - self.min_fs + 1

    @property
    def n_slow(self) -> int:
        """Pixels along the slow scan (``max_ss − min_ss + 1``)."""
        return self.max_ss - self.min_ss + 1

    @property
    def corner(self) -> Vec:
        """Lab position (mm) of the outer corner of pixel (0, 0): (corner_x·p + shift x, corner_y·p + shift y,
        1000·(clen + coffset))."""
        p = self.pixel_size
        return (self.corner_x * p + self.shift_mm[0], self.corner_y * p + self.shift_mm[1],
                1000.0 * (self.clen_m + self.coffset))

    @property
    def fs_step(self) -> Vec:
        """Lab step of one pixel along the fast scan (mm): ``fs`` × pixel size."""
        return tuple(c * self.pixel_size for c in self.fs)

    @property
    def ss_step(self) -> Vec:
        """Lab step of one pixel along the slow scan (mm): ``ss`` × pixel size."""
        return tuple(c * self.pixel_size for c in self.ss)


@dataclass(frozen=True)
class Geometry:
    """A detector read from a ``.geom`` file.

    ``panels`` in file order; ``groups`` the hierarchy, children before parents and the root ``all`` last;
    ``bad_regions`` in file order; ``photon_energy_eV`` the beam's photon energy (None when the file gives none);
    ``beam``: the file's ``(key, text)`` for it; ``rigid_groups``/``rigid_group_collections``: the older lines as
    ``(name, members)``; ``extra``: global keys kept without use; ``source``: the file it was read from (for
    messages, and to find mask files named relative to it; not compared).
    """
    panels: Tuple[Panel, ...]
    groups: Tuple[Group, ...]
    bad_regions: Tuple[BadRegion, ...] = ()
    photon_energy_eV: Optional[float] = None
    beam: Optional[Tuple[str, str]] = None
    rigid_groups: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    rigid_group_collections: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    extra: Tuple[Tuple[str, str], ...] = ()
    source: Optional[str] = field(default=None, compare=False)

    @property
    def wavelength(self) -> Optional[float]:
        """Wavelength (Å) from :attr:`photon_energy_eV` (nbtorch's hc), or None."""
        from ..units import wavelength_from_energy

        return None if self.photon_energy_eV is None else wavelength_from_energy(self.photon_energy_eV)

    def panel(self, name: str) -> Panel:
        """The panel called ``name`` (KeyError if none)."""
        for p in self.panels:
            if p.name == name:
                return p
        raise KeyError(name)

    def group(self, name: str) -> Group:
        """The group called ``name`` (KeyError if none)."""
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def groups_at_level(self, level: int) -> Tuple[str, ...]:
        """Names of the groups ``level`` steps below the root (level 0: ``('all',)``), in hierarchy order."""
        names = {g.name for g in self.groups}
        current = ("all",)
        for _ in range(level):
            current = tuple(m for n in current for m in self.group(n).members if m in names)
        return current

    def panels_in(self, name: str) -> Tuple[str, ...]:
        """Names of the panels under group or panel ``name``, in hierarchy order."""
        names = {g.name for g in self.groups}
        if name not in names:
            return (name,)
        return tuple(p for m in self.group(name).members for p in self.panels_in(m))


# ----------------------------------------------------------------------------------------------------------------
# reading


class _Ctx:
    """The file name for messages, and each line's key as the file spells it."""

    def __init__(self, name: str):
        self.name = name
        self.keys: Dict[int, str] = {}

    def error(self, lineno: int, key: str, problem: str) -> GeometryFileError:
        return GeometryFileError(f"{self.name}, line {lineno}: {key}: {problem}")


def _lines(raw: bytes, ctx: _Ctx):
    """Yield ``(lineno, key, value)`` for each ``key = value`` line (comments and blank lines skipped)."""
    text = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for lineno, bline in enumerate(text.split(b"\n"), 1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError:
            raise GeometryFileError(f"{ctx.name}, line {lineno}: not valid UTF-8 text: {bline[:120]!r}") from None
        line = line.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise GeometryFileError(f"{ctx.name}, line {lineno}: expected 'key = value', got {line[:120]!r}")
        key, value = (s.strip() for s in line.split("=", 1))
        ctx.keys[lineno] = key
        yield lineno, key, value


def _float(ctx: _Ctx, lineno: int, key: str, text: str) -> float:
    if not _FLOAT_RE.match(text):
        raise ctx.error(lineno, key, f"expected a number, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise ctx.error(lineno, key, f"{text!r} overflows a double")
    return value


def _int(ctx: _Ctx, lineno: int, key: str, text: str) -> int:
    """An integer; an integral decimal (``513.0``) and, for bit masks, hex (``0xff``) are accepted."""
    try:
        return int(text, 0)
    except ValueError:
        value = _float(ctx, lineno, key, text)
    if value != math.floor(value) or abs(value) > 2**53:
        raise ctx.error(lineno, key, f"expected an integer, got {text!r}")
    return int(value)


def _vector(ctx: _Ctx, lineno: int, key: str, text: str) -> Vec:
    """``+0.0012x +0.99999y -0.002z``, ``x``, ``-y`` … → (x, y, z) (repeated axes add up, as in CrystFEL)."""
    compact = re.sub(r"\s+", "", text)
    out = {"x": 0.0, "y": 0.0, "z": 0.0}
    pos = 0
    for m in _TERM_RE.finditer(compact):
        if m.start() != pos or (pos > 0 and not m.group(1)):
            break
        out[m.group(3)] += (-1.0 if m.group(1) == "-" else 1.0) * (float(m.group(2)) if m.group(2) else 1.0)
        pos = m.end()
    if not compact or pos != len(compact) or not all(map(math.isfinite, out.values())):
        raise ctx.error(lineno, key, f"expected a vector such as '+0.9999x -0.0012y' or 'x', got {text!r}")
    return (out["x"], out["y"], out["z"])


def _bool(ctx: _Ctx, lineno: int, key: str, text: str) -> bool:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ctx.error(lineno, key, f"expected true, false or an integer, got {text!r}")
    return int(text) != 0


def _panel_key_known(key: str) -> bool:
    return key in _PANEL_KEYS or key in _PANEL_KEPT or key in _MASK_ALIASES or bool(
        _MASK_RE.match(key) or _DIM_RE.match(key))


def _unknown(ctx: _Ctx, lineno: int, key: str, where: str, allowed) -> GeometryFileError:
    return ctx.error(lineno, key, f"unknown {where} key (allowed: {', '.join(allowed)})")


class _Raw:
    """What the lines say, before values are checked: panels' key → (text, line), globals, groups, bad regions."""

    def __init__(self):
        self.defaults: Dict[str, Tuple[str, int]] = {}
        self.panels: Dict[str, Dict[str, Tuple[str, int]]] = {}
        self.first_line: Dict[str, int] = {}
        self.bad: Dict[str, Dict[str, Tuple[str, int]]] = {}
        self.glob: Dict[str, Tuple[str, int]] = {}
        self.groups: List[Tuple[str, List[str], int]] = []
        self.rigid: List[Tuple[str, List[str], int]] = []
        self.collections: List[Tuple[str, List[str], int]] = []
        self.unused: Optional[Tuple[str, int]] = None  # a default set after the last new panel


def _members(ctx: _Ctx, lineno: int, key: str, value: str) -> List[str]:
    members = [m.strip() for m in value.split(",")]
    if not value or any(not m for m in members):
        raise ctx.error(lineno, key, f"expected a comma-separated list of names, got {value!r}")
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise ctx.error(lineno, key, f"names {', '.join(dup)} more than once")
    return members


def _collect_global(raw: _Raw, ctx: _Ctx, lineno: int, key: str, value: str) -> None:
    """A line without ``/``: a group line, a global key, or a default for panels mentioned later."""
    for prefix, target in (("rigid_group_collection_", raw.collections), ("rigid_group_", raw.rigid),
                           ("group_", raw.groups)):
        if key.startswith(prefix) and len(key) > len(prefix):
            name = key[len(prefix):]
            if name in [t[0] for t in target]:
                raise ctx.error(lineno, key, f"group {name!r} is defined twice")
            target.append((name, _members(ctx, lineno, key, value), lineno))
            return
    if key in ("clen", "photon_energy", "wavelength") or key in _GLOBAL_KEPT:
        raw.glob[key] = (value, lineno)
    elif key == "electron_voltage":
        raise ctx.error(lineno, key, "electron beams are not simulated by nbtorch (give photon_energy or wavelength)")
    elif _panel_key_known(key):
        raw.defaults[_MASK_ALIASES.get(key, key)] = (value, lineno)
        raw.unused = (key, lineno)
    else:
        raise _unknown(ctx, lineno, key, "global", _GLOBAL_KEYS + _PANEL_KEYS + _PANEL_KEPT)


def _collect(raw_bytes: bytes, ctx: _Ctx) -> _Raw:
    raw = _Raw()
    for lineno, key, value in _lines(raw_bytes, ctx):
        if "/" not in key:
            _collect_global(raw, ctx, lineno, key, value)
            continue
        owner, sub = key.split("/", 1)
        if not owner:
            raise ctx.error(lineno, key, "no panel name before '/'")
        if owner.startswith("bad"):
            if sub not in _BAD_KEYS:
                raise _unknown(ctx, lineno, key, "bad-region", _BAD_KEYS)
            raw.bad.setdefault(owner, {})[sub] = (value, lineno)
            continue
        if owner.startswith(("group", "rigid_group")):
            raise ctx.error(lineno, key, "panel names may not start with 'bad', 'group' or 'rigid_group'")
        if not _panel_key_known(sub):
            raise _unknown(ctx, lineno, key, "panel", _PANEL_KEYS + _PANEL_KEPT)
        if owner not in raw.panels:
            raw.panels[owner] = dict(raw.defaults)
            raw.first_line[owner] = lineno
            raw.unused = None
        raw.panels[owner][_MASK_ALIASES.get(sub, sub)] = (value, lineno)
    if not raw.panels:
        raise GeometryFileError(f"{ctx.name}: no panel lines ('name/key = value'): not a CrystFEL geometry file")
    if raw.unused is not None:
        raise ctx.error(raw.unused[1], raw.unused[0], "a default after the last panel's first line applies to no "
                                                      "panel (set it before the panels, or as 'panel/key')")
    return raw


class _Values:
    """Values the file takes from a data file (``clen = /LCLS/detector_1/EncoderValue``): the ones given to
    :func:`read_geom` (clen in mm, photon energy in eV) first, else read from ``data_file`` (HDF5: a scalar, or one
    value per frame, ``frame`` picking one)."""

    def __init__(self, clen_mm, energy_eV, data_file, frame: int):
        self.given = {"clen": clen_mm, "photon_energy": energy_eV}
        self.data_file, self.frame = data_file, frame

    def read(self, ctx: _Ctx, lineno: int, key: str, location: str) -> Optional[float]:
        """The value at ``location`` in the data file, in the file's own unit (None without a data file)."""
        if self.data_file is None:
            return None
        name = display_name(self.data_file)
        array = _h5_read(ctx, lineno, key, self.data_file, location, "the data file")
        flat = array.reshape(-1)
        if flat.dtype.kind not in "iuf" or flat.size == 0:
            raise ctx.error(lineno, key, f"{location} in {name} is not a number ({array.dtype}, shape "
                                         f"{list(array.shape)})")
        if flat.size > 1 and not 0 <= self.frame < flat.size:
            raise ctx.error(lineno, key, f"{location} in {name} has {flat.size} values; there is no frame {self.frame}")
        value = float(flat[self.frame if flat.size > 1 else 0])
        if not math.isfinite(value):
            raise ctx.error(lineno, key, f"{location} in {name} is {value}")
        return value


def _h5_read(ctx: _Ctx, lineno: int, key: str, path, location: str, what: str, pick=None):
    """The array at ``location`` of the HDF5 file ``path`` (numpy; ``pick(dataset)`` reads part of it, default
    all); errors name the geometry line, key and file."""
    import numpy as np

    try:
        import h5py  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise ctx.error(lineno, key, f"reading {what} {display_name(path)} needs the optional 'h5py' package: pip "
                                     "install nbtorch[io]") from None
    name = display_name(path)
    if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
        raise ctx.error(lineno, key, f"{what} {name} not found")
    try:
        with h5py.File(path, "r") as h5:
            if location not in h5 or not hasattr(h5[location], "shape"):
                raise ctx.error(lineno, key, f"{what} {name} has no dataset {location}")
            dataset = h5[location]
            return np.asarray(dataset[()] if pick is None else pick(dataset))
    except OSError as exc:
        raise ctx.error(lineno, key, f"cannot read {what} {name} as HDF5 ({exc})") from None


def _clen_m(ctx: _Ctx, lineno: int, text: str, values: _Values) -> float:
    """``clen`` text → metres: a number (m unless ``mm``/``m`` follows) or a data-file location (the value given
    in mm, else the data file's, in mm unless ``m`` follows, as CrystFEL reads it)."""
    parts = text.split()
    if len(parts) not in (1, 2) or (len(parts) == 2 and parts[1] not in ("m", "mm")):
        raise ctx.error(lineno, "clen", f"expected a number or a data-file location with optional unit m or mm, "
                                        f"got {text!r}")
    if _FLOAT_RE.match(parts[0]):
        return _float(ctx, lineno, "clen", parts[0]) * (1e-3 if parts[1:] == ["mm"] else 1.0)
    if values.given["clen"] is not None:
        return float(values.given["clen"]) * 1e-3
    value = values.read(ctx, lineno, "clen", parts[0])
    if value is None:
        raise ctx.error(lineno, "clen", f"the camera length is read from the data file ({parts[0]}): give its value "
                                        "(clen=VALUE in mm) or the data file")
    return value * (1.0 if parts[1:] == ["m"] else 1e-3)


def _detector_shift(raw: _Raw, ctx: _Ctx, values: _Values) -> Tuple[float, float]:
    """``detector_shift_x``/``_y`` (a number or a data-file location, m unless ``mm`` follows) → (x, y) in mm."""
    out = []
    for key in ("detector_shift_x", "detector_shift_y"):
        text, lineno = raw.glob.get(key, ("0", 0))
        parts = text.split()
        if len(parts) not in (1, 2) or parts[1:] not in ([], ["m"], ["mm"]):
            raise ctx.error(lineno, key, f"expected a number or a data-file location with optional unit m or mm, "
                                         f"got {text!r}")
        if _FLOAT_RE.match(parts[0]):
            value = _float(ctx, lineno, key, parts[0])
        else:
            value = values.read(ctx, lineno, key, parts[0])
            if value is None:
                raise ctx.error(lineno, key, f"the detector shift is read from the data file ({parts[0]}): give the "
                                             "data file")
        out.append(value * (1.0 if parts[1:] == ["mm"] else 1000.0))
    return out[0], out[1]


#: Units of the beam keys (to eV for photon_energy, to Å for wavelength).
_BEAM_UNITS = {"photon_energy": {None: 1.0, "eV": 1.0, "keV": 1e3}, "wavelength": {"m": 1e10, "A": 1.0}}


def _photon_energy(raw: _Raw, ctx: _Ctx, values: _Values):
    """``(photon energy in eV or None, (key, text) or None)`` from ``photon_energy`` / ``wavelength``."""
    from ..units import HC_EV_ANGSTROM

    keys = [k for k in ("photon_energy", "wavelength") if k in raw.glob]
    if not keys:
        return None, None
    if len(keys) == 2:
        raise ctx.error(raw.glob["wavelength"][1], "wavelength", "give either photon_energy or wavelength, not both")
    key = keys[0]
    text, lineno = raw.glob[key]
    parts = text.split()
    units = _BEAM_UNITS[key]
    unit = parts[1] if len(parts) == 2 else None
    if len(parts) not in (1, 2) or unit not in units:
        raise ctx.error(lineno, key, f"expected a number or data-file location with unit "
                                     f"{' or '.join(u for u in units if u)}, got {text!r}")
    if _FLOAT_RE.match(parts[0]):
        value = _float(ctx, lineno, key, parts[0])
    elif values.given["photon_energy"] is not None:
        return float(values.given["photon_energy"]), (key, text)
    else:
        value = values.read(ctx, lineno, key, parts[0])
        if value is None:
            raise ctx.error(lineno, key, f"the beam energy is read from the data file ({parts[0]}): give its value "
                                         "(photon_energy_eV=…) or the data file")
    if value <= 0:
        raise ctx.error(lineno, key, f"must be > 0, got {value!r} ({text!r})")
    value *= units[unit]
    return (value * _energy_scale(raw, ctx) if key == "photon_energy" else HC_EV_ANGSTROM / value), (key, text)


def _energy_scale(raw: _Raw, ctx: _Ctx) -> float:
    """The older ``photon_energy_scale`` (a factor > 0 on the file's photon energy; 1 without it)."""
    if "photon_energy_scale" not in raw.glob:
        return 1.0
    text, lineno = raw.glob["photon_energy_scale"]
    scale = _float(ctx, lineno, "photon_energy_scale", text)
    if scale <= 0:
        raise ctx.error(lineno, "photon_energy_scale", f"must be > 0, got {text!r}")
    return scale


def _dims(ctx: _Ctx, keys: Dict[str, Tuple[str, int]], where: str) -> Tuple[str, ...]:
    dims = dict(enumerate(_DEFAULT_DIMS))
    line = {}
    for key, (text, lineno) in keys.items():
        m = _DIM_RE.match(key)
        if m:
            if text not in ("%", "ss", "fs") and not text.isdigit():
                raise ctx.error(lineno, f"{where}{key}", f"expected '%', 'ss', 'fs' or an index, got {text!r}")
            dims[int(m.group(1))] = text
            line[int(m.group(1))] = lineno
    out = tuple(dims.get(i) for i in range(max(dims) + 1))
    last = max(line.values(), default=0)
    if None in out or out.count("ss") != 1 or out.count("fs") != 1 or out.index("ss") > out.index("fs"):
        raise ctx.error(last, f"{where}dim", f"dimensions {list(out)} must be dim0, dim1, … without gaps, with one "
                                             "'ss' before one 'fs'")
    return out


def _masks(ctx: _Ctx, keys: Dict[str, Tuple[str, int]], where: str) -> Tuple[Mask, ...]:
    slots: Dict[int, dict] = {}
    for key, (text, lineno) in keys.items():
        m = _MASK_RE.match(key)
        if m:
            part = m.group(2)
            value = text if part in ("data", "file") else _int(ctx, lineno, f"{where}{key}", text)
            slots.setdefault(int(m.group(1)), {})[part] = (value, lineno)
    out = []
    for index in sorted(slots):
        got = slots[index]
        if "data" not in got:
            lineno = max(v[1] for v in got.values())
            raise ctx.error(lineno, f"{where}mask{index}_data", "a mask file or good/bad bits but no mask location "
                                                                 f"(mask{index}_data, or mask for mask 0)")
        val = {k: v[0] for k, v in got.items()}
        lineno = got.get("file", got["data"])[1]
        out.append(Mask(index, val.get("data"), val.get("file"), val.get("goodbits"), val.get("badbits"), lineno,
                        ctx.keys.get(lineno, f"{where}mask{index}_data")))
    return tuple(out)


def _panel(ctx: _Ctx, name: str, keys: Dict[str, Tuple[str, int]], first: int, clen, values: _Values) -> Panel:
    """One panel from its keys (its own and the defaults it took)."""
    for key in _REQUIRED:
        if key not in keys:
            raise ctx.error(first, f"{name}/{key}", f"panel {name!r} has no {key} (give '{name}/{key} = …' or a "
                                                    f"global '{key} = …' before the panel's first line)")
    if "clen" in keys:
        clen = keys["clen"]
    if clen is None:
        raise ctx.error(first, "clen", f"no camera length for panel {name!r} (give 'clen = VALUE m')")

    def num(key, conv=_float):
        text, lineno = keys[key]
        return conv(ctx, lineno, f"{name}/{key}", text)

    fs, ss = num("fs", _vector), num("ss", _vector)
    _check_steps(ctx, name, fs, ss, keys)
    rng = {k: num(k, _int) for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
    for axis in ("fs", "ss"):
        if not 0 <= rng[f"min_{axis}"] <= rng[f"max_{axis}"]:
            raise ctx.error(keys[f"max_{axis}"][1], f"{name}/max_{axis}",
                            f"need 0 <= min_{axis} <= max_{axis}, got {rng[f'min_{axis}']}..{rng[f'max_{axis}']}")
    edge = num("mask_edge_pixels", _int) if "mask_edge_pixels" in keys else 0
    if edge < 0:
        raise ctx.error(keys["mask_edge_pixels"][1], f"{name}/mask_edge_pixels", f"must be >= 0, got {edge}")
    if "readout_noise" in keys and not num("readout_noise") >= 0:  # nbtorch's extension key (module docstring)
        raise ctx.error(keys["readout_noise"][1], f"{name}/readout_noise",
                        f"the read-out noise must be a number of ADU >= 0, got {keys['readout_noise'][0]!r}")
    _check_sensor(ctx, name, keys, num)
    res = num("res")
    if res <= 0:
        raise ctx.error(keys["res"][1], f"{name}/res", f"pixels per metre must be > 0, got {keys['res'][0]!r}")
    adu = {k: num(k) if k in keys else None for k in ("adu_per_photon", "adu_per_eV")}
    if None not in adu.values():  # the later line wins, as in CrystFEL
        adu[min(adu, key=lambda k: keys[k][1])] = None
    return Panel(name=name, fs=fs, ss=ss, corner_x=num("corner_x"), corner_y=num("corner_y"), res=res,
                 clen_m=_clen_m(ctx, clen[1], clen[0], values), clen=clen[0], **rng,
                 coffset=num("coffset") if "coffset" in keys else 0.0, **adu,
                 data=keys.get("data", (_DEFAULT_DATA,))[0], dims=_dims(ctx, keys, f"{name}/"),
                 masks=_masks(ctx, keys, f"{name}/"), no_index=num("no_index", _bool) if "no_index" in keys else False,
                 extra=tuple((k, str(edge) if k == "mask_edge_pixels" else keys[k][0]) for k in _PANEL_KEPT
                             if k in keys))


def _check_sensor(ctx: _Ctx, name: str, keys, num) -> None:
    """A panel's sensor keys (nbtorch's extension): ``thickness_um`` > 0 and ``mu_per_um`` > 0, both or neither."""
    given = [k for k in _SENSOR_KEYS if k in keys]
    if len(given) == 1:
        other = [k for k in _SENSOR_KEYS if k not in keys][0]
        raise ctx.error(keys[given[0]][1], f"{name}/{other}", f"panel {name!r} has {given[0]} but no {other}: give "
                        "both (the sensor's thickness in µm and its attenuation coefficient in 1/µm)")
    for key in given:
        if not num(key) > 0:
            raise ctx.error(keys[key][1], f"{name}/{key}", f"must be a number > 0, got {keys[key][0]!r}")


def _check_steps(ctx: _Ctx, name: str, fs: Vec, ss: Vec, keys) -> None:
    nf, ns = math.sqrt(sum(c * c for c in fs)), math.sqrt(sum(c * c for c in ss))
    lineno = max(keys["fs"][1], keys["ss"][1])
    if nf == 0 or ns == 0:
        raise ctx.error(lineno, f"{name}/{'fs' if nf == 0 else 'ss'}", "a zero-length vector")
    cos = sum(a * b for a, b in zip(fs, ss)) / (nf * ns)
    if abs(cos) > ORTHOGONALITY_TOLERANCE:
        raise ctx.error(lineno, f"{name}/ss", f"fs and ss are not orthogonal (angle {math.degrees(math.acos(cos)):.3f}"
                                              f"°; |cos| must be <= {ORTHOGONALITY_TOLERANCE})")


def _check_overlaps(ctx: _Ctx, panels: Tuple[Panel, ...], raw: _Raw) -> None:
    """Panels reading the same slab (same data location and layout) must not share a pixel."""
    seen: Dict[tuple, List[Panel]] = {}
    for p in panels:
        others = seen.setdefault((p.data, p.dims), [])
        for q in others:
            if p.min_fs <= q.max_fs and q.min_fs <= p.max_fs and p.min_ss <= q.max_ss and q.min_ss <= p.max_ss:
                lineno = max(raw.panels[p.name][k][1] for k in ("min_fs", "max_fs", "min_ss", "max_ss"))
                raise ctx.error(lineno, f"{p.name}/min_fs", f"fs {p.min_fs}..{p.max_fs}, ss {p.min_ss}..{p.max_ss} "
                                f"overlaps panel {q.name!r} (fs {q.min_fs}..{q.max_fs}, ss {q.min_ss}..{q.max_ss}; "
                                "ranges are inclusive)")
        others.append(p)


def _bad_region(ctx: _Ctx, name: str, keys: Dict[str, Tuple[str, int]], panels: Dict[str, Panel]) -> BadRegion:
    last = max(v[1] for v in keys.values())
    fsss = [k for k in ("min_fs", "max_fs", "min_ss", "max_ss") if k in keys]
    xy = [k for k in ("min_x", "max_x", "min_y", "max_y") if k in keys]
    if (fsss and xy) or len(fsss + xy) != 4:
        raise ctx.error(last, f"{name}/{(fsss + xy + ['min_fs'])[0]}", "a bad region needs all four of min_fs, max_fs,"
                        " min_ss, max_ss or all four of min_x, max_x, min_y, max_y (not a mixture)")
    panel = keys["panel"][0] if "panel" in keys else None
    if panel is not None and panel not in panels:
        raise ctx.error(keys["panel"][1], f"{name}/panel", f"no panel called {panel!r}")
    if xy:
        val = {k: _float(ctx, keys[k][1], f"{name}/{k}", keys[k][0]) for k in xy}
        return BadRegion(name, panel, x=(val["min_x"], val["max_x"]), y=(val["min_y"], val["max_y"]))
    val = {k: _int(ctx, keys[k][1], f"{name}/{k}", keys[k][0]) for k in fsss}
    if panel is None and len(panels) != 1:
        raise ctx.error(last, f"{name}/panel", "a bad region in fs/ss needs the panel it is on (bad…/panel = NAME)")
    p = panels[panel] if panel is not None else next(iter(panels.values()))
    if not (p.min_fs <= val["min_fs"] <= val["max_fs"] <= p.max_fs and p.min_ss <= val["min_ss"] <= val["max_ss"]
            <= p.max_ss):
        raise ctx.error(last, f"{name}/max_fs", f"fs {val['min_fs']}..{val['max_fs']}, ss {val['min_ss']}.."
                        f"{val['max_ss']} is not inside panel {p.name!r} (fs {p.min_fs}..{p.max_fs}, ss {p.min_ss}.."
                        f"{p.max_ss})")
    return BadRegion(name, panel, fs=(val["min_fs"], val["max_fs"]), ss=(val["min_ss"], val["max_ss"]))


def _tree_from_groups(ctx: _Ctx, raw: _Raw, panel_names: List[str]) -> Tuple[Group, ...]:
    """The ``group_`` lines as a tree (every member a known panel or group, no member in two groups, no loop)."""
    known = {name for name, _, _ in raw.groups}
    parent: Dict[str, str] = {}
    for name, members, lineno in raw.groups:
        if name in panel_names:
            raise ctx.error(lineno, f"group_{name}", "a group may not have the name of a panel")
        for m in members:
            if m not in known and m not in panel_names:
                raise ctx.error(lineno, f"group_{name}", f"unknown member {m!r} (neither a panel nor a group)")
            if m in parent:
                raise ctx.error(lineno, f"group_{name}", f"{m!r} is already in group {parent[m]!r}")
            parent[m] = name
    groups = {name: list(members) for name, members, _ in raw.groups}
    lines = {name: lineno for name, _, lineno in raw.groups}
    if "all" not in groups:  # the top group is implied: every group and panel without a parent
        groups["all"] = [n for n in [g[0] for g in raw.groups] + panel_names if n not in parent]
    elif "all" in parent:
        raise ctx.error(lines["all"], "group_all", f"the top group 'all' is a member of {parent['all']!r}")
    parent.update({n: "all" for n in groups["all"]})
    groups["all"] += [n for n in panel_names if not _reaches(n, parent)]
    stray = [n for n in groups if n != "all" and not _reaches(n, parent)]
    if stray:
        raise ctx.error(lines[stray[0]], f"group_{stray[0]}", "the group is not under the top group 'all' (a loop?)")
    return _post_order(groups)


def _reaches(name: str, parent: Dict[str, str]) -> bool:
    """Whether following ``parent`` from ``name`` ends at ``all`` (loops end False)."""
    seen = set()
    while name in parent and name not in seen:
        seen.add(name)
        name = parent[name]
    return name == "all"


def _post_order(groups: Dict[str, List[str]]) -> Tuple[Group, ...]:
    out: List[Group] = []

    def visit(name):
        for m in groups[name]:
            if m in groups:
                visit(m)
        out.append(Group(name, tuple(groups[name])))

    visit("all")
    return tuple(out)


def _tree_from_rigid(ctx: _Ctx, raw: _Raw, panel_names: List[str]) -> Tuple[Group, ...]:
    """The older ``rigid_group_`` lines as a tree: each group sits in the smallest group that holds all its panels
    (ties: the later line inside the earlier); groups that share panels without one holding the other are an error.
    A group's members are its child groups (file order), then its panels in no child (panel order).  The
    ``rigid_group_collection_`` lines are kept as written, unchecked: real files name rigid groups they no longer
    define in them, and CrystFEL since 0.10 ignores the older lines.  A rigid group named like its one panel
    (``rigid_group_det = det``) is that panel's own rigid body, not a node of its own."""
    sets = {}
    rigid = [g for g in raw.rigid if not (g[1] == [g[0]] and g[0] in panel_names)]
    for name, members, lineno in rigid:
        bad = [m for m in members if m not in panel_names]
        if bad or name in panel_names or name == "all":
            problem = f"unknown panel {bad[0]!r}" if bad else "a rigid group may not be called 'all' or like a panel"
            raise ctx.error(lineno, f"rigid_group_{name}", problem)
        sets[name] = frozenset(members)
    file_order = [name for name, _, _ in rigid]
    placed: List[str] = []  # largest first, so the last container met going backwards is the smallest
    kids: Dict[str, List[str]] = {"all": []}
    for name, _, lineno in sorted(rigid, key=lambda g: (-len(g[1]), file_order.index(g[0]))):
        host = "all"
        for other in reversed(placed):
            if sets[name] <= sets[other]:
                host = other
                break
            if sets[name] & sets[other]:
                raise ctx.error(lineno, f"rigid_group_{name}", f"shares panels with rigid_group_{other} without "
                                "either holding the other: rigid groups must nest")
        placed.append(name)
        kids[host].append(name)
        kids[name] = []
    groups = {}
    for name, children in kids.items():
        inner = set().union(*(sets[k] for k in children))
        own = sets.get(name, frozenset(panel_names))
        groups[name] = sorted(children, key=file_order.index) + [p for p in panel_names if p in own - inner]
    return _post_order(groups)


def _hierarchy(ctx: _Ctx, raw: _Raw, panel_names: List[str]) -> Tuple[Group, ...]:
    if raw.groups:
        return _tree_from_groups(ctx, raw, panel_names)
    if raw.rigid:
        return _tree_from_rigid(ctx, raw, panel_names)
    return (Group("all", tuple(panel_names)),)


def parse_geom(raw_bytes: bytes, name: str, *, clen: Optional[float] = None,
               photon_energy_eV: Optional[float] = None, data_file=None, frame: int = 0) -> Geometry:
    """:func:`read_geom` on the file's bytes; ``name`` is used in messages (and to find mask files named relative
    to the geometry file)."""
    ctx = _Ctx(name)
    raw = _collect(raw_bytes, ctx)
    values = _Values(clen, photon_energy_eV, data_file, frame)
    glob_clen = raw.glob.get("clen")
    shift = _detector_shift(raw, ctx, values)
    panels = tuple(replace(_panel(ctx, n, keys, raw.first_line[n], glob_clen, values), shift_mm=shift)
                   for n, keys in raw.panels.items())
    _check_overlaps(ctx, panels, raw)
    by_name = {p.name: p for p in panels}
    bad = tuple(_bad_region(ctx, n, keys, by_name) for n, keys in raw.bad.items())
    energy, beam = _photon_energy(raw, ctx, values)
    return Geometry(panels=panels, groups=_hierarchy(ctx, raw, list(by_name)), bad_regions=bad,
                    photon_energy_eV=energy, beam=beam,
                    rigid_groups=tuple((n, tuple(m)) for n, m, _ in raw.rigid),
                    rigid_group_collections=tuple((n, tuple(m)) for n, m, _ in raw.collections),
                    extra=tuple((k, raw.glob[k][0]) for k in _GLOBAL_KEPT if k in raw.glob), source=name)


def read_geom(path: str | os.PathLike, *, clen: Optional[float] = None,
              photon_energy_eV: Optional[float] = None, data_file=None, frame: int = 0) -> Geometry:
    """Read a CrystFEL geometry file.

    Args:
        path: the ``.geom`` file.
        clen: the camera length (mm) where the file takes it from the data file (``clen = /LCLS/…``); ignored where
            the file gives a number.
        photon_energy_eV: the photon energy (eV) where the file's ``photon_energy``/``wavelength`` is a data-file
            location; ignored where the file gives a number.
        data_file: an HDF5 image file (path) to read such values from where ``clen``/``photon_energy_eV`` are not
            given: a scalar, or one value per frame (``frame``, 0-based, picks one), in the unit the geometry file
            names (``clen``: mm unless ``m`` follows, as CrystFEL reads a location; ``photon_energy``: eV or keV;
            ``wavelength``: m or A).
        frame: the frame of ``data_file`` whose values are read.

    Returns:
        :class:`Geometry`: panels (file units kept; ``Panel.corner``, ``fs_step``, ``ss_step`` in lab mm), the group
        hierarchy (root ``all``; implied, holding every panel, when the file has no group lines), bad regions, masks
        (not opened here: :func:`geometry_mask` reads them).

    Raises:
        GeometryFileError (a ValueError): one line naming the file, the line and the key — an unknown key (with the
        allowed ones), a panel without a required key, overlapping min/max ranges, fs and ss not orthogonal
        (:data:`ORTHOGONALITY_TOLERANCE`; parallel or zero-length steps included), a group naming an unknown member,
        a data-file location with no value given or not in ``data_file``.
        OSError if the file cannot be read.
    """
    return parse_geom(read_bytes(path), display_name(path), clen=clen, photon_energy_eV=photon_energy_eV,
                      data_file=data_file, frame=frame)


# ----------------------------------------------------------------------------------------------------------------
# writing


def _vec_text(v: Vec) -> str:
    return " ".join(f"{c:+}{axis}" for c, axis in zip(v, "xyz"))


def _panel_items(p: Panel) -> List[Tuple[str, str]]:
    """``(key, text)`` of every key of a panel, values at full precision (``repr``)."""
    items = [("min_fs", str(p.min_fs)), ("max_fs", str(p.max_fs)), ("min_ss", str(p.min_ss)),
             ("max_ss", str(p.max_ss)), ("fs", _vec_text(p.fs)), ("ss", _vec_text(p.ss)),
             ("corner_x", repr(p.corner_x)), ("corner_y", repr(p.corner_y)), ("coffset", repr(p.coffset)),
             ("res", repr(p.res)), ("clen", p.clen), ("data", p.data)]
    items += [(f"dim{i}", d) for i, d in enumerate(p.dims)]
    for key in ("adu_per_photon", "adu_per_eV"):
        if getattr(p, key) is not None:
            items.append((key, repr(getattr(p, key))))
    for m in p.masks:
        for part, value in (("data", m.data), ("file", m.file), ("goodbits", m.good_bits), ("badbits", m.bad_bits)):
            if value is not None:  # mask 0 in the older spelling, which every CrystFEL version reads
                key = _MASK_SPELLING.get(f"mask{m.index}_{part}", f"mask{m.index}_{part}")
                items.append((key, value if isinstance(value, str) else hex(value)))
    if p.no_index:
        items.append(("no_index", "1"))
    return items + list(p.extra)


#: Keys always written per panel (its place in the slab and in the lab), even where every panel has the same value.
_OWN_KEYS = ("min_fs", "max_fs", "min_ss", "max_ss", "fs", "ss", "corner_x", "corner_y")


def _bad_lines(b: BadRegion) -> List[str]:
    pairs = [("fs", b.fs), ("ss", b.ss), ("x", b.x), ("y", b.y)]
    out = [f"{b.name}/{end}_{axis} = {r[i]!r}" for axis, r in pairs if r is not None
           for i, end in enumerate(("min", "max"))]
    return out + ([f"{b.name}/panel = {b.panel}"] if b.panel is not None else [])


def format_geom(geometry: Geometry) -> str:
    """The text :func:`write_geom` writes: keys shared by every panel once at the top, then each panel's own keys,
    bad regions, the older rigid-group lines, and the hierarchy as ``group_`` lines (children first, ``all`` last)."""
    per_panel = [dict(_panel_items(p)) for p in geometry.panels]
    keys = list(dict.fromkeys(k for items in per_panel for k in items))
    shared = [k for k in keys if all(items.get(k) == per_panel[0].get(k) for items in per_panel)
              and not _DIM_RE.match(k) and k not in _OWN_KEYS]
    lines = ["; CrystFEL geometry file written by nbtorch", ""]
    if geometry.beam is not None:
        lines.append(f"{geometry.beam[0]} = {geometry.beam[1]}")
    lines += [f"{k} = {v}" for k, v in geometry.extra]
    lines += [f"{k} = {per_panel[0][k]}" for k in shared]
    if len({p.dims for p in geometry.panels}) == 1:  # dims as globals: dim lines replace the defaults as a set
        lines += [f"dim{i} = {d}" for i, d in enumerate(geometry.panels[0].dims)]
        shared += [f"dim{i}" for i in range(len(geometry.panels[0].dims))]
    for p, items in zip(geometry.panels, per_panel):
        lines.append("")
        lines += [f"{p.name}/{k} = {v}" for k, v in items.items() if k not in shared]
    lines.append("")
    for b in geometry.bad_regions:
        lines += _bad_lines(b) + [""]
    lines += [f"rigid_group_{n} = {','.join(m)}" for n, m in geometry.rigid_groups]
    lines += [f"rigid_group_collection_{n} = {','.join(m)}" for n, m in geometry.rigid_group_collections]
    lines += [f"group_{g.name} = {','.join(g.members)}" for g in geometry.groups]
    return "\n".join(lines) + "\n"


def write_geom(path: str | os.PathLike, geometry: Geometry) -> None:
    """Write ``geometry`` as a CrystFEL geometry file, atomically (:func:`~nbtorch.io.atomic_write`).

    Same panels, names, data layout, masks, bad regions and groups; numbers at full precision, so that
    :func:`read_geom` of the result (with the same ``clen``/``photon_energy_eV`` arguments where the file names
    data-file locations) gives an equal :class:`Geometry`.  A per-panel ``clen`` is written only where panels
    differ (files of CrystFEL before 0.10)."""
    atomic_write(path, format_geom(geometry).encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# lab-frame helpers


def pixel_centers(panel: Panel, dtype=None, device=None):
    """Lab positions (mm) of every pixel centre of ``panel``: tensor [n_slow, n_fast, 3] (float64 by default);
    pixel (fs, ss) at corner + (fs + ½)·fs_step + (ss + ½)·ss_step."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    corner, fstep, sstep = (torch.tensor(v, dtype=dtype, device=device)
                            for v in (panel.corner, panel.fs_step, panel.ss_step))
    f = torch.arange(panel.n_fast, dtype=dtype, device=device) + 0.5
    s = torch.arange(panel.n_slow, dtype=dtype, device=device) + 0.5
    return corner + s[:, None, None] * sstep + f[None, :, None] * fstep


def panel_normal(panel: Panel, dtype=None, device=None):
    """Unit normal (tensor [3]) of ``panel`` pointing away from the sample (at the origin): ±(fs × ss)/|fs × ss|,
    the sign chosen so that it points the way the panel's centre lies from the sample (for a left-handed panel,
    whose fs × ss points towards the sample, that is −fs × ss).  A panel whose plane holds the sample takes the sign
    that points along +z (the beam)."""
    import torch

    dtype = torch.float64 if dtype is None else dtype
    fstep, sstep, corner = (torch.tensor(v, dtype=dtype, device=device)
                            for v in (panel.fs_step, panel.ss_step, panel.corner))
    n = torch.linalg.cross(fstep, sstep)
    n = n / torch.linalg.norm(n)
    centre = corner + 0.5 * panel.n_fast * fstep + 0.5 * panel.n_slow * sstep
    side = torch.dot(n, centre)
    if side == 0:
        side = n[2]
    return -n if side < 0 else n


def panel_with_lab_frame(panel: Panel, corner: Vec, fs_step: Vec, ss_step: Vec) -> Panel:
    """``panel`` moved to a new lab corner and steps (mm; e.g. after refinement), in the file's units: its pixel
    size and ``clen`` are kept, ``coffset`` takes the change of z."""
    p = panel.pixel_size
    return replace(panel, corner_x=(float(corner[0]) - panel.shift_mm[0]) / p,
                   corner_y=(float(corner[1]) - panel.shift_mm[1]) / p,
                   coffset=float(corner[2]) / 1000.0 - panel.clen_m,
                   fs=tuple(float(c) / p for c in fs_step), ss=tuple(float(c) / p for c in ss_step))


def bad_pixels(geometry: Geometry, name: str, device=None):
    """The pixels of panel ``name`` that the file itself marks bad: bool tensor [n_slow, n_fast], True = bad.

    ``no_index`` marks the whole panel; an fs/ss region its inclusive ranges (slab coordinates, as in the file) on the
    panel it names (or the only panel); an x/y region every pixel of any panel whose position, as CrystFEL computes
    it (corner_x + fs·fs_x + ss·ss_x, likewise y, in that panel's pixels, at the pixel's corner), lies strictly
    inside.
    ``mask_edge_pixels = n`` marks a border n pixels wide.  Masks (``mask``…) are not read here
    (:func:`geometry_mask`)."""
    import torch

    p = geometry.panel(name)
    bad = torch.full((p.n_slow, p.n_fast), p.no_index, dtype=torch.bool, device=device)
    edge = int(dict(p.extra).get("mask_edge_pixels", 0))
    if edge > 0:
        for index in ((slice(None, edge),), (slice(-edge, None),), (Ellipsis, slice(None, edge)),
                      (Ellipsis, slice(-edge, None))):
            bad[index] = True
    if any(r.x is not None for r in geometry.bad_regions):
        f = torch.arange(p.n_fast, dtype=torch.float64, device=device)[None, :]
        s = torch.arange(p.n_slow, dtype=torch.float64, device=device)[:, None]
        x, y = (c + f * fv + s * sv for c, fv, sv in ((p.corner_x, p.fs[0], p.ss[0]), (p.corner_y, p.fs[1], p.ss[1])))
    for r in geometry.bad_regions:
        if r.x is not None:
            bad |= (x > r.x[0]) & (x < r.x[1]) & (y > r.y[0]) & (y < r.y[1])
        elif r.panel == name or (r.panel is None and len(geometry.panels) == 1):
            bad[r.ss[0] - p.min_ss:r.ss[1] - p.min_ss + 1, r.fs[0] - p.min_fs:r.fs[1] - p.min_fs + 1] = True
    return bad


# ----------------------------------------------------------------------------------------------------------------
# the data layout: one frame's array in the file ↔ panel images [P, S, F]


def _frame_dims(panel: Panel) -> Tuple[str, ...]:
    """A panel's dims without the frame axis ``%``: ``'ss'``, ``'fs'`` or fixed indices (as text)."""
    return tuple(d for d in panel.dims if d != "%")


def slab_shape(geometry: Geometry) -> Tuple[int, ...]:
    """Shape of one frame of the data array the file's panels index (the ``%`` axis left out): ``(max_ss + 1,
    max_fs + 1)`` for the usual two dims, with a leading axis per fixed index (``dim1 = 3``: 4 at least) where the
    file has them.  ``GeometryFileError`` if the panels disagree on their number of dims."""
    kinds = {len(_frame_dims(p)) for p in geometry.panels}
    if len(kinds) != 1:
        raise GeometryFileError(f"panels index data arrays of different ranks ({sorted(kinds)}): nbtorch needs one "
                                "layout for every panel")
    shape = []
    for axis in range(kinds.pop()):
        top = 0
        for p in geometry.panels:
            d = _frame_dims(p)[axis]
            top = max(top, p.max_ss + 1 if d == "ss" else p.max_fs + 1 if d == "fs" else int(d) + 1)
        shape.append(top)
    return tuple(shape)


def _slab_index(panel: Panel) -> tuple:
    return tuple(slice(panel.min_ss, panel.max_ss + 1) if d == "ss" else slice(panel.min_fs, panel.max_fs + 1)
                 if d == "fs" else int(d) for d in _frame_dims(panel))


def slab_to_panels(slab, geometry: Geometry):
    """Panel images ``[P, S, F]`` (numpy; S, F the largest panel's counts, smaller panels zero-padded) from one frame
    of the data array (``slab_shape(geometry)``; a trailing leading frame axis of length 1 is accepted).
    ``ValueError`` names the expected shape."""
    import numpy as np

    slab = np.asarray(slab)
    want = slab_shape(geometry)
    if slab.shape != want and not (slab.ndim == len(want) + 1 and slab.shape[0] == 1 and slab.shape[1:] == want):
        raise ValueError(f"the image is {list(slab.shape)} but the geometry's panels index a data array of "
                         f"{list(want)} (slow, fast from every panel's min/max_ss/fs)")
    slab = slab.reshape(want)
    S = max(p.n_slow for p in geometry.panels)
    F = max(p.n_fast for p in geometry.panels)
    out = np.zeros((len(geometry.panels), S, F), dtype=slab.dtype)
    for k, p in enumerate(geometry.panels):
        out[k, :p.n_slow, :p.n_fast] = slab[_slab_index(p)]
    return out


def panels_to_slab(images, geometry: Geometry):
    """One frame of the file's data array (``slab_shape(geometry)``, numpy) from panel images ``[P, S, F]``: every
    panel at its ``min/max_ss/fs`` place, pixels in no panel 0."""
    import numpy as np

    images = np.asarray(images)
    slab = np.zeros(slab_shape(geometry), dtype=images.dtype)
    for k, p in enumerate(geometry.panels):
        slab[_slab_index(p)] = images[k, :p.n_slow, :p.n_fast]
    return slab


def geometry_mask(geometry: Geometry, data_file=None, *, frame: int = 0):
    """uint8 ``[P, S, F]`` (numpy): 1 where a pixel is usable, 0 where the file marks it bad — the layout of
    ``Setup.mask`` for a panel detector.

    Marks: :func:`bad_pixels` (``no_index`` panels, ``bad…`` regions, ``mask_edge_pixels``) and the panels' masks
    (``maskN_…``, HDF5 arrays in the file's data layout): a pixel is bad where its value lacks a bit of
    ``goodbits`` or has one of ``badbits``.  A mask in its own file (``maskN_file``; a relative name is looked up in
    the working directory, as CrystFEL does, then next to the geometry file) is always read; a mask kept in the data
    file only with ``data_file`` (the image's HDF5 file; ``frame`` picks the frame where the mask has one per
    frame) and left out otherwise (:func:`data_file_masks` lists them, for a note).

    Raises:
        GeometryFileError: one line naming the geometry file, the line and key of the mask, and the mask file: a mask
        file that does not exist or cannot be read, a location not in it, an array too small for the panels.
    """
    import numpy as np

    S = max(p.n_slow for p in geometry.panels)
    F = max(p.n_fast for p in geometry.panels)
    out = np.ones((len(geometry.panels), S, F), dtype=np.uint8)
    cache: Dict[tuple, object] = {}
    for k, p in enumerate(geometry.panels):
        bad = bad_pixels(geometry, p.name).numpy()
        for m in p.masks:
            if m.file is None and data_file is None:
                continue
            values = _mask_array(geometry, p, m, data_file, frame, cache)[_slab_index(p)].astype(np.int64)
            good_bits, bad_bits = m.good_bits or 0, m.bad_bits or 0
            bad |= ((values & good_bits) != good_bits) | ((values & bad_bits) != 0)
        out[k, :p.n_slow, :p.n_fast] = ~bad
    return out


def data_file_masks(geometry: Geometry) -> Tuple[str, ...]:
    """Locations of the masks the panels keep in the image's own data file (no ``maskN_file``), in file order:
    :func:`geometry_mask` applies them only when given that file."""
    return tuple(dict.fromkeys(m.data for p in geometry.panels for m in p.masks if m.file is None))


def _mask_path(geometry: Geometry, ctx: _Ctx, m: Mask) -> str:
    """Where mask file ``m.file`` is: as given if absolute or found from the working directory, else next to the
    geometry file; an error naming it otherwise."""
    if os.path.isabs(m.file) or os.path.exists(m.file) or not geometry.source:
        found = m.file
    else:
        found = os.path.join(os.path.dirname(geometry.source), m.file)
    if not os.path.isfile(found):
        where = "" if os.path.isabs(m.file) else " (looked in the working directory and next to the geometry file)"
        raise ctx.error(m.line, m.key, f"mask file {m.file!r} not found{where}")
    return found


def _mask_array(geometry: Geometry, panel: Panel, m: Mask, data_file, frame: int, cache):
    """One frame of mask ``m`` of ``panel`` as an array in the slab layout (read once per file and location)."""
    ctx = _Ctx(geometry.source or "<geometry>")
    path = _mask_path(geometry, ctx, m) if m.file is not None else data_file
    what = "mask file" if m.file is not None else "data file"
    if "%" in m.data:
        raise ctx.error(m.line, m.key, f"mask location {m.data!r} has a '%' placeholder: nbtorch reads masks from "
                                       "one fixed location")
    rank = len(_frame_dims(panel))
    per_frame = "%" in panel.dims

    def pick(dataset):  # one frame of a mask with a frame axis, else the whole array
        if per_frame and len(dataset.shape) == rank + 1:
            if not 0 <= frame < dataset.shape[0]:
                raise ctx.error(m.line, m.key, f"{m.data} in {what} {display_name(path)} has {dataset.shape[0]} "
                                               f"frames; there is no frame {frame}")
            return dataset[frame]
        return dataset[()]

    if (path, m.data) not in cache:
        cache[(path, m.data)] = _h5_read(ctx, m.line, m.key, path, m.data, what, pick)
    array = cache[(path, m.data)]
    need = slab_shape(replace(geometry, panels=(panel,)))
    if array.ndim != rank or array.dtype.kind not in "iub" or any(a < n for a, n in zip(array.shape, need)):
        raise ctx.error(m.line, m.key, f"{m.data} in {what} {display_name(path)} is {array.dtype} "
                                       f"{list(array.shape)}; panel {panel.name!r} needs integers of at least "
                                       f"{list(need)}")
    return array


def moved_geometry(geometry: Geometry, corners, fs_steps, ss_steps) -> Geometry:
    """``geometry`` with every panel moved to new lab corners and steps (mm; ``[P, 3]`` arrays or tensors in panel
    order, e.g. :func:`nbtorch.panels.panel_lab_vectors` of refined parameters): same panels, names, layout and
    groups, new vectors, corners and coffsets (:func:`panel_with_lab_frame`)."""
    rows = [[tuple(float(c) for c in v[k]) for v in (corners, fs_steps, ss_steps)] for k in range(len(geometry.panels))]
    return replace(geometry, panels=tuple(panel_with_lab_frame(p, *r) for p, r in zip(geometry.panels, rows)))
