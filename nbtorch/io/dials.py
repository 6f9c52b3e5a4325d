"""DIALS experiment lists (``.expt``, JSON): detector and beam models, without cctbx/dxtbx (docs/io.md "DIALS
experiment lists").

An experiment list holds shared model lists (``beam``, ``detector``, ``goniometer``, ``scan``, ``crystal``,
``imageset``) and experiments that refer to them by index; models shared between experiments stay shared here.
Detectors and beams are read into frozen dataclasses; crystals, imagesets, goniometers and scans are kept as the
file's JSON objects (their ``__id__`` checked) for later readers.  :func:`read_experiments` turns every experiment
into the model nbtorch simulates (:mod:`nbtorch.io.dials_experiments`) and :func:`write_experiments` writes refined
models back into the list.

Frames (dxtbx's): a panel's and a group's ``fast_axis``, ``slow_axis`` and ``origin`` (mm) are stored in the frame
of its parent group; dxtbx normalises the axes when it reads them, and so does :func:`read_expt`.  With the
parent's lab frame (f, s, o; f and s unit, n = f × s) and P = [f | s | n], a child's lab fast axis is P·fast, its
slow axis P·slow and its origin o + P·origin; the root's parent is the lab frame itself.  Panel mm coordinate
(x, y) lies at origin + x·fast + y·slow, pixel i spanning [i, i + 1)·pixel size, so pixel (i, j) has its centre at
origin + (i + ½)·fast_step + (j + ½)·slow_step.  The beam's ``direction`` points from the sample to the source.
DIALS's lab frame and CrystFEL's differ by a 180° rotation about y: (x, y, z)_DIALS = (−x, y, −z)_CrystFEL.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from . import crystfel
from ._atomic import atomic_write
from ._parse import display_name, read_bytes
from .dials_experiments import DialsExperiment, experiment_models, refined_document
from .dials_json import MISSING as _MISSING
from .dials_json import ExptFileError
from .dials_json import Node as _Node
from .dials_json import optional as _opt

__all__ = [
    "Panel", "Group", "LabPanel", "Detector", "Beam", "Experiment", "ExperimentList", "ExptFileError",
    "read_expt", "parse_expt", "pixel_centers", "panel_normal", "dials_to_crystfel_frame",
    "crystfel_to_dials_frame", "read_experiments", "write_experiments", "DialsExperiment",
]

Vec = Tuple[float, float, float]

#: Model lists of an experiment list, in the order experiments name them.
MODELS = ("beam", "detector", "goniometer", "scan", "crystal", "imageset")
#: ``__id__`` values accepted for the models that carry one.
_IDS = {"crystal": ("crystal",), "imageset": ("ImageSet", "ImageSequence", "ImageSweep", "ImageGrid", "MemImageSet"),
        "beam": ("monochromatic", "MonochromaticBeam")}
#: Pixel centres in the lab frame, reused from the CrystFEL reader (the formula is the same):
#: ``pixel_centers(lab_panel)`` → tensor [n_slow, n_fast, 3] (mm).
pixel_centers = crystfel.pixel_centers


@dataclass(frozen=True)
class Panel:
    """One detector panel as the file gives it (vectors in the parent group's frame).

    ``fast_axis``/``slow_axis``: unit vectors (normalised on reading, as dxtbx does); ``origin``: outer corner of
    pixel (0, 0) (mm, parent frame); ``image_size``: (fast, slow) pixels; ``pixel_size``: (fast, slow) mm;
    ``thickness`` (mm), ``mu`` (1/mm), ``material``: the sensor; ``trusted_range``: (min, max) counts; ``gain``
    (counts per photon), ``pedestal``; ``mask``: untrusted rectangles (x0, y0, x1, y1) in pixels, half-open
    [x0, x1) × [y0, y1) along fast × slow; ``raw_image_offset``: (fast, slow); ``px_mm_strategy``: its ``type``;
    ``readout_noise``: the read-out noise σ_r (ADU, >= 0) of an nbtorch extension key ``"readout_noise"`` (DIALS
    has none; dxtbx ignores it), None when absent.
    """
    name: str
    type: str
    fast_axis: Vec
    slow_axis: Vec
    origin: Vec
    image_size: Tuple[int, int]
    pixel_size: Tuple[float, float]
    trusted_range: Tuple[float, float] = (0.0, 0.0)
    thickness: float = 0.0
    mu: float = 0.0
    material: str = ""
    gain: float = 1.0
    pedestal: float = 0.0
    mask: Tuple[Tuple[int, int, int, int], ...] = ()
    identifier: str = ""
    raw_image_offset: Tuple[int, int] = (0, 0)
    px_mm_strategy: str = "SimplePxMmStrategy"
    readout_noise: Optional[float] = None


@dataclass(frozen=True)
class Group:
    """A node of the hierarchy: its frame in its parent's frame (unit axes, origin in mm) and its ``children``, each
    a :class:`Group` or the index of a panel in ``Detector.panels``."""
    name: str
    type: str
    fast_axis: Vec
    slow_axis: Vec
    origin: Vec
    children: Tuple[Union["Group", int], ...]


@dataclass(frozen=True)
class LabPanel:
    """A panel in the lab frame (mm): ``corner`` is its origin (outer corner of pixel (0, 0)); ``fast_axis`` and
    ``slow_axis`` the lab directions of its pixel rows and columns as dxtbx composes them (unit where every group
    above is orthogonal); ``pixel_size`` (fast, slow) mm; ``n_fast``, ``n_slow`` pixels."""
    name: str
    corner: Vec
    fast_axis: Vec
    slow_axis: Vec
    pixel_size: Tuple[float, float]
    n_fast: int
    n_slow: int

    @property
    def fs_step(self) -> Vec:
        """Lab step of one pixel along fast (mm): ``fast_axis`` × pixel size."""
        return tuple(c * self.pixel_size[0] for c in self.fast_axis)

    @property
    def ss_step(self) -> Vec:
        """Lab step of one pixel along slow (mm): ``slow_axis`` × pixel size."""
        return tuple(c * self.pixel_size[1] for c in self.slow_axis)

    def in_crystfel_frame(self) -> "LabPanel":
        """The same panel with its vectors in CrystFEL's lab frame (:func:`dials_to_crystfel_frame`)."""
        return LabPanel(self.name, dials_to_crystfel_frame(self.corner), dials_to_crystfel_frame(self.fast_axis),
                        dials_to_crystfel_frame(self.slow_axis), self.pixel_size, self.n_fast, self.n_slow)


@dataclass(frozen=True)
class Detector:
    """A detector: ``panels`` in file order and the ``hierarchy`` (None for a flat detector, whose panels' frames are
    lab frames).  :attr:`lab_panels` composes every panel's lab frame."""
    panels: Tuple[Panel, ...]
    hierarchy: Optional[Group] = None

    @cached_property
    def lab_frames(self) -> Tuple[Tuple[Tuple[Vec, Vec, Vec], ...], Tuple[Tuple[Group, int, Tuple[Vec, Vec, Vec]], ...]]:
        """Every node's lab frame, composed down the hierarchy as dxtbx does: ``(panels, groups)``, ``panels[i]`` the
        (fast, slow, origin) of panel i and ``groups`` the ``(group, level, (fast, slow, origin))`` of every group in
        pre-order (the root at level 0).  Vectors in mm; the fast and slow axes are unit where every group above is
        orthogonal."""
        identity = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))
        panels, groups = {}, []

        def visit(node, parent, level):
            if isinstance(node, int):
                panels[node] = _compose(parent, self.panels[node])
                return
            f, s, o = _compose(parent, node)
            groups.append((node, level, (f, s, o)))
            for child in node.children:
                visit(child, (_unit(f), _unit(s), o), level + 1)

        if self.hierarchy is None:
            for i in range(len(self.panels)):
                visit(i, identity, 0)
        else:
            visit(self.hierarchy, identity, 0)
        return tuple(panels[i] for i in range(len(self.panels))), tuple(groups)

    @cached_property
    def lab_panels(self) -> Tuple[LabPanel, ...]:
        """Every panel in the lab frame (mm), in panel order, composed down the hierarchy as dxtbx does."""
        frames = self.lab_frames[0]
        return tuple(LabPanel(p.name, frames[i][2], frames[i][0], frames[i][1], p.pixel_size, *p.image_size)
                     for i, p in enumerate(self.panels))


@dataclass(frozen=True)
class Beam:
    """A monochromatic beam: ``direction`` unit vector from the sample towards the source (normalised on reading);
    ``wavelength`` (Å); ``divergence``, ``sigma_divergence`` (degrees, as the file stores them);
    ``polarization_normal`` (the normal to the plane of polarisation, as given) and ``polarization_fraction``;
    ``flux``, ``transmission``, ``probe``, ``sample_to_source_distance`` (mm) as given."""
    direction: Vec
    wavelength: float
    divergence: float = 0.0
    sigma_divergence: float = 0.0
    polarization_normal: Vec = (0.0, 1.0, 0.0)
    polarization_fraction: float = 0.999
    flux: float = 0.0
    transmission: float = 1.0
    probe: str = "x-ray"
    sample_to_source_distance: float = 0.0

    @property
    def kahn_factor(self) -> float:
        """nanoBragg's polarisation (Kahn) factor: 2·``polarization_fraction`` − 1."""
        return 2.0 * self.polarization_fraction - 1.0


@dataclass(frozen=True)
class Experiment:
    """One experiment: its ``identifier`` and the index of each of its models in the list's model lists (None where
    the experiment has none)."""
    identifier: str = ""
    beam: Optional[int] = None
    detector: Optional[int] = None
    goniometer: Optional[int] = None
    scan: Optional[int] = None
    crystal: Optional[int] = None
    imageset: Optional[int] = None


@dataclass(frozen=True)
class ExperimentList:
    """An experiment list: ``experiments`` and the shared model lists they index.  ``goniometers``, ``scans``,
    ``crystals`` and ``imagesets`` are the file's JSON objects (read-only mappings), not yet interpreted."""
    experiments: Tuple[Experiment, ...]
    beams: Tuple[Beam, ...] = ()
    detectors: Tuple[Detector, ...] = ()
    goniometers: Tuple[Mapping[str, Any], ...] = ()
    scans: Tuple[Mapping[str, Any], ...] = ()
    crystals: Tuple[Mapping[str, Any], ...] = ()
    imagesets: Tuple[Mapping[str, Any], ...] = ()

    def detector_of(self, k: int) -> Optional[Detector]:
        """The detector of experiment ``k`` (the shared object), or None."""
        i = self.experiments[k].detector
        return None if i is None else self.detectors[i]

    def beam_of(self, k: int) -> Optional[Beam]:
        """The beam of experiment ``k`` (the shared object), or None."""
        i = self.experiments[k].beam
        return None if i is None else self.beams[i]


# ----------------------------------------------------------------------------------------------------------------
# frames


def _unit(v) -> Vec:
    n = math.sqrt(sum(c * c for c in v))
    return tuple(c / n for c in v)


def _cross(a, b) -> Vec:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _compose(parent, node) -> Tuple[Vec, Vec, Vec]:
    """``(lab fast, lab slow, lab origin)`` of ``node`` (a Panel or Group) under the parent's lab frame
    ``(f, s, o)`` (f, s unit): P·fast, P·slow, o + P·origin with P = [f | s | f × s]."""
    f, s, o = parent
    n = _cross(f, s)

    def mat(v):
        return tuple(f[i] * v[0] + s[i] * v[1] + n[i] * v[2] for i in range(3))

    return mat(node.fast_axis), mat(node.slow_axis), tuple(a + b for a, b in zip(o, mat(node.origin)))


def dials_to_crystfel_frame(v):
    """A lab vector (or point, mm) in DIALS's frame expressed in CrystFEL's: (x, y, z) → (−x, y, −z), a 180° rotation
    about y.  ``v``: a 3-sequence (→ tuple) or a tensor [..., 3] (→ tensor).  The map is its own inverse."""
    if hasattr(v, "new_tensor"):
        return v * v.new_tensor([-1.0, 1.0, -1.0])
    return (-float(v[0]), float(v[1]), -float(v[2]))


def crystfel_to_dials_frame(v):
    """A lab vector in CrystFEL's frame expressed in DIALS's (the inverse of :func:`dials_to_crystfel_frame`, which
    is the same 180° rotation about y)."""
    return dials_to_crystfel_frame(v)


def panel_normal(panel: LabPanel, dtype=None, device=None):
    """Unit normal (tensor [3]) of a :class:`LabPanel` pointing away from the sample (at the origin): ±(fast × slow)
    normalised, the sign chosen so that it points the way the panel's centre lies from the sample (−fast × slow for a
    left-handed panel).  A panel whose plane holds the sample takes the sign along −z, where a DIALS beam of
    direction (0, 0, 1) travels.  (CrystFEL's rule in :func:`nbtorch.io.crystfel.panel_normal`, in DIALS's frame.)"""
    return dials_to_crystfel_frame(crystfel.panel_normal(panel.in_crystfel_frame(), dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------------------------------
# reading

def _frame(node: _Node) -> Tuple[Vec, Vec, Vec]:
    """A node's (fast, slow, origin): axes normalised as dxtbx does, after checking them (non-zero, orthogonal
    within :data:`nbtorch.io.crystfel.ORTHOGONALITY_TOLERANCE` of |cos|)."""
    fast = node.key("fast_axis").vector(nonzero=True)
    slow_node = node.key("slow_axis")
    slow = slow_node.vector(nonzero=True)
    origin = node.key("origin").vector()
    fast, slow = _unit(fast), _unit(slow)
    cos = sum(a * b for a, b in zip(fast, slow))
    if abs(cos) > crystfel.ORTHOGONALITY_TOLERANCE:
        raise slow_node.error(f"fast_axis and slow_axis are not orthogonal (angle {math.degrees(math.acos(cos)):.3f}"
                              f"°; |cos| must be <= {crystfel.ORTHOGONALITY_TOLERANCE})")
    return fast, slow, origin


def _mask(node: _Node) -> Tuple[Tuple[int, int, int, int], ...]:
    out = []
    for rect in node.items():
        x0, y0, x1, y1 = (n.integer() for n in rect.items(4))
        if not (x0 < x1 and y0 < y1):
            raise rect.error(f"an untrusted rectangle (x0, y0, x1, y1) needs x0 < x1 and y0 < y1, got "
                             f"{[x0, y0, x1, y1]}")
        out.append((x0, y0, x1, y1))
    return tuple(out)


def _panel(node: _Node) -> Panel:
    fast, slow, origin = _frame(node.obj())
    size = node.key("image_size")
    pixel = node.key("pixel_size")
    strategy = _opt(node, "px_mm_strategy", "SimplePxMmStrategy", lambda n: n.key("type").string())
    return Panel(
        name=_opt(node, "name", "", _Node.string), type=_opt(node, "type", "", _Node.string),
        fast_axis=fast, slow_axis=slow, origin=origin,
        image_size=tuple(n.integer(low=1) for n in size.items(2)),
        pixel_size=tuple(n.number(low=0.0, strict=True) for n in pixel.items(2)),
        trusted_range=_opt(node, "trusted_range", (0.0, 0.0), lambda n: n.vector(2)),
        thickness=_opt(node, "thickness", 0.0, lambda n: n.number(low=0.0)),
        mu=_opt(node, "mu", 0.0, lambda n: n.number(low=0.0)),
        material=_opt(node, "material", "", _Node.string),
        gain=_opt(node, "gain", 1.0, lambda n: n.number(low=0.0, strict=True)),
        pedestal=_opt(node, "pedestal", 0.0, _Node.number),
        mask=_opt(node, "mask", (), _mask),
        identifier=_opt(node, "identifier", "", _Node.string),
        raw_image_offset=_opt(node, "raw_image_offset", (0, 0), lambda n: tuple(m.integer() for m in n.items(2))),
        px_mm_strategy=strategy,
        readout_noise=_opt(node, "readout_noise", None, lambda n: n.number(low=0.0)))


def _group(node: _Node, n_panels: int, used: dict) -> Group:
    """A hierarchy node (a group) and, recursively, its children; ``used`` maps panel index → JSON path."""
    node.obj()
    present = [k for k in ("fast_axis", "slow_axis", "origin") if k in node.value]
    if present and len(present) < 3:
        node.key(next(k for k in ("fast_axis", "slow_axis", "origin") if k not in present))  # raises: missing
    fast, slow, origin = _frame(node) if present else ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))
    children = []
    for child in node.key("children").items():
        child.obj()
        if "panel" not in child.value:
            children.append(_group(child, n_panels, used))
            continue
        ref = child.key("panel")
        index = ref.integer(low=0)
        if index >= n_panels:
            raise ref.error(f"no panel {index} (the detector has {n_panels} panels)")
        if index in used:
            raise ref.error(f"panel {index} is already in the hierarchy at {used[index]}")
        used[index] = ref.path
        children.append(index)
    return Group(_opt(node, "name", "", _Node.string), _opt(node, "type", "", _Node.string), fast, slow, origin,
                 tuple(children))


def _detector(node: _Node) -> Detector:
    panels = tuple(_panel(p) for p in node.obj().key("panels").items())
    tree = node.key("hierarchy", None)
    if tree is None:
        return Detector(panels)
    if isinstance(tree.value, dict) and "panel" in tree.value:
        raise tree.error("the root of the hierarchy must be a group, not a panel")
    used: dict = {}
    root = _group(tree, len(panels), used)
    missing = [i for i in range(len(panels)) if i not in used]
    if missing:
        raise tree.error(f"panel {missing[0]} is in no group of the hierarchy (every panel must be in it once)")
    return Detector(panels, root)


def _check_id(node: _Node, allowed: Tuple[str, ...], required: bool = False) -> None:
    ident = node.key("__id__", None if not required else _MISSING)
    if ident is not None and ident.value not in allowed:
        raise ident.error(f"unknown __id__ {ident.value!r} (allowed: {', '.join(allowed)})")


def _beam(node: _Node) -> Beam:
    _check_id(node.obj(), _IDS["beam"])
    return Beam(
        direction=_unit(node.key("direction").vector(nonzero=True)),
        wavelength=node.key("wavelength").number(low=0.0, strict=True),
        divergence=_opt(node, "divergence", 0.0, lambda n: n.number(low=0.0)),
        sigma_divergence=_opt(node, "sigma_divergence", 0.0, lambda n: n.number(low=0.0)),
        polarization_normal=_opt(node, "polarization_normal", (0.0, 1.0, 0.0), _Node.vector),
        polarization_fraction=_opt(node, "polarization_fraction", 0.999, _fraction),
        flux=_opt(node, "flux", 0.0, lambda n: n.number(low=0.0)),
        transmission=_opt(node, "transmission", 1.0, lambda n: n.number(low=0.0)),
        probe=_opt(node, "probe", "x-ray", _Node.string),
        sample_to_source_distance=_opt(node, "sample_to_source_distance", 0.0, lambda n: n.number(low=0.0)))


def _fraction(node: _Node) -> float:
    value = node.number(low=0.0)
    if value > 1.0:
        raise node.error(f"must be between 0 and 1, got {value!r}")
    return value


def _raw(node: _Node, name: str) -> Mapping[str, Any]:
    if name in _IDS:
        _check_id(node.obj(), _IDS[name], required=True)
    return MappingProxyType(node.obj().value)


def _experiment(node: _Node, sizes: dict) -> Experiment:
    _check_id(node.obj(), ("Experiment",))
    refs = {}
    for model in MODELS:
        ref = node.key(model, None)
        if ref is None or ref.value is None:
            continue
        if isinstance(ref.value, str):
            raise ref.error(f"refers to another file ({ref.value!r}); only indices into the list's {model!r} models "
                            "are supported")
        index = ref.integer(low=0)
        if index >= sizes[model]:
            raise ref.error(f"no {model} {index} (the file has {sizes[model]})")
        refs[model] = index
    return Experiment(identifier=_opt(node, "identifier", "", _Node.string), **refs)


def parse_expt(raw: bytes, name: str) -> ExperimentList:
    """:func:`read_expt` on the file's bytes; ``name`` is used in messages."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise ExptFileError(f"{name}: not valid UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ExptFileError(f"{name}: line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}") from None
    except ValueError as exc:
        raise ExptFileError(f"{name}: not valid JSON: {exc}") from None
    top = _Node(name, "", data).obj()
    _check_id(top, ("ExperimentList",), required=True)
    lists = {m: _opt(top, m, [], _Node.items) for m in MODELS}
    sizes = {m: len(v) for m, v in lists.items()}
    experiments = tuple(_experiment(e, sizes) for e in top.key("experiment").items())
    return ExperimentList(
        experiments=experiments, beams=tuple(_beam(b) for b in lists["beam"]),
        detectors=tuple(_detector(d) for d in lists["detector"]),
        **{f"{m}s": tuple(_raw(n, m) for n in lists[m]) for m in ("goniometer", "scan", "crystal", "imageset")})


def _no_constant(text: str):
    raise ValueError(f"{text} is not a finite number")


def read_expt(path: str | os.PathLike) -> ExperimentList:
    """Read a DIALS experiment list (``.expt``, JSON) without dxtbx.

    Returns:
        :class:`ExperimentList`: experiments with indices into the shared model lists; detectors (panels in their
        parent's frame, the hierarchy; ``Detector.lab_panels`` composes the lab frame, mm) and beams as dataclasses;
        goniometers, scans, crystals and imagesets as the file's JSON objects.

    Raises:
        ExptFileError (a ValueError): one line naming the file and the JSON path of the problem
        (``detector[0].panels[3].fast_axis: a zero-length vector``): not JSON, a missing key, a value of the wrong
        type or length, zero or non-orthogonal axes (|cos| > :data:`nbtorch.io.crystfel.ORTHOGONALITY_TOLERANCE`),
        a hierarchy naming a missing panel, a panel twice or leaving one out, an unknown ``__id__``, an experiment
        naming a model the file does not hold.  OSError if the file cannot be read.
    """
    return parse_expt(read_bytes(path), display_name(path))


# ----------------------------------------------------------------------------------------------------------------
# experiments as nbtorch models


def read_experiments(path: str | os.PathLike, image: int = 0, *, check_images: bool = False, dtype=None,
                     device=None) -> List[DialsExperiment]:
    """Read a DIALS experiment list as the models nbtorch simulates, one per experiment (docs/io.md).

    Args:
        path: the ``.expt`` file (relative image paths in it are resolved against its folder).
        image: K, the image of each experiment to model (0-based; 0 = the first): a scan's K-th image gives the
            rotation's φ range, an imageset's K-th file (and frame) the observed image.
        check_images: refuse a missing image file.
        dtype, device: of the parameter tensors (float64 by default).

    Returns:
        A list of :class:`~nbtorch.io.dials_experiments.DialsExperiment` ``(params, setup, images, identifier, …)``:
        the beam (wavelength Å, set-up beam = −``direction``, Kahn factor 2·``polarization_fraction`` − 1, E vector
        ⟂ ``polarization_normal`` and the beam), every panel with the hierarchy composed (each panel's sensor and
        untrusted rectangles), the crystal (``real_space_a/b/c`` in Å, the goniometer's S·F applied; crystal system
        from ``space_group_hall_symbol`` via gemmi; mosaic spread and domain size when given), a rotation's spindle
        (S·datum axis) and φ of image K, and the image source.  ``params`` is None for an experiment without a
        crystal.

    Raises:
        ExptFileError (a ValueError): one line naming the file and the JSON key (those of :func:`read_expt`, and: an
        experiment without a beam or detector, a malformed goniometer, scan or crystal, a singular or left-handed
        cell, a polarization normal along the beam, an image beyond the imageset or scan, a missing image file with
        ``check_images``).  ValueError for a negative ``image``; OSError if the file cannot be read.
    """
    expts = read_expt(path)
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    return experiment_models(expts, display_name(path), base, image, check_images, dtype, device)


def write_experiments(path: str | os.PathLike, source, experiments: Sequence[DialsExperiment] = ()) -> None:
    """Write an experiment list with refined models (docs/io.md), atomically (:func:`nbtorch.io.atomic_write`).

    Args:
        path: the output ``.expt``.
        source: the experiment list the models came from: its path, its bytes, or its JSON document (a dict).
        experiments: records of :func:`read_experiments` of that list with refined ``params`` (all or some; those
            whose ``params`` is None are skipped).

    The output keeps the input's structure (identifiers, imagesets, beams, goniometers, scans, every experiment
    and model, unknown keys) and replaces each given experiment's crystal ``real_space_a/b/c`` (Å, the goniometer's
    S·F undone), detector (every panel's and group's ``fast_axis``, ``slow_axis`` and ``origin`` in its parent's
    frame, the inverse of the reader's composition) and beam ``wavelength``.  Plain JSON, as DIALS writes it.

    Raises:
        ExptFileError for a malformed ``source``; ValueError when experiments sharing a model give it different
        values or a record does not belong to ``source``; OSError when writing fails (nothing is written).
    """
    if isinstance(source, dict):
        doc, name = source, "experiment list"
        expts = parse_expt(json.dumps(doc).encode("utf-8"), name)
    else:
        raw = source if isinstance(source, (bytes, bytearray)) else read_bytes(source)
        name = "experiment list" if isinstance(source, (bytes, bytearray)) else display_name(source)
        expts = parse_expt(bytes(raw), name)
        doc = json.loads(bytes(raw).decode("utf-8"))
    out = refined_document(doc, expts, experiments)
    atomic_write(path, (json.dumps(out, indent=2) + "\n").encode("utf-8"))
