"""NeXus/HDF5 NXmx files: a simulated image with its full geometry, readable by DIALS and other NXmx readers.

:func:`write_nxmx` writes one frame ``[1, slow, fast]`` with every field the NXmx application definition requires
(NeXus definitions 2024; the fields are listed in :data:`NXMX_REQUIRED`), the detector as one flat module whose
``depends_on`` chain places it exactly where :func:`nbtorch.detector.detector_frame` puts it, the sample rotation
axis, and the beam.  :func:`read_nxmx` (called by :func:`nbtorch.io.read_image` for NXmx files) reads it back.

Frames.  NeXus uses the McStas frame: z along the beam, y up, x = y × z.  nbtorch's lab frame is mapped onto it by
the rotation :func:`lab_to_nexus`: the beam (``Setup.beam``) goes to +z and the polarization (E) vector's part across
the beam to −x, so for nanoBragg's default MOSFLM frame (beam +x, E = spindle = +z) a lab vector (x, y, z) becomes
(−z, y, x) — nanoBragg's own DIALS-origin mapping followed by imgCIF → McStas — and the spindle becomes DIALS's +X.
The rotation is stored in ``/entry/nbtorch/lab_to_nexus`` so vectors can be taken back to the lab frame.  A panel
detector's lab frame (``Setup.panels``: CrystFEL's or DIALS's) has +y up, and keeps it: beam → +z, lab y (across
the beam) → +y, so CrystFEL's frame is McStas's unchanged and DIALS's turns by 180° about y; the polarization is
written with its own angle about the beam (``incident_polarization_stokes``).

Geometry as written: the chain is ``fast/slow_pixel_direction → module_offset → det_z``: ``det_z`` a translation
along the beam by the distance at which the direct beam meets the detector plane, ``module_offset`` from there to the
outer corner of pixel (0, 0) (nanoBragg's pix0, also dxtbx's panel origin), the pixel directions the rotated fast and
slow axes with the pixel size as value.  ``beam_center_x``/``_y`` are the direct-beam position in mm from the outer
corner of pixel (0, 0) along fast and slow (nanoBragg's Fbeam, Sbeam for the beam pivot).

Panel detectors (``Setup.panels``, images ``[P, S, F]``): one ``NXdetector_module`` per panel (``module_000`` …),
each with its own ``module_offset → det_z`` chain and pixel directions (the panel's steps: unit vector, length as
value), ``det_z`` the detector's distance (``Detector.distance``, the sample to the point the beam meets before any
two-theta).  The data array is ``[1, P·S, F]``, the panels stacked along slow (panel k's ``data_origin`` is
``(k·S, 0)``, ``data_size`` its own counts), as dxtbx reads multi-module files; padding of smaller panels has bit 0
(gap) of ``pixel_mask``.  Panel names and the hierarchy of rigid groups are kept in ``/entry/nbtorch``
(``panel_names``, ``panel_tree``).  :func:`read_nxmx` reads any multi-module file back as ``[P, S, F]`` (modules in
data order) and :func:`nxmx_layout` turns its geometry into a :class:`~nbtorch.panels.PanelLayout`.

h5py is an optional dependency (``pip install nbtorch[io]``), imported only when a function here is called.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import re
from typing import Mapping, NamedTuple, Optional

import numpy as np

from ..pixels import panel_extent_mask, rendered_mask
from ..units import ANGSTROM_PER_MM, DEG_PER_RAD, MM_PER_CM, MM_PER_M, MM_PER_NM, MM_PER_UM, deg2rad, um_to_mm
from ._atomic import atomic_write, check_finite
from ._parse import display_name
from .observed import observed_image
from .spectra import spectrum_mean

__all__ = [
    "NexusGeometry",
    "NexusModule",
    "NXMX_REQUIRED",
    "lab_to_nexus",
    "nxmx_geometry",
    "nxmx_layout",
    "write_nxmx",
    "read_nxmx",
    "is_nxmx",
    "hdf5_module",
    "hdf5_frame",
]

#: Paths (and ``path@attribute``) that the NXmx application definition requires, as :func:`write_nxmx` names the
#: groups; the tests check every one is present.
NXMX_REQUIRED = (
    "/entry@NX_class", "/entry/definition", "/entry/start_time", "/entry/end_time_estimated",
    "/entry/data@NX_class", "/entry/data/data",
    "/entry/sample@NX_class", "/entry/sample/name", "/entry/sample/depends_on",
    "/entry/instrument@NX_class", "/entry/instrument/name",
    "/entry/instrument/detector@NX_class", "/entry/instrument/detector/sensor_material",
    "/entry/instrument/detector/sensor_thickness", "/entry/instrument/detector/sensor_thickness@units",
    "/entry/instrument/detector/module@NX_class",
    "/entry/instrument/detector/module/data_origin", "/entry/instrument/detector/module/data_size",
    *(f"/entry/instrument/detector/module/{axis}{attr}"
      for axis in ("fast_pixel_direction", "slow_pixel_direction")
      for attr in ("", "@transformation_type", "@vector", "@offset", "@depends_on", "@units")),
    "/entry/instrument/beam@NX_class", "/entry/instrument/beam/incident_wavelength",
    "/entry/instrument/beam/incident_wavelength@units",
    "/entry/source@NX_class", "/entry/source/name",
)

#: NeXus unit strings accepted by the reader, as factors to mm (lengths) and to degrees (angles).
_MM_PER = {**dict.fromkeys(("m", "meter", "metre"), MM_PER_M), "cm": MM_PER_CM,
           **dict.fromkeys(("mm", "millimeter", "millimetre"), 1.0),
           **dict.fromkeys(("um", "µm", "μm", "micron", "micrometer", "micrometre"), MM_PER_UM), "nm": MM_PER_NM,
           **dict.fromkeys(("angstrom", "Angstrom", "A", "Å"), 1.0 / ANGSTROM_PER_MM)}
_DEG_PER = {**dict.fromkeys(("deg", "degree", "degrees"), 1.0),
            **dict.fromkeys(("rad", "radian", "radians"), DEG_PER_RAD)}
_DETECTOR = "/entry/instrument/detector"
_MODULE = _DETECTOR + "/module"


class NexusModule(NamedTuple):
    """One ``NXdetector_module`` (a panel) in the NeXus (McStas) frame, lengths in mm.

    Attributes:
        name: the panel's name (``/entry/nbtorch/panel_names`` where nbtorch wrote the file, else the group's name).
        fast_axis, slow_axis: [3] unit vectors along increasing fast and slow pixel index.
        origin_mm: [3] outer corner of the module's pixel (0, 0).
        pixel_size_mm: (fast, slow) pixel sizes: the pixel at (f, s) has its centre at
            origin + (f + ½)·pixel_f·fast + (s + ½)·pixel_s·slow.
        image_size: (fast, slow) pixel counts (``data_size`` reversed).
        data_origin: index of its first pixel in one frame of the data array (slow-major, as ``data_origin``).
    """

    name: str
    fast_axis: np.ndarray
    slow_axis: np.ndarray
    origin_mm: np.ndarray
    pixel_size_mm: tuple
    image_size: tuple
    data_origin: tuple


class NexusGeometry(NamedTuple):
    """Detector, beam and sample geometry of an NXmx image.  Vectors are in the NeXus (McStas) frame, lengths in mm.

    Attributes:
        fast_axis, slow_axis: [3] unit vectors along increasing fast and slow pixel index (the first module's).
        origin_mm: [3] outer corner of pixel (0, 0) (nanoBragg's pix0, dxtbx's panel origin; the first module's).
        pixel_size_mm: (fast, slow) pixel sizes (the first module's).
        image_size: (fast, slow) pixel counts (the first module's).
        distance_mm: distance from the sample to where the direct beam meets the detector plane; for several
            modules NXdetector ``distance`` (nbtorch writes ``Detector.distance``), else the mean of the module
            centres' z.
        beam_center_mm: (fast, slow) position of that point from the outer corner of pixel (0, 0); None for
            several modules.
        wavelength_A: incident wavelength (Å).
        beam: [3] beam direction (NXmx: always (0, 0, 1)).
        spindle: [3] sample rotation axis, or None when the sample has no rotation axis.
        phi_deg: rotation angle at the start of the frame (degrees), or None.
        osc_deg: oscillation range of the frame (degrees), 0 for a still.
        sensor_material: NXdetector sensor_material.   sensor_thickness_mm: its thickness (mm).
        saturation_value: NXdetector saturation_value or None.
        lab_to_nexus: [3, 3] rotation from nbtorch's lab frame (files written by nbtorch), else None;
            ``lab_to_nexus.T @ v`` takes a vector back to the lab frame.
        modules: every module (:class:`NexusModule`), in the order of the image's panels.
        panel_tree: ``{"root": name, "groups": {group: [members]}}``, the panel hierarchy nbtorch wrote, or None.
        spectrum: ``(wavelengths [m] Å, weights [m])`` of a beam of several wavelengths (NXbeam
            ``incident_wavelength`` with ``incident_wavelength_weights``; the first frame's where they vary per
            frame), else None; ``wavelength_A`` is then its weighted mean.  nbtorch writes the weights summing to 1.
    """

    fast_axis: np.ndarray
    slow_axis: np.ndarray
    origin_mm: np.ndarray
    pixel_size_mm: tuple
    image_size: tuple
    distance_mm: float
    beam_center_mm: tuple
    wavelength_A: float
    beam: np.ndarray
    spindle: Optional[np.ndarray]
    phi_deg: Optional[float]
    osc_deg: float
    sensor_material: str
    sensor_thickness_mm: float
    saturation_value: Optional[float]
    lab_to_nexus: Optional[np.ndarray]
    modules: tuple = ()
    panel_tree: Optional[dict] = None
    spectrum: Optional[tuple] = None


def _h5py():
    try:
        import h5py  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError("reading and writing NeXus files needs the optional 'h5py' package: pip install nbtorch[io]"
                          ) from exc
    try:
        import hdf5plugin  # noqa: F401, PLC0415 - registers the bitshuffle/LZ4 … filters of detector files with h5py
    except ImportError:
        pass  # compressed data then fails with a line naming hdf5plugin (hdf5_frame)
    return h5py


def hdf5_module():
    """h5py, with hdf5plugin's compression filters (bitshuffle/LZ4, Blosc …, as Eiger and Jungfrau files use)
    registered when hdf5plugin is installed.  ImportError naming ``pip install nbtorch[io]`` without h5py."""
    return _h5py()


def hdf5_frame(ds, frame: int, stacked: bool, name: str) -> np.ndarray:
    """Frame ``frame`` (0-based) of the HDF5 image dataset ``ds`` of the file ``name``: ``ds[frame]`` when the
    dataset has a leading frame axis (``stacked``: ``[N, S, F]``, ``[N, P, S, F]`` …), else the dataset itself (one
    frame).  ValueError naming the file, the dataset, the frame and how many frames the dataset holds when the frame
    is beyond it; a dataset h5py cannot decompress names hdf5plugin."""
    count = int(ds.shape[0]) if stacked and ds.ndim else 1
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < count:
        raise ValueError(f"{name}: no frame {frame} (0-based) in {ds.name}: it holds {count} frame"
                         f"{'s' if count != 1 else ''} (0 to {count - 1})")
    try:
        return np.asarray(ds[int(frame)] if stacked else ds[()])
    except OSError as exc:
        text = " ".join(str(exc).split())
        hint = ("; compressed data: install hdf5plugin (pip install hdf5plugin) for its filters (bitshuffle/LZ4 …)"
                if "filter" in text.lower() else "")
        raise ValueError(f"{name}: cannot read frame {frame} of {ds.name} ({text}){hint}") from None


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------------------------------
# geometry from (Params, Setup)


def lab_to_nexus(setup) -> np.ndarray:
    """Rotation ``[3, 3]`` taking nbtorch lab-frame vectors to the NeXus (McStas) frame (``v_nx = R @ v_lab``).

    nanoBragg's one panel — rows: x = −(E across the beam), y = z × x, z = beam, with E = ``setup.polar_axis`` (the
    spindle, then any perpendicular, when E is along the beam); MOSFLM frame: (x, y, z)_lab → (−z, y, x).  A panel
    detector (``setup.panels``; CrystFEL's or DIALS's lab frame, +y up) — rows: x = y × z, y = lab +y across the
    beam, z = beam: the identity for CrystFEL (beam +z), (x, y, z) → (−x, y, −z) for DIALS (beam −z).
    """
    z = _unit(setup.beam)
    if setup.panels is not None:
        y = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([0.0, 0.0, 1.0])
        y = _unit(y - (y @ z) * z)
        return np.stack([np.cross(y, z), y, z])
    for ref in (setup.polar_axis, setup.spindle, (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)):
        e = np.asarray(ref, dtype=np.float64)
        e = e - (e @ z) * z
        if np.linalg.norm(e) > 1e-9:
            break
    x = -_unit(e)
    return np.stack([x, np.cross(z, x), z])


def _beam_hit(pix0, f, s, beam):
    """(a, b, t): pix0 + a·f + b·s = t·beam, the direct beam's intersection with the detector plane."""
    A = np.stack([f, s, -beam], axis=1)
    if abs(np.linalg.det(A)) < 1e-12:
        raise ValueError("NXmx geometry: the beam is parallel to the detector plane")
    return np.linalg.solve(A, -pix0)


def _sensor_mm(setup, sensor_thickness_mm, saturation_value) -> float:
    """The sensor thickness (mm) to write: the argument, else a panel detector's own (one value for every panel),
    else ``setup.thickness_um``; ``ValueError`` for a bad thickness or saturation value."""
    if sensor_thickness_mm is not None:
        thick = float(sensor_thickness_mm)
    else:
        own = {p.thickness_um for p in setup.panels.panels} if setup.panels is not None else {None}
        if len(own) > 1:
            raise ValueError("NXmx output: the panels have different sensor thicknesses "
                             f"({', '.join(str(v) for v in sorted(own, key=str))} µm) but NXmx has one per "
                             "detector; give sensor_thickness_mm")
        value = own.pop()
        thick = um_to_mm(setup.thickness_um if value is None else value)
    if not (math.isfinite(thick) and thick >= 0):
        raise ValueError(f"NXmx output: sensor_thickness_mm must be finite and >= 0, got {sensor_thickness_mm!r}")
    if saturation_value is not None and not math.isfinite(float(saturation_value)):
        raise ValueError(f"NXmx output: saturation_value must be finite, got {saturation_value!r}")
    return thick


def _lab_detector(params, setup):
    """``params.detector`` as float64 CPU tensors without gradients."""
    import torch  # noqa: PLC0415 - keep the io package free of torch at import time

    from ..pytree import tree_map

    return tree_map(lambda t: torch.as_tensor(t).detach().to(torch.float64).cpu(), params.detector)


def _panel_modules(det, setup, R) -> tuple:
    """Every panel of ``setup.panels`` as a :class:`NexusModule` (NeXus frame) for the detector parameters
    ``det``, stacked along slow in the data array."""
    from ..panels import panel_lab_vectors

    layout = setup.panels
    corner, f, s = (t.numpy() for t in panel_lab_vectors(layout, det, setup.beam, setup.twotheta_axis))
    out = []
    for k, p in enumerate(layout.panels):
        pf, ps = float(np.linalg.norm(f[k])), float(np.linalg.norm(s[k]))
        out.append(NexusModule(p.name, R @ (f[k] / pf), R @ (s[k] / ps), R @ corner[k], (pf, ps),
                               (p.fpixels, p.spixels), (k * layout.spixels, 0)))
    return tuple(out)


def _one_module(det, setup, R):
    """(module, distance, beam centre) of nanoBragg's one flat panel."""
    from ..detector import detector_frame

    if setup.curved_det:
        raise ValueError("NXmx output: a curved detector (-curved_det) cannot be described as a flat NXmx module")
    frame = detector_frame(det, setup)
    pix0, f, s = (frame.pix0.numpy(), frame.fdet.numpy(), frame.sdet.numpy())
    a, b, t = _beam_hit(pix0, f, s, _unit(setup.beam))
    p = float(setup.pixel_size)
    module = NexusModule("module", R @ f, R @ s, R @ pix0, (p, p), (setup.fpixels, setup.spixels), (0, 0))
    return module, float(t), (float(a), float(b))


def _shift(params) -> float:
    """The beam's ``spectrum_shift`` (Å added to every source's wavelength)."""
    return float(params.beam.spectrum_shift)


def _source_spectrum(params, setup) -> Optional[tuple]:
    """``(wavelengths [m] Å: λ0·factor + spectrum_shift, weights [m])`` of the set-up's sources grouped by
    wavelength (weights summed over the directions and scaled to sum 1; channels in the order they first appear),
    or None when every source has one wavelength."""
    totals: dict = {}
    for (_, factor), w in zip(setup.sources, setup.normalised_source_weights):
        totals[factor] = totals.get(factor, 0.0) + w
    if len(totals) < 2:
        return None
    lam0, total, shift = float(params.beam.wavelength), math.fsum(totals.values()), _shift(params)
    return (np.array([lam0 * f + shift for f in totals], dtype=np.float64),
            np.array([w / total for w in totals.values()], dtype=np.float64))


def nxmx_geometry(params, setup, *, sensor_material: str = "Si", sensor_thickness_mm: Optional[float] = None,
                  saturation_value: Optional[float] = None) -> NexusGeometry:
    """The :class:`NexusGeometry` that :func:`write_nxmx` writes for ``(params, setup)`` (no file is touched).

    Cheap: call it before simulating to validate that the geometry can be written.  Uses ``params.detector``,
    ``params.beam.wavelength`` (float64, detached) and the detector/beam/spindle/phi fields of ``setup``; the sensor
    thickness defaults to ``setup.thickness_um`` (0 when nanoBragg models no sensor depth), or the panels' own.  A
    panel detector (``setup.panels``) gives one module per panel (``modules``; the top-level axes are the first
    panel's, ``distance_mm`` is ``Detector.distance``, ``beam_center_mm`` None) and its hierarchy (``panel_tree``).
    Sources of several wavelengths (a ``-spectrum``, ``-dispersion`` or a ``-sourcefile``'s) give ``spectrum``:
    each wavelength λ0·factor (+ ``beam.spectrum_shift``) with its sources' weights summed (``wavelength_A`` is
    λ0 + shift).

    Raises:
        ValueError: a curved detector (``-curved_det``: NXmx describes flat modules), a beam parallel to the detector,
            a negative sensor thickness, panels of different sensor thicknesses, or a non-finite saturation value.
    """
    det = _lab_detector(params, setup)
    R = lab_to_nexus(setup)
    thick = _sensor_mm(setup, sensor_thickness_mm, saturation_value)
    if setup.panels is None:
        module, distance, centre = _one_module(det, setup, R)
        modules, tree = (module,), None
    else:
        modules, distance, centre = _panel_modules(det, setup, R), float(det.distance), None
        tree = _panel_tree(setup.panels)
    m0 = modules[0]
    return NexusGeometry(
        fast_axis=m0.fast_axis, slow_axis=m0.slow_axis, origin_mm=m0.origin_mm, pixel_size_mm=m0.pixel_size_mm,
        image_size=m0.image_size, distance_mm=distance, beam_center_mm=centre,
        wavelength_A=float(params.beam.wavelength) + _shift(params), beam=R @ _unit(setup.beam),
        spindle=R @ _unit(setup.spindle),
        phi_deg=float(setup.phi0), osc_deg=float(setup.phistep * setup.phisteps), sensor_material=str(sensor_material),
        sensor_thickness_mm=thick, saturation_value=None if saturation_value is None else float(saturation_value),
        lab_to_nexus=R, modules=modules, panel_tree=tree, spectrum=_source_spectrum(params, setup),
    )


def _panel_tree(layout) -> dict:
    """``{"root": name, "groups": {group: [members]}}`` of a :class:`~nbtorch.panels.PanelLayout`'s hierarchy (the
    ``tree`` :func:`nbtorch.panels.make_layout` takes)."""
    groups = {layout.root: [n.name for n in layout.nodes if n.parent == -1]}
    for i, node in enumerate(layout.nodes):
        children = [n.name for n in layout.nodes if n.parent == i]
        if children:
            groups[node.name] = children
    return {"root": layout.root, "groups": groups}


# ---------------------------------------------------------------------------------------------------------------
# writing


def _group(parent, name: str, nx_class: str, **attrs):
    g = parent.create_group(name)
    g.attrs["NX_class"] = nx_class
    for k, v in attrs.items():
        g.attrs[k] = v
    return g


def _field(parent, name: str, value, units: Optional[str] = None, **attrs):
    ds = parent.create_dataset(name, data=value)
    if units is not None:
        ds.attrs["units"] = units
    for k, v in attrs.items():
        ds.attrs[k] = v
    return ds


def _axis(parent, name: str, value, units: str, kind: str, vector, depends_on: str):
    """An NXtransformations axis: value (1-element or scalar) with its type, unit vector, zero offset, dependency."""
    return _field(parent, name, value, units, transformation_type=kind, vector=np.asarray(vector, dtype=np.float64),
                  offset=np.zeros(3), offset_units="mm", depends_on=depends_on)


def _timestamp(when) -> str:
    if when is None:
        when = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    if isinstance(when, _dt.datetime):
        if when.tzinfo is not None:
            when = when.astimezone(_dt.timezone.utc).replace(tzinfo=None)
        return when.isoformat() + "Z"
    return str(when)


def _detector_fields(det, geo: NexusGeometry, pixel_mask, opts: dict) -> None:
    """The NXdetector's own fields (not its data, transformations or modules)."""
    _field(det, "description", "nbtorch simulated detector (nanoBragg physics)")
    _field(det, "distance", geo.distance_mm, "mm")
    _field(det, "distance_derived", True)
    if geo.beam_center_mm is not None:
        _field(det, "beam_center_x", geo.beam_center_mm[0], "mm")
        _field(det, "beam_center_y", geo.beam_center_mm[1], "mm")
        _field(det, "beam_center_derived", True)
    _field(det, "sensor_material", geo.sensor_material)
    _field(det, "sensor_thickness", geo.sensor_thickness_mm, "mm")
    _field(det, "type", "pixel")
    _field(det, "pixel_mask", pixel_mask)
    _field(det, "pixel_mask_applied", False)
    if geo.saturation_value is not None:
        _field(det, "saturation_value", geo.saturation_value)
    if opts["underload_value"] is not None:
        _field(det, "underload_value", opts["underload_value"])
    if opts["count_time_s"] is not None:
        _field(det, "count_time", float(opts["count_time_s"]), "s")


def _module_names(geo: NexusGeometry) -> list:
    """HDF5 group names of the modules: ``module`` for one, ``module_000`` … (sorting in panel order) for more."""
    n = len(geo.modules)
    if n == 1:
        return ["module"]
    width = max(3, len(str(n - 1)))
    return [f"module_{k:0{width}d}" for k in range(n)]


def _write_detector(inst, frame: np.ndarray, geo: NexusGeometry, pixel_mask, opts: dict):
    """The NXdetector: ``frame`` [slow, fast] of the data array (panels stacked along slow), stored as
    ``[1, slow, fast]``; ``det_z`` and one NXdetector_module per entry of ``geo.modules``."""
    det = _group(inst, "detector", "NXdetector")
    _field(det, "depends_on", _DETECTOR + "/transformations/det_z")
    _field(det, "data", frame[None], **({"compression": opts["compression"]} if opts["compression"] else {}))
    _detector_fields(det, geo, pixel_mask, opts)
    tr = _group(det, "transformations", "NXtransformations")
    _axis(tr, "det_z", [geo.distance_mm], "mm", "translation", (0.0, 0.0, 1.0), ".")
    for group, m in zip(_module_names(geo), geo.modules):
        offset = m.origin_mm - geo.distance_mm * np.array([0.0, 0.0, 1.0])
        length = float(np.linalg.norm(offset))
        mod = _group(det, group, "NXdetector_module")
        _field(mod, "data_origin", np.array(m.data_origin, dtype=np.int64))
        _field(mod, "data_size", np.array(m.image_size[::-1], dtype=np.int64))
        _field(mod, "data_stride", np.array([1, 1], dtype=np.int64))
        _axis(mod, "module_offset", length, "mm", "translation", offset / length if length > 0 else m.fast_axis,
              _DETECTOR + "/transformations/det_z")
        for name, vec, size in (("fast_pixel_direction", m.fast_axis, m.pixel_size_mm[0]),
                                ("slow_pixel_direction", m.slow_axis, m.pixel_size_mm[1])):
            _axis(mod, name, size, "mm", "translation", vec, f"{_DETECTOR}/{group}/module_offset")
    return det


def _stokes(setup, R, K: float) -> np.ndarray:
    """[1, 4] Stokes vector (I, Q, U, V) of a beam of Kahn factor ``K`` linearly polarized along ``setup.polar_axis``
    (Q along NeXus x; an E vector along the beam counts as along x)."""
    e = R @ np.asarray(setup.polar_axis, dtype=np.float64)
    r2 = e[0] * e[0] + e[1] * e[1]
    c, s = ((e[0] * e[0] - e[1] * e[1]) / r2, 2.0 * e[0] * e[1] / r2) if r2 > 1e-18 else (1.0, 0.0)
    return np.array([[1.0, K * c + 0.0, K * s + 0.0, 0.0]])


def _write_sample_and_beam(entry, inst, geo: NexusGeometry, params, setup, sample_name: str):
    sample = _group(entry, "sample", "NXsample")
    _field(sample, "name", sample_name)
    _field(sample, "depends_on", "/entry/sample/transformations/phi")
    tr = _group(sample, "transformations", "NXtransformations")
    _axis(tr, "phi", [geo.phi_deg], "deg", "rotation", geo.spindle, ".")
    if geo.osc_deg:
        _field(tr, "phi_end", [geo.phi_deg + geo.osc_deg], "deg")
        _field(tr, "phi_increment_set", geo.osc_deg, "deg")
    beam = _group(inst, "beam", "NXbeam", flux="flux_integrated")
    if geo.spectrum is None:
        _field(beam, "incident_wavelength", geo.wavelength_A, "angstrom")
    else:  # NXbeam's polychromatic beam: the wavelengths with their relative weights
        _field(beam, "incident_wavelength", geo.spectrum[0], "angstrom")
        _field(beam, "incident_wavelength_weights", geo.spectrum[1])
    _field(beam, "flux_integrated", float(params.beam.fluence), "1/m^2")
    K = float(params.beam.polarization)  # Kahn factor = degree of linear polarization along E
    _field(beam, "incident_polarization_stokes", _stokes(setup, geo.lab_to_nexus, K))
    _field(beam, "profile", "top-hat")
    sample["beam"] = beam  # the 2024 definition also looks for NXbeam under NXsample: same group, hard link


def write_nxmx(
    path: str | os.PathLike,
    image,
    params,
    setup,
    *,
    sensor_material: str = "Si",
    sensor_thickness_mm: Optional[float] = None,
    saturation_value: Optional[float] = None,
    underload_value: Optional[float] = None,
    count_time_s: Optional[float] = None,
    start_time=None,
    instrument_name: str = "nbtorch simulation",
    source_name: str = "nbtorch simulated source",
    sample_name: str = "simulated crystal",
    metadata: Optional[Mapping[str, str]] = None,
    compression: Optional[str] = None,
) -> None:
    """Write a simulated image and its geometry as an NXmx NeXus/HDF5 file (atomically).

    Args:
        path: destination (``.h5``/``.nxs``); written to memory, then by :func:`~nbtorch.io.atomic_write`.
        image: ``setup.image_shape`` array or tensor (photons/pixel) in its own dtype (float32/float64/integers):
            [slow, fast], stored as ``[1, slow, fast]``; for a panel detector [P, S, F], stored as
            ``[1, P·S, F]`` with one NXdetector_module per panel.
        params, setup: the simulation's :class:`~nbtorch.types.Params` and :class:`~nbtorch.types.Setup`.
        sensor_material: NXdetector sensor_material (DIALS knows "Si", "CdTe", "GaAs").
        sensor_thickness_mm: sensor thickness (mm); default ``setup.thickness_um`` converted (0 = no depth model),
            or the panels' own.
        saturation_value: detector saturation level (written only when given; readers mask pixels at or above it).
        underload_value: lowest valid value (written only when given).
        count_time_s: exposure time (s), written only when given.
        start_time: ``datetime`` or ISO-8601 text (default: now, UTC); also used as ``end_time_estimated``.
        instrument_name, source_name, sample_name: the names NXmx requires.
        metadata: extra text fields for ``/entry/nbtorch`` (for example the command line).
        compression: h5py compression of the image (``"gzip"``), default none.

    Pixels outside ``setup.roi`` or masked by ``setup.mask`` get bit 8 (user mask) in ``pixel_mask``, a smaller
    panel's padding bit 0 (gap).  Only the central beam direction is written (NXmx has no place for nanoBragg's
    source lists); sources of several wavelengths are written as NXbeam's spectrum (``incident_wavelength`` [m]
    with ``incident_wavelength_weights`` [m], summing to 1; :func:`nxmx_geometry`), which DIALS reads as its
    weighted mean wavelength.

    Raises:
        ValueError: image shape differs from ``setup.image_shape``; geometry that NXmx cannot express
            (:func:`nxmx_geometry`).  ImportError: h5py is not installed.
    """
    h5py = _h5py()
    arr = _image_array(image, setup, f"write_nxmx {display_name(path)}")
    geo = nxmx_geometry(params, setup, sensor_material=sensor_material, sensor_thickness_mm=sensor_thickness_mm,
                        saturation_value=saturation_value)
    stamp = _timestamp(start_time)
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs.update({"NX_class": "NXroot", "default": "entry", "file_name": os.path.basename(os.fspath(path)),
                        "file_time": stamp, "creator": "nbtorch"})
        entry = _group(f, "entry", "NXentry", default="data", version="1.0")
        _field(entry, "definition", "NXmx")
        _field(entry, "start_time", stamp)
        _field(entry, "end_time_estimated", stamp)
        inst = _group(entry, "instrument", "NXinstrument")
        _field(inst, "name", instrument_name, short_name="nbtorch")
        _write_nbtorch_group(entry, geo, setup, params, metadata)
        det = _write_detector(inst, arr.reshape(-1, arr.shape[-1]), geo, _pixel_mask(setup),
                              {"compression": compression, "underload_value": underload_value,
                               "count_time_s": count_time_s})
        grp = _group(inst, "detector_group", "NXdetector_group")
        _field(grp, "group_names", ["detector"])
        _field(grp, "group_index", np.array([1], dtype=np.int64))
        _field(grp, "group_parent", np.array([-1], dtype=np.int64))
        _write_sample_and_beam(entry, inst, geo, params, setup, sample_name)
        data = _group(entry, "data", "NXdata", signal="data")
        data["data"] = det["data"]
        source = _group(entry, "source", "NXsource")
        _field(source, "name", source_name, short_name="nbtorch")
        _field(source, "probe", "x-ray")
        inst["source"] = source
    atomic_write(path, buf.getvalue())


def _image_array(image, setup, where: str) -> np.ndarray:
    """``image`` (array or tensor) as a numpy array of ``setup.image_shape`` with finite values, else ``ValueError``
    starting with ``where``."""
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.shape != tuple(setup.image_shape):
        what = "(panels, spixels, fpixels)" if setup.panels is not None else "(spixels, fpixels)"
        raise ValueError(f"{where}: image shape {arr.shape} is not {what} = {tuple(setup.image_shape)}")
    check_finite(arr, where)
    return arr


def _pixel_mask(setup) -> np.ndarray:
    """uint32 [slow, fast] of the data array (panels stacked along slow): bit 8 (user mask) outside ``setup.roi``
    and where ``setup.mask`` is 0, bit 0 (gap) on the padding of a panel smaller than the largest."""
    pm = np.where(rendered_mask(setup), 0, 1 << 8).astype(np.uint32)
    if setup.panels is not None:
        pm[~panel_extent_mask(setup)] = 1
    return pm.reshape(-1, setup.fpixels)


def _write_nbtorch_group(entry, geo: NexusGeometry, setup, params, metadata) -> None:
    """``/entry/nbtorch`` (NXcollection): the lab-frame rotation and the nbtorch values the NXmx fields came from;
    for a panel detector the panel names and hierarchy (``panel_names``, ``panel_tree`` as JSON)."""
    col = _group(entry, "nbtorch", "NXcollection")
    _field(col, "lab_to_nexus", geo.lab_to_nexus)
    _field(col, "convention", setup.convention)
    _field(col, "pivot", setup.pivot)
    _field(col, "detector_distance", float(params.detector.distance), "mm")
    _field(col, "beam_center", np.asarray(params.detector.beam_center.detach().cpu(), dtype=np.float64), "mm")
    _field(col, "polarization_axis", np.asarray(setup.polar_axis, dtype=np.float64))
    if geo.panel_tree is not None:
        _field(col, "panel_names", [m.name for m in geo.modules])
        _field(col, "panel_tree", json.dumps(geo.panel_tree))
    for key, value in (metadata or {}).items():
        _field(col, str(key), str(value))


# ---------------------------------------------------------------------------------------------------------------
# reading


def is_nxmx(path: str | os.PathLike) -> bool:
    """True if ``path`` is an HDF5 file with an NXentry whose ``definition`` is NXmx (needs h5py)."""
    h5py = _h5py()
    if not h5py.is_hdf5(os.fspath(path)):
        return False
    with h5py.File(os.fspath(path), "r") as f:
        return _nxmx_entry(f) is not None


def _text(value) -> str:
    value = value[()] if hasattr(value, "shape") else value
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _nx_children(group, nx_class: str) -> list:
    return [v for v in group.values() if hasattr(v, "attrs") and _text(v.attrs.get("NX_class", "")) == nx_class]


def _nxmx_entry(f):
    for entry in _nx_children(f, "NXentry"):
        if "definition" in entry and _text(entry["definition"]) == "NXmx":
            return entry
    return None


def _one(group, nx_class: str, name: str, where: str):
    found = _nx_children(group, nx_class)
    if not found:
        raise ValueError(f"{name}: NXmx file has no {nx_class} in {where}")
    return found[0]


def _scaled(ds, table: dict, name: str):
    """Dataset values (float64 array) converted with ``table`` from the dataset's ``units`` attribute."""
    units = ds.attrs.get("units")
    factor = table.get(_text(units).strip()) if units is not None else None
    if factor is None:
        raise ValueError(f"{name}: {ds.name} has units {None if units is None else _text(units)!r}, "
                         f"expected one of {sorted(table)}")
    return np.asarray(ds[()], dtype=np.float64) * factor


def _axis_matrix(ds, name: str) -> np.ndarray:
    """4×4 affine matrix of one NXtransformations axis (first value of a scan), lengths in mm."""
    kind = _text(ds.attrs.get("transformation_type", ""))
    vec = np.asarray(ds.attrs.get("vector", (0.0, 0.0, 0.0)), dtype=np.float64).reshape(3)
    A = np.eye(4)
    if kind == "rotation":
        angle = deg2rad(float(np.atleast_1d(_scaled(ds, _DEG_PER, name))[0]))
        k = _unit(vec)
        K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        A[:3, :3] = np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K
    elif kind == "translation":
        A[:3, 3] = float(np.atleast_1d(_scaled(ds, _MM_PER, name))[0]) * vec
    if "offset" in ds.attrs:
        units = _text(ds.attrs.get("offset_units", ds.attrs.get("units", "mm"))).strip()
        A[:3, 3] += np.asarray(ds.attrs["offset"], dtype=np.float64).reshape(3) * _MM_PER.get(units, 1.0)
    return A


def _chain(ds, name: str) -> list:
    """The datasets of a depends_on chain starting at ``ds`` (``ds`` first)."""
    out = []
    while ds is not None:
        if len(out) > 64:
            raise ValueError(f"{name}: depends_on chain through {ds.name} does not end")
        out.append(ds)
        dep = _text(ds.attrs.get("depends_on", "."))
        if dep in (".", ""):
            break
        nxt = ds.file.get(dep) if dep.startswith("/") else ds.parent.get(dep)
        if nxt is None:
            raise ValueError(f"{name}: {ds.name} depends_on {dep!r}, which is not in the file")
        ds = nxt
    return out


def _chain_matrix(chain, name: str) -> np.ndarray:
    total = np.eye(4)
    for ds in chain:
        total = _axis_matrix(ds, name) @ total
    return total


def _direction(module, key: str, name: str):
    """A module's ``fast/slow_pixel_direction`` dataset and its unit ``vector``; ``ValueError`` naming what is
    missing or zero."""
    if key not in module:
        raise ValueError(f"{name}: NXdetector_module {module.name} has no {key}")
    ds = module[key]
    vec = np.asarray(ds.attrs.get("vector", (0.0, 0.0, 0.0)), dtype=np.float64).reshape(-1)
    if vec.shape != (3,) or not np.all(np.isfinite(vec)) or np.linalg.norm(vec) == 0:
        raise ValueError(f"{name}: {ds.name} needs a non-zero 3-component vector attribute, got {vec.tolist()}")
    return ds, _unit(vec)


def _module_geometry(module, name: str):
    """(fast, slow, origin, (pixel_f, pixel_s)) of a detector module from its depends_on chains (as dxtbx)."""
    (fast, f_unit), (slow, s_unit) = (_direction(module, k, name) for k in ("fast_pixel_direction",
                                                                          "slow_pixel_direction"))
    dep = _text(fast.attrs.get("depends_on", "."))
    chain = _chain(fast, name)[1:] if dep not in (".", "") else []
    A = _chain_matrix(chain, name)
    pix = (float(np.atleast_1d(_scaled(fast, _MM_PER, name))[0]), float(np.atleast_1d(_scaled(slow, _MM_PER, name))[0]))
    return A[:3, :3] @ f_unit, A[:3, :3] @ s_unit, A[:3, 3], pix


def _sample_axis(entry, name: str, frame: int = 0):
    """(spindle, phi_deg, osc_deg) of frame ``frame`` (0-based; the last value where the axis has fewer) from the
    sample's first rotation axis, or (None, None, 0.0)."""
    samples = _nx_children(entry, "NXsample")
    if not samples or "depends_on" not in samples[0]:
        return None, None, 0.0
    dep = _text(samples[0]["depends_on"])
    if dep in (".", ""):
        return None, None, 0.0
    start = entry.file[dep] if dep.startswith("/") else samples[0][dep]
    for ds in _chain(start, name):
        if _text(ds.attrs.get("transformation_type", "")) == "rotation":
            values = np.atleast_1d(_scaled(ds, _DEG_PER, name)).reshape(-1)
            k = min(frame, len(values) - 1)
            osc = 0.0
            if ds.name + "_end" in ds.file:
                ends = np.atleast_1d(_scaled(ds.file[ds.name + "_end"], _DEG_PER, name)).reshape(-1)
                osc = float(ends[min(k, len(ends) - 1)] - values[k])
            elif len(values) > 1:
                osc = float(values[k + 1] - values[k]) if k + 1 < len(values) else float(values[k] - values[k - 1])
            return _unit(ds.attrs["vector"]), float(values[k]), osc
    return None, None, 0.0


def _module_block(module, frame_shape, one: bool, name: str):
    """(data_origin, data_size) of a module as tuples of the data frame's rank; a lone module without them spans
    the frame.  ``ValueError`` for a block of the wrong rank, size or place."""
    if one and "data_origin" not in module and "data_size" not in module:
        return (0,) * len(frame_shape), tuple(frame_shape)
    for key in ("data_origin", "data_size"):
        if key not in module:
            raise ValueError(f"{name}: NXdetector_module {module.name} has no {key}")
    origin, size = (tuple(int(v) for v in np.asarray(module[k][()]).reshape(-1)) for k in ("data_origin",
                                                                                          "data_size"))
    where = f"{name}: NXdetector_module {module.name}"
    if len(origin) != len(frame_shape) or len(size) != len(frame_shape):
        raise ValueError(f"{where}: data_origin {list(origin)} and data_size {list(size)} must have "
                         f"{len(frame_shape)} values for image frames of shape {list(frame_shape)}")
    if any(n < 1 for n in size) or any(o < 0 or o + n > m for o, n, m in zip(origin, size, frame_shape)):
        raise ValueError(f"{where}: data_origin {list(origin)} + data_size {list(size)} lies outside the image "
                         f"frames of shape {list(frame_shape)}")
    if len(size) == 3 and size[0] != 1:
        raise ValueError(f"{where}: data_size {list(size)} spans {size[0]} slabs of the module axis; a module is one")
    return origin, size


def _module_blocks(modules, frame_shape, name: str):
    """``[(module, origin, size)]`` in data order; ``ValueError`` naming two modules that share pixels."""
    blocks = sorted(((m, *_module_block(m, frame_shape, len(modules) == 1, name)) for m in modules),
                    key=lambda b: b[1])
    taken = np.zeros(frame_shape, dtype=bool)
    for k, (m, origin, size) in enumerate(blocks):
        region = taken[tuple(slice(o, o + n) for o, n in zip(origin, size))]
        if region.any():
            other = next(b[0].name for b in blocks[:k] if all(
                o < bo + bn and bo < o + n for o, n, bo, bn in zip(origin, size, b[1], b[2])))
            raise ValueError(f"{name}: NXdetector_modules {other} and {m.name} cover the same pixels of the image data")
        region[...] = True
    return blocks


def _stack(frame: np.ndarray, blocks) -> np.ndarray:
    """One module's block [slow, fast] (one module) or every module's, padded with zeros to [P, S, F]."""
    views = [frame[tuple(slice(o, o + n) for o, n in zip(origin, size))].reshape(size[-2:])
             for _, origin, size in blocks]
    if len(views) == 1:
        return views[0]
    out = np.zeros((len(views), max(v.shape[0] for v in views), max(v.shape[1] for v in views)), dtype=frame.dtype)
    for k, v in enumerate(views):
        out[k, :v.shape[0], :v.shape[1]] = v
    return out


def _nbtorch_panels(entry, n: int, name: str):
    """(panel names or None, panel tree or None) that nbtorch keeps in ``/entry/nbtorch`` for ``n`` modules."""
    col = entry.get("nbtorch")
    if col is None or "panel_names" not in col:
        return None, None
    names = [_text(v) for v in np.asarray(col["panel_names"][()]).reshape(-1)]
    if len(names) != n:
        return None, None
    try:
        tree = json.loads(_text(col["panel_tree"])) if "panel_tree" in col else None
    except ValueError:
        raise ValueError(f"{name}: /entry/nbtorch/panel_tree is not JSON") from None
    return names, tree


def _read_modules(entry, blocks, name: str) -> tuple:
    """Every module of ``blocks`` as a :class:`NexusModule` (names from ``/entry/nbtorch`` where nbtorch kept
    them) and the panel tree."""
    names, tree = _nbtorch_panels(entry, len(blocks), name)
    out = []
    for k, (module, origin, size) in enumerate(blocks):
        f_vec, s_vec, o, pix = _module_geometry(module, name)
        label = names[k] if names else module.name.rsplit("/", 1)[-1]
        out.append(NexusModule(label, f_vec, s_vec, o, pix, (size[-1], size[-2]), origin))
    return tuple(out), tree


def _module_centre(m: NexusModule) -> np.ndarray:
    """[3] centre of a module (mm, NeXus frame)."""
    return m.origin_mm + 0.5 * (m.image_size[0] * m.pixel_size_mm[0] * m.fast_axis
                                + m.image_size[1] * m.pixel_size_mm[1] * m.slow_axis)


def _beam_wavelength(beam, name: str, frame: int = 0) -> tuple:
    """(wavelength Å, spectrum or None) of an NXbeam for frame ``frame``: ``incident_wavelength`` alone is one
    wavelength, or one per frame; with ``incident_wavelength_weights`` ([m], or [frames, m]) the wavelengths [m] (or
    [frames, m]) are a spectrum (the frame's) and the wavelength its weighted mean.  A value per frame with fewer
    frames than ``frame``: the last one."""
    lam = np.asarray(_scaled(beam["incident_wavelength"], _MM_PER, name), dtype=np.float64) * ANGSTROM_PER_MM
    if "incident_wavelength_weights" not in beam:
        values = np.atleast_1d(lam).reshape(-1)
        return float(values[min(frame, len(values) - 1)]), None
    w = np.asarray(beam["incident_wavelength_weights"][()], dtype=np.float64)
    lam, w = (np.atleast_1d(a[min(frame, len(a) - 1)] if a.ndim == 2 else a) for a in (lam, w))
    if lam.ndim != 1 or lam.shape != w.shape:
        raise ValueError(f"{name}: NXbeam incident_wavelength has shape {list(lam.shape)} but "
                         f"incident_wavelength_weights {list(w.shape)}: expected one weight per wavelength")
    if not (np.isfinite(lam).all() and (lam > 0).all() and np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError(f"{name}: NXbeam spectrum: wavelengths must be finite and > 0, weights finite, >= 0 and not "
                         "all 0")
    return spectrum_mean(lam, w), (lam, w)


def _read_geometry(entry, det, blocks, name: str, frame: int = 0) -> NexusGeometry:
    modules, tree = _read_modules(entry, blocks, name)
    m0 = modules[0]
    inst = det.parent
    beams = _nx_children(inst, "NXbeam")
    beams += [b for s in _nx_children(entry, "NXsample") for b in _nx_children(s, "NXbeam")]
    if not beams:
        raise ValueError(f"{name}: NXmx file has no NXbeam")
    wl, spectrum = _beam_wavelength(beams[0], name, frame)
    beam = np.array([0.0, 0.0, 1.0])
    if len(modules) == 1:
        a, b, t = _beam_hit(m0.origin_mm, m0.fast_axis, m0.slow_axis, beam)
        distance, centre = float(t), (float(a), float(b))
    elif "distance" in det:
        distance, centre = float(np.atleast_1d(_scaled(det["distance"], _MM_PER, name))[0]), None
    else:
        distance, centre = float(np.mean([_module_centre(m)[2] for m in modules])), None
    spindle, phi, osc = _sample_axis(entry, name, frame)
    sat = float(det["saturation_value"][()]) if "saturation_value" in det else None
    material = _text(det["sensor_material"]) if "sensor_material" in det else ""
    thick = float(np.atleast_1d(_scaled(det["sensor_thickness"], _MM_PER, name))[0]) if "sensor_thickness" in det \
        else 0.0
    R = np.asarray(entry["nbtorch/lab_to_nexus"][()], dtype=np.float64) if "nbtorch/lab_to_nexus" in entry else None
    return NexusGeometry(m0.fast_axis, m0.slow_axis, m0.origin_mm, m0.pixel_size_mm, m0.image_size, distance, centre,
                         wl, beam, spindle, phi, osc, material, thick, sat, R, modules, tree, spectrum)


#: The image datasets of an Eiger master file's NXdata: ``data_000001``, ``data_000002`` … (external links, each a
#: block of frames).
_DATA_BLOCK = re.compile(r"data_\d+\Z")


def _linked(group, key: str, name: str):
    """``group[key]``; ValueError naming the file and the link when it leads nowhere (a missing data file)."""
    try:
        return group[key]
    except (KeyError, OSError) as exc:
        raise ValueError(f"{name}: {group.name}/{key} cannot be opened (a missing or unreadable linked data file: "
                         f"{' '.join(str(exc).split())})") from None


def _image_datasets(entry, det, name: str) -> list:
    """The image datasets in frame order: NXdata's signal (default ``data``), else its ``data_000001``,
    ``data_000002`` … blocks (Eiger master files), else NXdetector ``data``."""
    datas = _nx_children(entry, "NXdata")
    if datas:
        signal = datas[0].attrs.get("signal")
        key = _text(signal) if signal is not None else "data"
        if key in datas[0]:
            return [_linked(datas[0], key, name)]
        blocks = sorted(k for k in datas[0].keys() if _DATA_BLOCK.match(k))
        if blocks:
            return [_linked(datas[0], k, name) for k in blocks]
    if "data" in det:
        return [_linked(det, "data", name)]
    raise ValueError(f"{name}: NXmx file has no image data (NXdata or NXdetector/data)")


def _read_frame(entry, det, rank: int, name: str, frame: int = 0) -> np.ndarray:
    """Frame ``frame`` (0-based) of the image data (rank ``rank``: the modules' data_origin length), counted
    through the data blocks in order; ValueError naming the file, the frame and how many frames it holds."""
    datasets = _image_datasets(entry, det, name)
    for ds in datasets:
        if ds.ndim not in (rank, rank + 1):
            axes = "[frames, slow, fast] or [slow, fast]" if rank == 2 else "[frames, modules, slow, fast]"
            raise ValueError(f"{name}: image data {ds.name} has shape {list(ds.shape)}; expected {axes}")
    counts = [int(ds.shape[0]) if ds.ndim == rank + 1 else 1 for ds in datasets]
    total = sum(counts)
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < total:
        raise ValueError(f"{name}: no frame {frame} (0-based): the file holds {total} frame"
                         f"{'s' if total != 1 else ''} (0 to {total - 1})")
    for ds, count in zip(datasets, counts):
        if frame < count:
            return hdf5_frame(ds, frame, ds.ndim == rank + 1, name)
        frame -= count
    raise AssertionError("unreachable: the frame is within the total")


def _frame_rank(modules, name: str) -> int:
    """Rank of one frame of the data: the length of the modules' data_origin (2 without one); ``ValueError`` where
    the modules disagree."""
    ranks = {int(np.asarray(m["data_origin"][()]).size) for m in modules if "data_origin" in m} or {2}
    if len(ranks) > 1:
        raise ValueError(f"{name}: the NXdetector_modules' data_origin have different lengths {sorted(ranks)}")
    return ranks.pop()


def _observed(data: np.ndarray, header: dict, overload, geo: NexusGeometry, pm, blocks, name: str):
    """The :class:`~nbtorch.io.images.ObservedImage` of ``data`` ([S, F] or [P, S, F]) with the pixel mask ``pm``
    (one frame of the file's, or None) and a smaller module's padding applied."""
    F = data.shape[-1]
    obs = observed_image(data.reshape(-1, F), header, overload, geo.pixel_size_mm[0], geo.distance_mm,
                         geo.wavelength_A, geo.beam_center_mm)
    obs = obs._replace(data=obs.data.reshape(data.shape), mask=obs.mask.reshape(data.shape),
                       saturated=obs.saturated.reshape(data.shape), size=(F, data.shape[-2]))
    if data.ndim == 3:
        extent = np.zeros(data.shape, dtype=bool)
        for k, (_, _, size) in enumerate(blocks):
            extent[k, :size[-2], :size[-1]] = True
        obs = obs._replace(mask=obs.mask & extent)
    if pm is not None:
        ints = pm if pm.dtype.kind in "iu" else pm.astype(np.int64)
        obs = obs._replace(mask=obs.mask & _stack((ints & 0xFFFF) == 0, blocks))
    return obs._replace(geometry=geo)


def read_nxmx(path: str | os.PathLike, overload: Optional[float] = None, frame: int = 0):
    """Read frame ``frame`` (0-based; default the first) of an NXmx file as an
    :class:`~nbtorch.io.images.ObservedImage` with its geometry (the frame's wavelength and rotation angle where the
    file gives one per frame).  The frames are counted through NXdata's ``data``, or an Eiger master file's
    ``data_000001``, ``data_000002`` … blocks in order.

    One module: ``data`` [slow, fast].  Several modules (a panel detector): ``data`` [P, S, F], the modules in the
    order of their ``data_origin`` in the data array (2-D frames, panels side by side, or 3-D frames with a module
    axis), a smaller module zero-padded (and masked) to the largest; ``geometry.modules`` has every module and
    :func:`nxmx_layout` turns the geometry into a :class:`~nbtorch.panels.PanelLayout`.

    The geometry (``ObservedImage.geometry``, a :class:`NexusGeometry`) follows the modules' ``depends_on`` chains as
    dxtbx does: the fast axis's own offset is ignored, the beam is along +z.  ``pixel_size_mm`` is the (first)
    module's fast pixel size, ``distance_mm``/``beam_center_mm`` where the beam meets the detector (mm; (fast, slow)
    from the outer corner of pixel (0, 0); None for several modules), ``wavelength_A`` from NXbeam (a spectrum's
    weighted mean; ``geometry.spectrum`` has its wavelengths and weights).  Masking: as
    :func:`~nbtorch.io.read_image`, plus pixels with any of the low 16 bits of ``pixel_mask`` set; the default
    overload is ``saturation_value``.

    Raises:
        ValueError: not an NXmx file, no detector module, modules without their pixel directions, data blocks
            outside the data or sharing pixels, missing data/beam, unknown or missing units, a frame beyond the
            file's (naming how many it holds), a linked data file missing (one line naming the file).
        ImportError: h5py is not installed.
    """
    h5py = _h5py()
    name = display_name(path)
    with open(path, "rb"):
        pass  # a plain OSError naming the file when it cannot be read
    if not h5py.is_hdf5(os.fspath(path)):
        raise ValueError(f"{name}: not an NXmx file (not HDF5)")
    with h5py.File(os.fspath(path), "r") as f:
        entry = _nxmx_entry(f)
        if entry is None:
            raise ValueError(f"{name}: not an NXmx file (no NXentry with definition 'NXmx')")
        det = _one(_one(entry, "NXinstrument", name, "the entry"), "NXdetector", name, "the instrument")
        modules = _nx_children(det, "NXdetector_module")
        if not modules:
            raise ValueError(f"{name}: the NXdetector {det.name} has no NXdetector_module")
        pixels = _read_frame(entry, det, _frame_rank(modules, name), name, frame)
        blocks = _module_blocks(modules, pixels.shape, name)
        geo = _read_geometry(entry, det, blocks, name, frame)
        pm = np.asarray(det["pixel_mask"][()]) if "pixel_mask" in det else None
        header = {"definition": "NXmx", "instrument": _text(det.parent["name"]) if "name" in det.parent else "",
                  "sensor_material": geo.sensor_material}
    if pm is not None and pm.shape[1:] == pixels.shape:  # a mask per frame, or one for all
        pm = pm[frame] if frame < pm.shape[0] else pm[0]
    if pm is not None and pm.shape != pixels.shape:
        raise ValueError(f"{name}: pixel_mask has shape {list(pm.shape)} but the image frames {list(pixels.shape)}")
    return _observed(_stack(pixels, blocks), header, geo.saturation_value if overload is None else overload, geo, pm,
                     blocks, name)


def nxmx_layout(geometry: NexusGeometry):
    """The :class:`~nbtorch.panels.PanelLayout` of an NXmx file's modules (``ObservedImage.geometry`` of
    :func:`read_nxmx`) in nbtorch's lab frame where the file keeps ``lab_to_nexus`` (files nbtorch wrote), else in
    the NeXus frame (beam +z, y up: CrystFEL's frame).  Panel (f, s)'s centre is at corner + (f + ½)·fast +
    (s + ½)·slow (mm); the hierarchy is the one nbtorch kept (``panel_tree``), else every panel under one root
    ``detector``.  ``ValueError`` when the kept hierarchy does not fit the panels."""
    from ..panels import PanelSpec, make_layout

    R = geometry.lab_to_nexus if geometry.lab_to_nexus is not None else np.eye(3)
    panels = []
    for m in geometry.modules:
        lab = [R.T @ v for v in (m.origin_mm, m.fast_axis * m.pixel_size_mm[0], m.slow_axis * m.pixel_size_mm[1])]
        panels.append(PanelSpec(m.name, *(tuple(float(x) for x in v) for v in lab), int(m.image_size[0]),
                                int(m.image_size[1])))
    tree = geometry.panel_tree
    if tree is None:
        names = [p.name for p in panels]
        root = "detector" if "detector" not in names else "detector_root"
        tree = {"root": root, "groups": {root: names}}
    return make_layout(panels, tree["groups"], tree["root"], tuple(float(x) for x in R.T @ np.array([0.0, 0.0, 1.0])))
