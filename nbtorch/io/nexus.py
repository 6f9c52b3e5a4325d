"""NeXus/HDF5 NXmx files: a simulated image with its full geometry, readable by DIALS and other NXmx readers.

:func:`write_nxmx` writes one frame ``[1, slow, fast]`` with every field the NXmx application definition requires
(NeXus definitions 2024; the fields are listed in :data:`NXMX_REQUIRED`), the detector as one flat module whose
``depends_on`` chain places it exactly where :func:`nbtorch.detector.detector_frame` puts it, the sample rotation
axis, and the beam.  :func:`read_nxmx` (called by :func:`nbtorch.io.read_image` for NXmx files) reads it back.

Frames.  NeXus uses the McStas frame: z along the beam, y up, x = y × z.  nbtorch's lab frame is mapped onto it by
the rotation :func:`lab_to_nexus`: the beam (``Setup.beam``) goes to +z and the polarization (E) vector's part across
the beam to −x, so for nanoBragg's default MOSFLM frame (beam +x, E = spindle = +z) a lab vector (x, y, z) becomes
(−z, y, x) — nanoBragg's own DIALS-origin mapping followed by imgCIF → McStas — and the spindle becomes DIALS's +X.
The rotation is stored in ``/entry/nbtorch/lab_to_nexus`` so vectors can be taken back to the lab frame.

Geometry as written: the chain is ``fast/slow_pixel_direction → module_offset → det_z``: ``det_z`` a translation
along the beam by the distance at which the direct beam meets the detector plane, ``module_offset`` from there to the
outer corner of pixel (0, 0) (nanoBragg's pix0, also dxtbx's panel origin), the pixel directions the rotated fast and
slow axes with the pixel size as value.  ``beam_center_x``/``_y`` are the direct-beam position in mm from the outer
corner of pixel (0, 0) along fast and slow (nanoBragg's Fbeam, Sbeam for the beam pivot).

h5py is an optional dependency (``pip install nbtorch[io]``), imported only when a function here is called.
"""
from __future__ import annotations

import datetime as _dt
import io
import math
import os
from typing import Mapping, NamedTuple, Optional

import numpy as np

from ..pixels import rendered_mask
from ..units import ANGSTROM_PER_MM, DEG_PER_RAD, MM_PER_CM, MM_PER_M, MM_PER_NM, MM_PER_UM, deg2rad, um_to_mm
from ._atomic import atomic_write, check_finite
from ._parse import display_name
from .observed import observed_image

__all__ = [
    "NexusGeometry",
    "NXMX_REQUIRED",
    "lab_to_nexus",
    "nxmx_geometry",
    "write_nxmx",
    "read_nxmx",
    "is_nxmx",
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


class NexusGeometry(NamedTuple):
    """Detector, beam and sample geometry of an NXmx image.  Vectors are in the NeXus (McStas) frame, lengths in mm.

    Attributes:
        fast_axis, slow_axis: [3] unit vectors along increasing fast and slow pixel index.
        origin_mm: [3] outer corner of pixel (0, 0) (nanoBragg's pix0, dxtbx's panel origin).
        pixel_size_mm: (fast, slow) pixel sizes.
        image_size: (fast, slow) pixel counts.
        distance_mm: distance from the sample to where the direct beam meets the detector plane.
        beam_center_mm: (fast, slow) position of that point from the outer corner of pixel (0, 0).
        wavelength_A: incident wavelength (Å).
        beam: [3] beam direction (NXmx: always (0, 0, 1)).
        spindle: [3] sample rotation axis, or None when the sample has no rotation axis.
        phi_deg: rotation angle at the start of the frame (degrees), or None.
        osc_deg: oscillation range of the frame (degrees), 0 for a still.
        sensor_material: NXdetector sensor_material.   sensor_thickness_mm: its thickness (mm).
        saturation_value: NXdetector saturation_value or None.
        lab_to_nexus: [3, 3] rotation from nbtorch's lab frame (files written by nbtorch), else None;
            ``lab_to_nexus.T @ v`` takes a vector back to the lab frame.
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


def _h5py():
    try:
        import h5py  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise ImportError("reading and writing NeXus files needs the optional 'h5py' package: pip install nbtorch[io]"
                          ) from exc
    return h5py


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# ---------------------------------------------------------------------------------------------------------------
# geometry from (Params, Setup)


def lab_to_nexus(setup) -> np.ndarray:
    """Rotation ``[3, 3]`` taking nbtorch lab-frame vectors to the NeXus (McStas) frame (``v_nx = R @ v_lab``).

    Rows: x = −(E across the beam), y = z × x, z = beam, with E = ``setup.polar_axis`` (the spindle, then any
    perpendicular, when E is along the beam).  MOSFLM frame: (x, y, z)_lab → (−z, y, x).
    """
    z = _unit(setup.beam)
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


def nxmx_geometry(params, setup, *, sensor_material: str = "Si", sensor_thickness_mm: Optional[float] = None,
                  saturation_value: Optional[float] = None) -> NexusGeometry:
    """The :class:`NexusGeometry` that :func:`write_nxmx` writes for ``(params, setup)`` (no file is touched).

    Cheap: call it before simulating to validate that the geometry can be written.  Uses ``params.detector``,
    ``params.beam.wavelength`` (float64, detached) and the detector/beam/spindle/phi fields of ``setup``; the sensor
    thickness defaults to ``setup.thickness_um`` (0 when nanoBragg models no sensor depth).

    Raises:
        ValueError: a curved detector (``-curved_det``: NXmx describes flat modules), a beam parallel to the detector,
            a negative sensor thickness or a non-finite saturation value.
    """
    import torch  # noqa: PLC0415 - keep the io package free of torch at import time

    from ..detector import detector_frame
    from ..pytree import tree_map

    if setup.curved_det:
        raise ValueError("NXmx output: a curved detector (-curved_det) cannot be described as a flat NXmx module")
    det = tree_map(lambda t: torch.as_tensor(t).detach().to(torch.float64).cpu(), params.detector)
    frame = detector_frame(det, setup)
    pix0, f, s = (frame.pix0.numpy(), frame.fdet.numpy(), frame.sdet.numpy())
    beam = _unit(setup.beam)
    a, b, t = _beam_hit(pix0, f, s, beam)
    R = lab_to_nexus(setup)
    thick = um_to_mm(setup.thickness_um) if sensor_thickness_mm is None else float(sensor_thickness_mm)
    if not (math.isfinite(thick) and thick >= 0):
        raise ValueError(f"NXmx output: sensor_thickness_mm must be finite and >= 0, got {sensor_thickness_mm!r}")
    if saturation_value is not None and not math.isfinite(float(saturation_value)):
        raise ValueError(f"NXmx output: saturation_value must be finite, got {saturation_value!r}")
    p = float(setup.pixel_size)
    return NexusGeometry(
        fast_axis=R @ f, slow_axis=R @ s, origin_mm=R @ pix0, pixel_size_mm=(p, p),
        image_size=(setup.fpixels, setup.spixels), distance_mm=float(t), beam_center_mm=(float(a), float(b)),
        wavelength_A=float(params.beam.wavelength), beam=R @ beam, spindle=R @ _unit(setup.spindle),
        phi_deg=float(setup.phi0), osc_deg=float(setup.phistep * setup.phisteps), sensor_material=str(sensor_material),
        sensor_thickness_mm=thick, saturation_value=None if saturation_value is None else float(saturation_value),
        lab_to_nexus=R,
    )


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


def _write_detector(inst, image: np.ndarray, geo: NexusGeometry, pixel_mask, opts: dict):
    det = _group(inst, "detector", "NXdetector")
    _field(det, "depends_on", _DETECTOR + "/transformations/det_z")
    _field(det, "data", image[None], **({"compression": opts["compression"]} if opts["compression"] else {}))
    _field(det, "description", "nbtorch simulated detector (nanoBragg physics)")
    _field(det, "distance", geo.distance_mm, "mm")
    _field(det, "distance_derived", True)
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
    tr = _group(det, "transformations", "NXtransformations")
    _axis(tr, "det_z", [geo.distance_mm], "mm", "translation", (0.0, 0.0, 1.0), ".")
    offset = geo.origin_mm - geo.distance_mm * np.array([0.0, 0.0, 1.0])
    length = float(np.linalg.norm(offset))
    mod = _group(det, "module", "NXdetector_module")
    _field(mod, "data_origin", np.array([0, 0], dtype=np.int64))
    _field(mod, "data_size", np.array(image.shape, dtype=np.int64))
    _field(mod, "data_stride", np.array([1, 1], dtype=np.int64))
    _axis(mod, "module_offset", length, "mm", "translation", offset / length if length > 0 else geo.fast_axis,
          _DETECTOR + "/transformations/det_z")
    for name, vec, size in (("fast_pixel_direction", geo.fast_axis, geo.pixel_size_mm[0]),
                            ("slow_pixel_direction", geo.slow_axis, geo.pixel_size_mm[1])):
        _axis(mod, name, size, "mm", "translation", vec, _MODULE + "/module_offset")
    return det


def _write_sample_and_beam(entry, inst, geo: NexusGeometry, params, sample_name: str):
    sample = _group(entry, "sample", "NXsample")
    _field(sample, "name", sample_name)
    _field(sample, "depends_on", "/entry/sample/transformations/phi")
    tr = _group(sample, "transformations", "NXtransformations")
    _axis(tr, "phi", [geo.phi_deg], "deg", "rotation", geo.spindle, ".")
    if geo.osc_deg:
        _field(tr, "phi_end", [geo.phi_deg + geo.osc_deg], "deg")
        _field(tr, "phi_increment_set", geo.osc_deg, "deg")
    beam = _group(inst, "beam", "NXbeam", flux="flux_integrated")
    _field(beam, "incident_wavelength", geo.wavelength_A, "angstrom")
    _field(beam, "flux_integrated", float(params.beam.fluence), "1/m^2")
    K = float(params.beam.polarization)  # Kahn factor = degree of linear polarization along E (McStas x axis)
    _field(beam, "incident_polarization_stokes", np.array([[1.0, K, 0.0, 0.0]]))
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
        image: [slow, fast] array or tensor (``[spixels, fpixels]``, photons/pixel), stored as ``[1, slow, fast]``
            in its own dtype (float32/float64/integers).
        params, setup: the simulation's :class:`~nbtorch.types.Params` and :class:`~nbtorch.types.Setup`.
        sensor_material: NXdetector sensor_material (DIALS knows "Si", "CdTe", "GaAs").
        sensor_thickness_mm: sensor thickness (mm); default ``setup.thickness_um`` converted (0 = no depth model).
        saturation_value: detector saturation level (written only when given; readers mask pixels at or above it).
        underload_value: lowest valid value (written only when given).
        count_time_s: exposure time (s), written only when given.
        start_time: ``datetime`` or ISO-8601 text (default: now, UTC); also used as ``end_time_estimated``.
        instrument_name, source_name, sample_name: the names NXmx requires.
        metadata: extra text fields for ``/entry/nbtorch`` (for example the command line).
        compression: h5py compression of the image (``"gzip"``), default none.

    Pixels outside ``setup.roi`` or masked by ``setup.mask`` get bit 8 (user mask) in ``pixel_mask``.  Only the
    central beam direction and wavelength are written (NXmx has no place for nanoBragg's source lists).

    Raises:
        ValueError: image shape differs from (spixels, fpixels); geometry that NXmx cannot express
            (:func:`nxmx_geometry`).  ImportError: h5py is not installed.
    """
    h5py = _h5py()
    name = display_name(path)
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.shape != (setup.spixels, setup.fpixels):
        raise ValueError(f"write_nxmx {name}: image shape {arr.shape} is not (spixels, fpixels) = "
                         f"{(setup.spixels, setup.fpixels)}")
    check_finite(arr, f"write_nxmx {name}")
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
        det = _write_detector(inst, arr, geo, _pixel_mask(setup),
                              {"compression": compression, "underload_value": underload_value,
                               "count_time_s": count_time_s})
        grp = _group(inst, "detector_group", "NXdetector_group")
        _field(grp, "group_names", ["detector"])
        _field(grp, "group_index", np.array([1], dtype=np.int64))
        _field(grp, "group_parent", np.array([-1], dtype=np.int64))
        _write_sample_and_beam(entry, inst, geo, params, sample_name)
        data = _group(entry, "data", "NXdata", signal="data")
        data["data"] = det["data"]
        source = _group(entry, "source", "NXsource")
        _field(source, "name", source_name, short_name="nbtorch")
        _field(source, "probe", "x-ray")
        inst["source"] = source
    atomic_write(path, buf.getvalue())


def _pixel_mask(setup) -> np.ndarray:
    """uint32 [slow, fast]: bit 8 (user mask) outside ``setup.roi`` and where ``setup.mask`` is 0."""
    return np.where(rendered_mask(setup), 0, 1 << 8).astype(np.uint32)


def _write_nbtorch_group(entry, geo: NexusGeometry, setup, params, metadata) -> None:
    """``/entry/nbtorch`` (NXcollection): the lab-frame rotation and the nbtorch values the NXmx fields came from."""
    col = _group(entry, "nbtorch", "NXcollection")
    _field(col, "lab_to_nexus", geo.lab_to_nexus)
    _field(col, "convention", setup.convention)
    _field(col, "pivot", setup.pivot)
    _field(col, "detector_distance", float(params.detector.distance), "mm")
    _field(col, "beam_center", np.asarray(params.detector.beam_center.detach().cpu(), dtype=np.float64), "mm")
    _field(col, "polarization_axis", np.asarray(setup.polar_axis, dtype=np.float64))
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
        ds = None if dep in (".", "") else (ds.file[dep] if dep.startswith("/") else ds.parent[dep])
    return out


def _chain_matrix(chain, name: str) -> np.ndarray:
    total = np.eye(4)
    for ds in chain:
        total = _axis_matrix(ds, name) @ total
    return total


def _module_geometry(module, name: str):
    """(fast, slow, origin, (pixel_f, pixel_s)) of a detector module from its depends_on chains (as dxtbx)."""
    fast, slow = module["fast_pixel_direction"], module["slow_pixel_direction"]
    dep = _text(fast.attrs.get("depends_on", "."))
    chain = _chain(fast, name)[1:] if dep not in (".", "") else []
    A = _chain_matrix(chain, name)
    f_vec = A[:3, :3] @ _unit(fast.attrs["vector"])
    s_vec = A[:3, :3] @ _unit(slow.attrs["vector"])
    pix = (float(np.atleast_1d(_scaled(fast, _MM_PER, name))[0]), float(np.atleast_1d(_scaled(slow, _MM_PER, name))[0]))
    return f_vec, s_vec, A[:3, 3], pix


def _sample_axis(entry, name: str):
    """(spindle, phi_deg, osc_deg) from the sample's first rotation axis, or (None, None, 0.0)."""
    samples = _nx_children(entry, "NXsample")
    if not samples or "depends_on" not in samples[0]:
        return None, None, 0.0
    dep = _text(samples[0]["depends_on"])
    if dep in (".", ""):
        return None, None, 0.0
    start = entry.file[dep] if dep.startswith("/") else samples[0][dep]
    for ds in _chain(start, name):
        if _text(ds.attrs.get("transformation_type", "")) == "rotation":
            values = np.atleast_1d(_scaled(ds, _DEG_PER, name))
            osc = 0.0
            if ds.name + "_end" in ds.file:
                osc = float(np.atleast_1d(_scaled(ds.file[ds.name + "_end"], _DEG_PER, name))[0] - values[0])
            elif len(values) > 1:
                osc = float(values[1] - values[0])
            return _unit(ds.attrs["vector"]), float(values[0]), osc
    return None, None, 0.0


def _read_geometry(entry, det, module, shape, name: str) -> NexusGeometry:
    f_vec, s_vec, origin, pix = _module_geometry(module, name)
    inst = det.parent
    beams = _nx_children(inst, "NXbeam")
    beams += [b for s in _nx_children(entry, "NXsample") for b in _nx_children(s, "NXbeam")]
    if not beams:
        raise ValueError(f"{name}: NXmx file has no NXbeam")
    wl = float(np.atleast_1d(_scaled(beams[0]["incident_wavelength"], _MM_PER, name))[0]) * ANGSTROM_PER_MM
    beam = np.array([0.0, 0.0, 1.0])
    a, b, t = _beam_hit(origin, f_vec, s_vec, beam)
    spindle, phi, osc = _sample_axis(entry, name)
    sat = float(det["saturation_value"][()]) if "saturation_value" in det else None
    material = _text(det["sensor_material"]) if "sensor_material" in det else ""
    thick = float(np.atleast_1d(_scaled(det["sensor_thickness"], _MM_PER, name))[0]) if "sensor_thickness" in det \
        else 0.0
    R = np.asarray(entry["nbtorch/lab_to_nexus"][()], dtype=np.float64) if "nbtorch/lab_to_nexus" in entry else None
    return NexusGeometry(f_vec, s_vec, origin, pix, (shape[1], shape[0]), float(t), (float(a), float(b)), wl, beam,
                         spindle, phi, osc, material, thick, sat, R)


def _read_frame(entry, det, module, name: str) -> np.ndarray:
    datas = _nx_children(entry, "NXdata")
    ds = None
    if datas:
        signal = datas[0].attrs.get("signal")
        key = _text(signal) if signal is not None else "data"
        ds = datas[0][key] if key in datas[0] else None
    if ds is None:
        ds = det.get("data")
    if ds is None:
        raise ValueError(f"{name}: NXmx file has no image data (NXdata or NXdetector/data)")
    frame = ds[0] if ds.ndim == 3 else ds[()] if ds.ndim == 2 else None
    if frame is None:
        raise ValueError(f"{name}: image data has shape {ds.shape}; expected [frames, slow, fast] or [slow, fast]")
    (o0, o1), (n0, n1) = (np.asarray(module[k][()], dtype=np.int64).reshape(2) for k in ("data_origin", "data_size"))
    return np.asarray(frame)[o0 : o0 + n0, o1 : o1 + n1]


def read_nxmx(path: str | os.PathLike, overload: Optional[float] = None):
    """Read the first frame of an NXmx file as an :class:`~nbtorch.io.images.ObservedImage` with its geometry.

    The geometry (``ObservedImage.geometry``, a :class:`NexusGeometry`) follows the module's ``depends_on`` chains as
    dxtbx does: the fast axis's own offset is ignored, the beam is along +z.  ``pixel_size_mm`` is the fast pixel
    size, ``distance_mm``/``beam_center_mm`` where the beam meets the detector (mm; (fast, slow) from the outer
    corner of pixel (0, 0)), ``wavelength_A`` from NXbeam.  Masking: as :func:`~nbtorch.io.read_image`, plus pixels
    with any of the low 16 bits of ``pixel_mask`` set; the default overload is ``saturation_value``.

    Raises:
        ValueError: not an NXmx file, more than one detector module, missing data/beam, unknown or missing units.
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
        if len(modules) != 1:
            raise ValueError(f"{name}: expected one NXdetector_module, found {len(modules)}")
        data = _read_frame(entry, det, modules[0], name)
        geo = _read_geometry(entry, det, modules[0], data.shape, name)
        pm = det["pixel_mask"][()] if "pixel_mask" in det else None
        header = {"definition": "NXmx", "instrument": _text(det.parent["name"]) if "name" in det.parent else "",
                  "sensor_material": geo.sensor_material}
    if overload is None:
        overload = geo.saturation_value
    obs = observed_image(data, header, overload, geo.pixel_size_mm[0], geo.distance_mm, geo.wavelength_A,
                         geo.beam_center_mm)
    if pm is not None:
        pm = np.asarray(pm).reshape(-1, *obs.data.shape)[0]
        obs = obs._replace(mask=obs.mask & ((pm.astype(np.int64) & 0xFFFF) == 0))
    return obs._replace(geometry=geo)
