"""DIALS experiment lists as nbtorch models, and refined models written back (docs/io.md "DIALS experiment lists").

The public entry points are :func:`nbtorch.io.dials.read_experiments` and :func:`nbtorch.io.dials.write_experiments`;
this module holds what they build on: the goniometer, scan, imageset and crystal readers, the model of one
experiment (:func:`experiment_models`) and the document a refined model is written into (:func:`refined_document`).

Goniometers (dxtbx's model): a crystal's lab orientation at rotation angle φ is ``S·R(axis, φ)·F·A`` with ``A`` the
file's crystal, ``axis`` the datum rotation axis, ``F`` the fixed and ``S`` the setting rotation (both row-major 3 × 3
in the file, identity when absent).  A multi-axis goniometer gives ``axes`` (crystal to base: phi, kappa, omega),
``angles`` (degrees) and ``scan_axis`` k instead: F is the product of the rotations of the axes below k (the
innermost applied first), S that of the axes above it, and the datum axis is ``axes[k]``.  nbtorch rotates the
crystal about ``Setup.spindle`` = S·axis, so the model's crystal (at φ = 0) is S·F·A, and ``R(S·axis, φ)·S·F·A =
S·R(axis, φ)·F·A``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ..detector import with_panels
from ..lattice import cell_from_real, lattice, orientation_from_reciprocal
from ..panels import PanelLayout, layout_from_dials, panel_lab_vectors
from ..simulate import crystal_rotation
from ..types import Background, Beam, Crystal, Detector, Params, Setup, Structure
from ..units import DEFAULT_FLUENCE
from ._parse import display_name
from .dials_json import ExptFileError, Node, optional

__all__ = ["ImageSource", "CrystalModel", "RotationModel", "DialsExperiment", "experiment_models", "experiment_of",
           "refined_document", "CELL_SYSTEMS"]

Vec = Tuple[float, float, float]
Mat = Tuple[Vec, Vec, Vec]
_IDENTITY: Mat = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
#: The crystal systems a cell is constrained to (refine's ``crystal_system`` values).
CELL_SYSTEMS = ("cubic", "hexagonal", "tetragonal", "orthorhombic", "monoclinic", "triclinic")
#: The spindle of an experiment without a goniometer: +x (DIALS's usual rotation axis).
DEFAULT_SPINDLE: Vec = (1.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """The observed image of an experiment.

    ``kind``: the imageset's ``__id__``; ``path``: its file (a relative path in the file is resolved against the
    ``.expt`` file's folder); ``frame``: the 0-based frame within a multi-frame file (``single_file_indices``, or an
    HDF5/NeXus sequence's image number − 1), None for one image per file; ``index``: K, the image's 0-based position
    in the experiment's images; ``count``: how many images the experiment has; ``key``: the JSON path naming the
    file (for messages)."""

    kind: str
    path: str
    frame: Optional[int]
    index: int
    count: int
    key: str


@dataclasses.dataclass(frozen=True)
class CrystalModel:
    """A crystal as the file gives it.

    ``real_space``: rows a, b, c (Å) as given (the goniometer's datum frame); ``lab_real_space``: rows a, b, c in
    the lab at φ = 0 (S·F applied, the same as ``real_space`` for a still); ``space_group``: gemmi's extended
    Hermann–Mauguin symbol of ``space_group_hall_symbol`` ('' without one); ``crystal_system``: gemmi's name
    (triclinic … cubic, with trigonal; '' without a space group); ``cell_system``: the system that constrains the
    cell in refinement (one of :data:`CELL_SYSTEMS`: trigonal groups on hexagonal axes → hexagonal; monoclinic
    groups whose unique axis is not b and rhombohedral axes → triclinic, no constraint); ``mosaic_spread_deg``:
    ``ML_half_mosaicity_deg`` (a half-width, as nbtorch's spread is the cap's radius) or ``mosaicity`` (degrees),
    None when absent; ``domain_size_ang``: ``ML_domain_size_ang`` (Å) or None."""

    real_space: Mat
    lab_real_space: Mat
    space_group: str = ""
    crystal_system: str = ""
    cell_system: str = "triclinic"
    mosaic_spread_deg: Optional[float] = None
    domain_size_ang: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class RotationModel:
    """A rotation experiment's goniometer and scan for the chosen image: ``spindle`` the lab rotation axis (unit,
    S·datum axis); ``fixed_rotation`` F and ``setting_rotation`` S (rows); ``phi_start``, ``phi_width`` the
    image's oscillation (degrees; width 0 without a scan); ``image_range`` the scan's first and last image numbers
    (1-based, None without a scan)."""

    spindle: Vec
    fixed_rotation: Mat = _IDENTITY
    setting_rotation: Mat = _IDENTITY
    phi_start: float = 0.0
    phi_width: float = 0.0
    image_range: Optional[Tuple[int, int]] = None


class DialsExperiment(NamedTuple):
    """One experiment of an ``.expt`` file as nbtorch simulates it (:func:`nbtorch.io.dials.read_experiments`).

    ``params``: :class:`~nbtorch.types.Params` (crystal from ``real_space_a/b/c``, exact lattice; wavelength, Kahn
    factor, default fluence; the panel detector as the file places it; no structure factors: ``default_F`` 0 and an
    empty table) or None when the experiment has no crystal; ``setup``: :class:`~nbtorch.types.Setup` (the panels
    with their sensors and untrusted rectangles as ``mask``, the beam −``direction``, E vector ⟂
    ``polarization_normal`` and the beam, one source; spindle and φ of the chosen image: ``phi0`` its start,
    ``phistep`` its width and ``phisteps`` 1 — give ``phisteps`` = n and ``phistep`` = width/n to sample the
    oscillation; one mosaic domain); ``images``: :class:`ImageSource` or None (no imageset, or one held in memory);
    ``identifier``; ``index``: the experiment's position in the list; ``models``: its indices into the file's model
    lists (``beam``, ``detector``, … ; experiments that share a model have the same index, and share the same
    layout object); ``beam``: the file's beam (:class:`nbtorch.io.dials.Beam`: divergence, flux …, not simulated);
    ``crystal``: :class:`CrystalModel` or None; ``rotation``: :class:`RotationModel` or None for a still."""

    params: Optional[Params]
    setup: Setup
    images: Optional[ImageSource]
    identifier: str
    index: int
    models: object
    beam: object
    crystal: Optional[CrystalModel] = None
    rotation: Optional[RotationModel] = None


# ----------------------------------------------------------------------------------------------------------------
# small linear algebra on tuples


def _unit(v) -> Vec:
    n = math.sqrt(sum(float(c) * float(c) for c in v))
    return tuple(float(c) / n for c in v)


def _rotation_matrix(axis: Vec, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by ``angle_deg`` about the unit ``axis`` (Rodrigues), [3, 3]."""
    u = np.asarray(axis, dtype=float)
    t = math.radians(angle_deg)
    K = np.array([[0.0, -u[2], u[1]], [u[2], 0.0, -u[0]], [-u[1], u[0], 0.0]])
    return np.eye(3) + math.sin(t) * K + (1.0 - math.cos(t)) * (K @ K)


def _mat(m: np.ndarray) -> Mat:
    return tuple(tuple(float(x) for x in row) for row in m)


# ----------------------------------------------------------------------------------------------------------------
# goniometer and scan


def _matrix(node: Node) -> np.ndarray:
    """A row-major 3 × 3 matrix of 9 numbers that must be a rotation (orthonormal within 1e-6, det +1)."""
    m = np.array(node.vector(9)).reshape(3, 3)
    if not (np.abs(m @ m.T - np.eye(3)).max() < 1e-6 and np.linalg.det(m) > 0):
        raise node.error("expected a rotation matrix (9 numbers, row-major, orthonormal with determinant +1)")
    return m


def goniometer_frame(node: Node) -> Tuple[Vec, np.ndarray, np.ndarray]:
    """(datum axis (unit), F, S) of a goniometer's JSON: a single axis (``rotation_axis``, ``fixed_rotation``,
    ``setting_rotation``) or a multi-axis goniometer (``axes``, ``angles``, ``scan_axis``; see the module
    docstring).  ExptFileError naming the key for a missing or malformed value."""
    node.obj()
    if all(k in node.value for k in ("axes", "angles", "scan_axis")):
        axes = [_unit(a.vector(nonzero=True)) for a in node.key("axes").items()]
        if not axes:
            raise node.key("axes").error("a multi-axis goniometer needs at least one axis")
        angles = [a.number() for a in node.key("angles").items(len(axes))]
        scan = node.key("scan_axis")
        k = scan.integer(low=0)
        if k >= len(axes):
            raise scan.error(f"no axis {k} (the goniometer has {len(axes)})")
        F, S = np.eye(3), np.eye(3)
        for i, (axis, angle) in enumerate(zip(axes, angles)):
            if i < k:
                F = _rotation_matrix(axis, angle) @ F
            elif i > k:
                S = _rotation_matrix(axis, angle) @ S
        return axes[k], F, S
    axis = _unit(node.key("rotation_axis").vector(nonzero=True))
    F = optional(node, "fixed_rotation", np.eye(3), _matrix)
    S = optional(node, "setting_rotation", np.eye(3), _matrix)
    return axis, F, S


def _image_range(scan: Node) -> Tuple[int, int]:
    rng = scan.key("image_range")
    first, last = (n.integer() for n in rng.items(2))
    if last < first:
        raise rng.error(f"the last image ({last}) comes before the first ({first})")
    return first, last


def _no_image(node: Node, index: int, count: int, what: str) -> ExptFileError:
    """The error for image ``index`` beyond a ``what`` (scan, imageset) of ``count`` images, naming the key."""
    return node.error(f"no image {index} (0-based): the {what} has {count} image{'s' if count != 1 else ''}")


def scan_oscillation(scan: Node, index: int) -> Tuple[float, float]:
    """(start, width) in degrees of image ``index`` (0-based) of a scan's JSON: ``properties.oscillation`` (one
    start angle per image; the width from ``properties.oscillation_width`` or the step between the first two
    images) or the older ``oscillation`` [start, width]; (0, 0) for a scan without oscillation (a still)."""
    first, last = _image_range(scan)
    count = last - first + 1
    if not 0 <= index < count:
        raise _no_image(scan.key("image_range"), index, count, "scan")
    props = scan.key("properties", None)
    if props is not None and "oscillation" in props.obj().value:
        osc = props.key("oscillation").items(count)
        widths = props.key("oscillation_width", None)
        if widths is not None:
            width = widths.items(count)[index].number()
        elif count > 1:
            width = osc[1].number() - osc[0].number()
        else:
            raise ExptFileError(f"{props.name}: {props.path}.oscillation_width: missing (a scan of one image needs "
                                "its width)")
        return osc[index].number(), width
    legacy = scan.key("oscillation", None)
    if legacy is None:
        return 0.0, 0.0
    start, width = legacy.vector(2)
    return start + index * width, width


def rotation_model(gonio: Optional[Node], scan: Optional[Node], index: int) -> Optional[RotationModel]:
    """The :class:`RotationModel` of an experiment's goniometer and scan JSON for image ``index``, or None
    without a goniometer (a still)."""
    if gonio is None:
        return None
    axis, F, S = goniometer_frame(gonio)
    start, width, rng = 0.0, 0.0, None
    if scan is not None:
        rng = _image_range(scan)
        start, width = scan_oscillation(scan, index)
    return RotationModel(_unit(S @ np.asarray(axis)), _mat(F), _mat(S), start, width, rng)


# ----------------------------------------------------------------------------------------------------------------
# imagesets


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _template_path(template: Node, number: int) -> Tuple[str, Optional[int]]:
    """A sequence's file for image ``number``: the template with its run of ``#`` replaced by the zero-padded
    number, or (for a template without ``#``: one HDF5/NeXus file) the template and frame ``number − 1``."""
    text = template.string()
    start = text.rfind("#")
    if start < 0:
        return text, number - 1
    width = 1
    while start - width >= 0 and text[start - width] == "#":
        width += 1
    begin = start - width + 1
    return f"{text[:begin]}{number:0{width}d}{text[start + 1:]}", None


def image_source(imageset: Node, scan: Optional[Node], index: int, base_dir: str,
                 check: bool = False) -> Optional[ImageSource]:
    """The :class:`ImageSource` of image ``index`` (0-based) of an imageset's JSON (``ImageSet``/``ImageGrid``:
    ``images`` and optional ``single_file_indices``; ``ImageSequence``/``ImageSweep``: ``template`` numbered by the
    experiment's scan), None for an in-memory imageset.  ``check``: the file must exist.  ExptFileError naming the
    key for a missing key, an image beyond the imageset or (``check``) a missing file."""
    kind = imageset.key("__id__").string()
    if kind == "MemImageSet":
        return None
    if kind in ("ImageSequence", "ImageSweep"):
        template = imageset.key("template")
        if scan is None:
            raise imageset.error(f"an {kind} needs the experiment's scan (its image numbers)")
        first, last = _image_range(scan)
        count, key = last - first + 1, template
        if not 0 <= index < count:
            raise _no_image(scan.key("image_range"), index, count, "scan")
        path, frame = _template_path(template, first + index)
    else:
        images = imageset.key("images").items()
        count = len(images)
        if not 0 <= index < count:
            raise _no_image(imageset.key("images"), index, count, "imageset")
        key = images[index]
        path = key.string()
        frames = imageset.key("single_file_indices", None)
        frame = frames.items(count)[index].integer(low=0) if frames is not None else None
    path = _resolve(path, base_dir)
    if check and not os.path.exists(path):
        raise key.error(f"image file {path!r} not found")
    return ImageSource(kind, path, frame, index, count, key.path)


# ----------------------------------------------------------------------------------------------------------------
# crystals


def crystal_systems(hall: Node) -> Tuple[str, str, str]:
    """(space group, crystal system, cell system) of a ``space_group_hall_symbol`` via gemmi (see
    :class:`CrystalModel`); a setting gemmi does not tabulate gives ('', '', 'triclinic')."""
    import gemmi  # optional dependency, only for crystals with a space group

    try:
        ops = gemmi.symops_from_hall(hall.string())
    except (RuntimeError, ValueError) as exc:
        raise hall.error(f"not a Hall symbol gemmi reads: {exc}") from None
    sg = gemmi.find_spacegroup_by_ops(ops)
    if sg is None:
        return "", "", "triclinic"
    system = sg.crystal_system_str()
    cell = system
    if system == "trigonal":
        cell = "triclinic" if sg.ext == "R" else "hexagonal"
    elif system == "monoclinic" and not sg.qualifier.startswith("b"):
        cell = "triclinic"
    return sg.xhm(), system, cell


def _basis(crystal: Node) -> np.ndarray:
    """Rows a, b, c (Å) of ``real_space_a/b/c``; ExptFileError for a singular or left-handed basis."""
    M = np.array([crystal.key(k).vector() for k in ("real_space_a", "real_space_b", "real_space_c")])
    det = float(np.linalg.det(M))
    if not abs(det) > 1e-9 * float(np.prod(np.linalg.norm(M, axis=1))):
        raise crystal.error("real_space_a, b, c are coplanar (a singular cell)")
    if det < 0:
        raise crystal.error("real_space_a, b, c are left-handed (a · b × c < 0)")
    return M


def crystal_model(crystal: Node, rotation: Optional[RotationModel]) -> CrystalModel:
    """The :class:`CrystalModel` of a crystal's JSON (its lab basis through the goniometer's S·F when given)."""
    M = _basis(crystal.obj())
    SF = np.eye(3) if rotation is None else np.array(rotation.setting_rotation) @ np.array(rotation.fixed_rotation)
    hall = crystal.key("space_group_hall_symbol", None)
    sg, system, cell = crystal_systems(hall) if hall is not None else ("", "", "triclinic")
    spread = optional(crystal, "ML_half_mosaicity_deg", None, lambda n: n.number(low=0.0))
    if spread is None:
        spread = optional(crystal, "mosaicity", None, lambda n: n.number(low=0.0))
    size = optional(crystal, "ML_domain_size_ang", None, lambda n: n.number(low=0.0, strict=True))
    return CrystalModel(_mat(M), _mat((SF @ M.T).T), sg, system, cell, spread, size)


# ----------------------------------------------------------------------------------------------------------------
# one experiment's model


def _polar_axis(beam, name: str, index: int) -> Vec:
    """E vector: unit(s0 × polarization_normal), s0 = −direction; ExptFileError when the normal is along the beam."""
    s0 = np.array([-c for c in beam.direction])
    n = np.asarray(beam.polarization_normal, dtype=float)
    e = np.cross(s0, n)
    if not np.linalg.norm(e) > 1e-6 * max(float(np.linalg.norm(n)), 1e-300):
        raise ExptFileError(f"{name}: beam[{index}].polarization_normal: along the beam (the plane of polarization is "
                            "undefined)")
    return _unit(e)


def panel_mask(detector, layout: PanelLayout) -> Optional[bytes]:
    """``Setup.mask`` bytes [P, S, F] (1 = render) of the panels' untrusted rectangles (half-open [x0, x1) ×
    [y0, y1), fast × slow), or None when there are none."""
    if not any(p.mask for p in detector.panels):
        return None
    out = np.ones((layout.n_panels, layout.spixels, layout.fpixels), dtype=np.uint8)
    for k, p in enumerate(detector.panels):
        for x0, y0, x1, y1 in p.mask:
            out[k, max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 0
    return out.tobytes()


def _crystal_params(crystal: CrystalModel, T) -> Crystal:
    """The exact lattice of ``crystal.lab_real_space``; cells per axis ``domain_size/|a|`` (at least 1) when the
    file gives a domain size, else 1; mosaic spread from the file or 0."""
    M = torch.tensor(crystal.lab_real_space, dtype=torch.float64).T  # columns a, b, c
    B = torch.linalg.inv(M).T
    lengths = torch.linalg.vector_norm(M, dim=0)
    N = torch.ones(3, dtype=torch.float64) if crystal.domain_size_ang is None else \
        torch.clamp(crystal.domain_size_ang / lengths, min=1.0)
    return Crystal(T(cell_from_real(M)), T(torch.zeros(3)), T(orientation_from_reciprocal(B)), T(N),
                   T(crystal.mosaic_spread_deg or 0.0))


def _model(layout: PanelLayout, beam, polar: Vec, crystal: Optional[CrystalModel], rotation: Optional[RotationModel],
           mask: Optional[bytes], dtype, device) -> Tuple[Optional[Params], Setup]:
    """(params, setup) of one experiment (see :class:`DialsExperiment`)."""
    def T(v):
        return torch.as_tensor(v, dtype=dtype, device=device)

    s0 = tuple(-c + 0.0 for c in beam.direction)
    rot = rotation or RotationModel(DEFAULT_SPINDLE)
    setup = Setup(beam=s0, polar_axis=polar, spindle=rot.spindle, phi0=rot.phi_start, phistep=rot.phi_width,
                  sources=((s0, 1.0),), nanobragg_cell=False)
    xtal = Crystal(T([1.0, 1.0, 1.0, 90.0, 90.0, 90.0]), T(torch.zeros(3)), T(torch.eye(3)), T(torch.ones(3)),
                   T(0.0)) if crystal is None else _crystal_params(crystal, T)
    zeros = T(torch.zeros(0, 3))
    params = Params(xtal, Beam(T(beam.wavelength), T(DEFAULT_FLUENCE), T(beam.kahn_factor), T(0.0)),
                    Detector(T(0.0), T(torch.zeros(2)), T(torch.zeros(3)), T(0.0), zeros, zeros),
                    Structure(T(np.zeros((0, 0, 0))), T(0.0)), Background(T(0.0)))
    params, setup = with_panels(params, setup, layout)
    return (None if crystal is None else params), setup.replace(mask=mask)


def _needed(expts, k: int, name: str) -> None:
    for what in ("beam", "detector"):
        if getattr(expts.experiments[k], what) is None:
            raise ExptFileError(f"{name}: experiment[{k}].{what}: missing (nbtorch needs a beam and a detector)")


def experiment_models(expts, name: str, base_dir: str, image: int = 0, check_images: bool = False,
                      dtype=None, device=None, only: Optional[int] = None) -> List[DialsExperiment]:
    """Every experiment of ``expts`` (an :class:`nbtorch.io.dials.ExperimentList` read from the file ``name`` in
    ``base_dir``) as a :class:`DialsExperiment` for image ``image`` (0-based) of each; with ``only`` = K experiment
    K alone (a list of one; the others are not modelled, nor their images checked).  Experiments that share a
    detector and a beam share one layout object.  ExptFileError naming the file and key."""
    dtype = torch.float64 if dtype is None else dtype
    if isinstance(image, bool) or not isinstance(image, int) or image < 0:
        raise ValueError(f"image must be an integer >= 0 (0 = the first image), got {image!r}")
    layouts: Dict[Tuple[int, int], Tuple[PanelLayout, Optional[bytes]]] = {}
    out = []
    for k, exp in enumerate(expts.experiments):
        if only is not None and k != only:
            continue
        _needed(expts, k, name)
        key = (exp.detector, exp.beam)
        if key not in layouts:
            layout = layout_from_dials(expts.detectors[exp.detector], expts.beams[exp.beam].direction)
            layouts[key] = layout, panel_mask(expts.detectors[exp.detector], layout)
        layout, mask = layouts[key]
        raw = {m: None if getattr(exp, m) is None else
               Node(name, f"{m}[{getattr(exp, m)}]", dict(getattr(expts, f"{m}s")[getattr(exp, m)]))
               for m in ("goniometer", "scan", "crystal", "imageset")}
        rotation = rotation_model(raw["goniometer"], raw["scan"], image)
        crystal = None if raw["crystal"] is None else crystal_model(raw["crystal"], rotation)
        images = None if raw["imageset"] is None else image_source(raw["imageset"], raw["scan"], image, base_dir,
                                                                   check_images)
        beam = expts.beams[exp.beam]
        try:
            params, setup = _model(layout, beam, _polar_axis(beam, name, exp.beam), crystal, rotation, mask, dtype,
                                   device)
        except ExptFileError:
            raise
        except ValueError as exc:  # a model the file describes that nbtorch cannot simulate
            raise ExptFileError(f"{name}: experiment[{k}]: {exc}") from None
        out.append(DialsExperiment(params, setup, images, exp.identifier, k, exp, beam, crystal, rotation))
    return out


def experiment_of(expts, path, index: int, image: int = 0, check_images: bool = False, dtype=None,
                  device=None) -> DialsExperiment:
    """Experiment ``index`` (0-based) of the list ``expts`` read from the file ``path``
    (:func:`nbtorch.io.dials.read_expt`) as a :class:`DialsExperiment` for its image ``image`` (relative image paths
    resolved against the file's folder); the other experiments are not modelled.  ValueError naming the file and
    the range for an index outside the list; ExptFileError (see :func:`nbtorch.io.dials.read_experiments`)."""
    name, count = display_name(path), len(expts.experiments)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"{name}: no experiment {index!r} (0-based): the file holds {count} experiment"
                         f"{'s' if count != 1 else ''} (0 to {count - 1})")
    base = os.path.dirname(os.path.abspath(os.fspath(path)))
    return experiment_models(expts, name, base, image, check_images, dtype, device, only=index)[0]


# ----------------------------------------------------------------------------------------------------------------
# writing refined models back


def _rigid(nominal, moved) -> Tuple[np.ndarray, np.ndarray]:
    """(R, t) of the rigid motion taking a panel's nominal (corner, fast, slow) to ``moved``: R = [f' s' n'][f s n]⁻¹
    with n = f × s, t = corner' − R·corner."""
    (c0, f0, s0), (c1, f1, s1) = nominal, moved
    A = np.stack([f0, s0, np.cross(f0, s0)], 1)
    Bm = np.stack([f1, s1, np.cross(f1, s1)], 1)
    R = Bm @ np.linalg.inv(A)
    return R, c1 - R @ c0


def _panel_vectors(layout: PanelLayout, det: Detector, setup: Setup, above: Optional[int]):
    """Every panel's lab (corner, fast step, slow step) as numpy [P, 3] with the motions of the nodes deeper than
    level ``above`` left out (None: every motion)."""
    with torch.no_grad():
        d = Detector(*(torch.as_tensor(t).detach().double().cpu() for t in det))
        if above is not None:
            keep = torch.tensor([n.level <= above for n in layout.nodes], dtype=torch.float64)[:, None]
            d = d._replace(group_shift=d.group_shift * keep, group_rotation=d.group_rotation * keep)
        return tuple(v.numpy() for v in panel_lab_vectors(layout, d, setup.beam, setup.twotheta_axis))


def _under(group) -> List[int]:
    out = []
    for c in group.children:
        out.extend([c] if isinstance(c, int) else _under(c))
    return out


def moved_frames(detector, layout: PanelLayout, det: Detector, setup: Setup):
    """The lab frames of a detector's groups and panels moved by the detector parameters ``det``: ``(panels,
    groups)`` as :attr:`nbtorch.io.dials.Detector.lab_frames` gives them (unit axes, origin mm).  A group moves with
    its own and its ancestors' rigid motions and the whole detector's; a panel with its own too."""
    nominal = [(np.array(p.corner), np.array(p.fast), np.array(p.slow)) for p in layout.panels]
    corner, f, s = _panel_vectors(layout, det, setup, None)
    panels = [(_unit(f[i]), _unit(s[i]), tuple(float(x) for x in corner[i])) for i in range(layout.n_panels)]
    cache: Dict[int, tuple] = {}
    groups = []
    for group, level, (gf, gs, go) in detector.lab_frames[1]:
        if level not in cache:
            cache[level] = _panel_vectors(layout, det, setup, level)
        c, ff, ss = cache[level]
        p = _under(group)[0]
        R, t = _rigid(nominal[p], (c[p], ff[p], ss[p]))
        groups.append((group, level, (_unit(R @ np.array(gf)), _unit(R @ np.array(gs)),
                                      tuple(float(x) for x in R @ np.array(go) + t))))
    return panels, groups


def _local(parent, frame) -> Dict[str, list]:
    """A child's lab ``frame`` (fast, slow, origin) in its parent's lab frame (unit fast and slow, origin):
    the inverse of the reader's composition."""
    pf, ps, po = (np.asarray(v, dtype=float) for v in parent)
    P = np.stack([pf, ps, np.cross(pf, ps)], 1)
    f, s, o = (np.asarray(v, dtype=float) for v in frame)
    inv = np.linalg.inv(P)
    return {"fast_axis": [float(x) for x in inv @ f], "slow_axis": [float(x) for x in inv @ s],
            "origin": [float(x) for x in inv @ (o - po)]}


def _detector_json(doc: dict, detector, layout: PanelLayout, det: Detector, setup: Setup) -> None:
    """Write the moved frames into a detector's JSON ``doc`` in the hierarchy's local frames (in place)."""
    panels, groups = moved_frames(detector, layout, det, setup)
    lab = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 0.0))
    if detector.hierarchy is None:
        for i, frame in enumerate(panels):
            doc["panels"][i].update(_local(lab, frame))
        return
    frames = iter(groups)

    def visit(node: dict, parent) -> None:
        _, _, frame = next(frames)
        node.update(_local(parent, frame))
        for child in node["children"]:
            if "panel" in child:
                doc["panels"][child["panel"]].update(_local(frame, panels[child["panel"]]))
            else:
                visit(child, frame)

    visit(doc["hierarchy"], lab)


def _crystal_json(doc: dict, rec: DialsExperiment) -> None:
    """Write the refined crystal's ``real_space_a/b/c`` (the goniometer's S·F undone) into its JSON (in place)."""
    c = rec.params.crystal
    with torch.no_grad():
        M, _ = lattice(c.cell.detach().double().cpu(), crystal_rotation(Crystal(
            *(t.detach().double().cpu() for t in c))), nanobragg=rec.setup.nanobragg_cell)
    lab = M.numpy().T  # rows a, b, c
    if rec.rotation is not None:
        SF = np.array(rec.rotation.setting_rotation) @ np.array(rec.rotation.fixed_rotation)
        lab = np.linalg.solve(SF, lab.T).T
    for key, row in zip(("real_space_a", "real_space_b", "real_space_c"), lab):
        doc[key] = [float(x) for x in row]


def _agree(done: Dict[Tuple[str, int], Tuple[int, dict]], model: str, index: int, k: int, new: dict) -> bool:
    """Whether model ``index`` was already written by another experiment (True: skip); ValueError when the values
    differ (experiments sharing a model must agree)."""
    if (model, index) not in done:
        done[(model, index)] = (k, new)
        return False
    first, old = done[(model, index)]
    a, b = np.array(_flat(old)), np.array(_flat(new))
    if a.shape != b.shape or np.abs(a - b).max(initial=0.0) > 1e-9 * max(np.abs(a).max(initial=0.0), 1.0):
        raise ValueError(f"write_experiments: experiments {first} and {k} share {model} {index} but their refined "
                         f"{model}s differ: refine a shared model jointly or give one of them")
    return True


def _flat(value) -> List[float]:
    if isinstance(value, dict):
        return [x for key in sorted(value) for x in _flat(value[key])]
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def refined_document(doc: dict, expts, experiments: Sequence[DialsExperiment]) -> dict:
    """A copy of the experiment list's JSON ``doc`` (read as ``expts``) with the refined crystal (real_space_a/b/c),
    detector (panel and group frames in the hierarchy's local frames) and beam (wavelength) of every experiment in
    ``experiments`` that has ``params`` (records of :func:`experiment_models`, their params refined); everything else
    kept.  ValueError when two experiments that share a model give it different values, or a record does not
    belong to this list."""
    out = copy.deepcopy(doc)
    done: Dict[Tuple[str, int], Tuple[int, dict]] = {}
    for rec in experiments:
        if rec.params is None:
            continue
        if not 0 <= rec.index < len(expts.experiments) or expts.experiments[rec.index] != rec.models:
            raise ValueError(f"write_experiments: experiment {rec.index} does not match the experiment list written")
        exp = expts.experiments[rec.index]
        detector = expts.detectors[exp.detector]
        if rec.setup.panels is None or rec.setup.panels.n_panels != len(detector.panels):
            raise ValueError(f"write_experiments: experiment {rec.index}: its set-up's panels are not detector "
                             f"{exp.detector}'s")
        new_det = copy.deepcopy(doc["detector"][exp.detector])
        _detector_json(new_det, detector, rec.setup.panels, rec.params.detector, rec.setup)
        if not _agree(done, "detector", exp.detector, rec.index, new_det):
            out["detector"][exp.detector] = new_det
        new_beam = dict(doc["beam"][exp.beam], wavelength=float(rec.params.beam.wavelength))
        if not _agree(done, "beam", exp.beam, rec.index, new_beam):
            out["beam"][exp.beam] = new_beam
        if exp.crystal is not None:
            new_xtal = copy.deepcopy(doc["crystal"][exp.crystal])
            _crystal_json(new_xtal, rec)
            if not _agree(done, "crystal", exp.crystal, rec.index, new_xtal):
                out["crystal"][exp.crystal] = new_xtal
    return out
