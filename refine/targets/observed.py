"""Reading an observed image for a model: the one place every refine entry (``nbtorch-refine``, its ``--images``
modes, ``nbtorch-sweep`` and ``refine.fit`` given a path) turns a file into photons on the model's detector.

A panel detector's image (``Setup.panels``) is ``[P, S, F]``; its files come in the layouts detectors write: the
file's data slab (raw, SMV, CBF or HDF5; the panels at their CrystFEL ``min/max_fs/ss`` places when the detector
came from a ``.geom``), the panels stacked along slow (``[P·S, F]``, as nbtorch writes SMV for panels), HDF5
``[P, S, F]``, or NXmx with one module per panel.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import numpy as np
import torch

from nbtorch.io.crystfel import geometry_mask, slab_shape, slab_to_panels
from nbtorch.io.images import RAW_EXTENSIONS, HeaderWarning, ObservedImage, header_mismatches, read_image, to_photons
from nbtorch.io.nexus import hdf5_frame, hdf5_module, is_nxmx
from nbtorch.io.observed import observed_image
from nbtorch.pixels import panel_extent_mask
from nbtorch.types import Params, Setup

from .detector import DetectorResponse, check_gain, from_crystfel, good_gain, photon_energy_eV

#: Where a CrystFEL detector keeps its data in an HDF5 file when no ``.geom`` says otherwise.
DEFAULT_HDF5_DATA = "/data/data"
#: Where else a plain (not NXmx) HDF5 file of a detector without a ``.geom`` keeps its frames (Eiger's layout).
OTHER_HDF5_DATA = ("/entry/data/data",)


def read_observed(path: str, setup: Setup, params: Optional[Params] = None, *, label: str = "OBSERVED",
                  overload: Optional[float] = None, adc: Optional[float] = None,
                  gain=None, geometry=None, detector: Optional[DetectorResponse] = None,
                  frame: int = 0) -> ObservedImage:
    """The image at ``path`` in photons, ``data`` ``setup.image_shape`` ([spixels, fpixels], or [P, S, F] for a
    panel detector): (value − ADC offset) / gain, per pixel (:func:`_to_photons`, the one place refine turns a
    file's values into photons).  Raw float files take their shape from ``setup`` (a panel detector's: the data slab
    of ``geometry``, else [P·S, F]).

    The ADC offset: ``adc``, else the header's ``ADC_OFFSET``, else 0.  The gain (ADU per photon): ``gain`` (a
    number, or a per-pixel map of ``setup.image_shape``), else the header's ``GAIN``, else the detector files'
    (``detector``, else what ``geometry`` says: :func:`~refine.targets.detector.from_crystfel`), else 1;
    ``ObservedImage.gain`` is the one applied (a number or the map).  Values that are not measurements leave the
    mask: at or above ``overload`` (file values; default 65535 for 16-bit SMV, the SMV header's
    ``SATURATED_VALUE``, miniCBF's ``Count_cutoff``) or outside the detector's trusted range (CrystFEL
    ``max_adu``, DIALS ``trusted_range``, inclusive) — ``saturated`` marks those above —, negative file values
    (gaps), and pixels whose gain is not finite and > 0.

    Panel detectors: ``geometry`` is the CrystFEL :class:`~nbtorch.io.crystfel.Geometry` the detector came from, or
    None.  A file holding the data slab (raw, SMV, CBF, HDF5 at the panels' ``data`` location, default
    ``/data/data`` or ``/entry/data/data``) is cut into panels by :func:`~nbtorch.io.crystfel.slab_to_panels` and its pixels
    masked as :func:`~nbtorch.io.crystfel.geometry_mask` says (with the masks an HDF5 image keeps in itself);
    ``[P, S, F]`` (HDF5, NXmx with one module per panel) and ``[P·S, F]`` (panels stacked along slow) are taken as
    they are.  A smaller panel's padding is never usable.

    ``frame``: the frame (0-based) of a multi-frame file (HDF5 ``[N, S, F]``/``[N, P, S, F]``, NXmx, fabio's
    multi-frame formats), as DIALS's ``single_file_indices`` name it; one beyond the file's is a ValueError naming
    the file, the frame and how many frames it holds.

    ``ValueError`` whose one line starts with ``label`` and the path when the file cannot be read or its size is not
    the model's (naming both shapes).  With ``params``, first a :class:`~nbtorch.io.images.HeaderWarning` line for
    each of the header's pixel size (mm), distance (mm; one-panel detectors) and wavelength (Å) that disagrees with
    the model beyond the header's precision."""
    try:
        obs, data_file = _read(path, setup, geometry, overload, adc, 1.0, frame)
    except (ValueError, OSError, ImportError) as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"{label} {text}" if text.startswith(path) else f"{label} {path}: {text}") from None
    if params is not None:
        given = {"pixel_size_mm": ("-pixel", setup.pixel_size),
                 "wavelength_A": ("-lambda", float(params.beam.wavelength))}
        if not setup.distance_is_close and setup.panels is None:
            given["distance_mm"] = ("-distance", float(params.detector.distance))
        for line in header_mismatches(obs, f"{label} {path}", given):
            warnings.warn(line, HeaderWarning, stacklevel=2)
    if setup.panels is not None:
        obs = _as_panels(obs, setup, geometry, data_file, f"{label} {path}")
    elif obs.data.shape != (setup.spixels, setup.fpixels):
        raise ValueError(f"{label} {path} is {obs.data.shape[1]}×{obs.data.shape[0]} pixels (fast × slow) but the "
                         f"flags describe a {setup.fpixels}×{setup.spixels} detector")
    if detector is None and geometry is not None:
        energy = photon_energy_eV(float(params.beam.wavelength)) if params is not None else geometry.photon_energy_eV
        detector = from_crystfel(geometry, setup, energy)
    try:
        return _to_photons(obs, detector or DetectorResponse(), overload, gain)
    except ValueError as exc:
        raise ValueError(f"{label} {path}: {exc}") from None


def _header_number(header: dict, key: str) -> Optional[float]:
    """A header value (key in any case) as a number, None when absent; ValueError naming the key."""
    head = {str(k).upper(): v for k, v in header.items()}
    if key not in head:
        return None
    try:
        return float(str(head[key]).strip())
    except ValueError:
        raise ValueError(f"header {key} = {head[key]!r} is not a number") from None


def _to_photons(obs: ObservedImage, detector: DetectorResponse, overload, gain) -> ObservedImage:
    """``obs`` (values − ADC offset, counts) in photons with its measurements masked (see :func:`read_observed`):
    the saturation and trusted-range tests on the file's values, then the division by the gain."""
    shape = obs.data.shape
    raw = obs.data + obs.adc_offset
    finite = np.isfinite(raw)
    val = np.where(finite, raw, 0.0)
    saturated = obs.saturated.copy()
    smv_level = _header_number(obs.header, "SATURATED_VALUE") if overload is None else None
    if smv_level is not None:
        saturated |= finite & (val >= smv_level)
    low, high = detector.trusted
    with np.errstate(invalid="ignore"):
        if high is not None:
            saturated |= finite & (val > high)
        mask = obs.mask & ~saturated
        if low is not None:
            mask &= ~(finite & (val < low))
    if gain is not None:
        g = check_gain(gain, shape)
    else:
        g = _header_number(obs.header, "GAIN")
        if g is not None:
            g = check_gain(g, shape, "header GAIN")
        elif detector.gain is not None:
            g = check_gain(detector.gain, shape, "the detector file's gain")
    g = 1.0 if g is None else g
    ok = good_gain(g, shape)
    data = obs.data / (g if np.ndim(g) == 0 else np.where(ok, g, 1.0))
    return obs._replace(data=data, mask=mask & ok, saturated=saturated, gain=g)


def _stacked(setup: Setup) -> tuple:
    """(P·S, F): a panel detector's images stacked along slow."""
    return (setup.n_panels * setup.spixels, setup.fpixels)


def _read(path: str, setup: Setup, geometry, overload, adc, gain, frame: int = 0):
    """(frame ``frame`` of the file in photons in the file's own layout, the path when it is a plain HDF5 data file
    else None)."""
    raw = os.path.splitext(path)[1].lower() in RAW_EXTENSIONS
    read = dict(overload=overload, adc=adc, gain=gain, frame=frame)
    if setup.panels is None:
        return read_image(path, shape=(setup.spixels, setup.fpixels) if raw else None, **read), None
    if raw:
        want = slab_shape(geometry) if geometry is not None else _stacked(setup)
        return read_image(path, shape=(math.prod(want[:-1]), want[-1]), **read), None
    if _plain_hdf5(path):
        return _read_hdf5(path, setup, geometry, overload, adc, gain, frame), path
    return read_image(path, **read), None


def _plain_hdf5(path: str) -> bool:
    """An HDF5 file that is not NXmx (False where h5py is missing: :func:`read_image` then says what to install)."""
    try:
        h5py = hdf5_module()
    except ImportError:
        return False
    return bool(h5py.is_hdf5(path)) and not is_nxmx(path)


def _read_hdf5(path: str, setup: Setup, geometry, overload, adc, gain, index: int = 0) -> ObservedImage:
    """Frame ``index`` of the HDF5 dataset a panel detector reads (the geometry's ``data`` location, else
    ``/data/data`` or ``/entry/data/data``) as an :class:`ObservedImage` of the frame's shape, in photons: the
    dataset itself (one frame) where it is ``[P, S, F]``, ``[P·S, F]`` or the geometry's slab, else its entry
    ``index`` along the first axis (``[N, S, F]``, ``[N, P, S, F]`` …)."""
    h5py = hdf5_module()
    wanted = (geometry.panels[0].data,) if geometry is not None else (DEFAULT_HDF5_DATA, *OTHER_HDF5_DATA)
    frames = {tuple(setup.image_shape), _stacked(setup)} | ({tuple(slab_shape(geometry))} if geometry else set())
    with h5py.File(path, "r") as f:
        location = next((w for w in wanted if isinstance(f.get(w), h5py.Dataset)), None)
        if location is None:
            raise ValueError(f"{path}: an HDF5 file without the image dataset {' or '.join(wanted)} (nor NXmx)")
        ds = f[location]
        whole = tuple(ds.shape) in frames or (tuple(ds.shape[1:]) not in frames and ds.ndim <= 3)
        frame = hdf5_frame(ds, index, not whole, path)
    if frame.ndim < 2:
        raise ValueError(f"{path}: {location} has shape {list(frame.shape)}; expected an image")
    flat = observed_image(frame.reshape(-1, frame.shape[-1]), {"location": location}, overload, None, None, None,
                          None)
    obs = _shaped(flat, frame.shape)
    return to_photons(obs, path, adc, gain)


def _shaped(obs: ObservedImage, shape) -> ObservedImage:
    """``obs`` with its pixel arrays reshaped to ``shape`` (size stays (fast, slow) of the last two axes)."""
    return obs._replace(data=obs.data.reshape(shape), mask=obs.mask.reshape(shape),
                        saturated=obs.saturated.reshape(shape), size=(shape[-1], shape[-2]))


def _as_panels(obs: ObservedImage, setup: Setup, geometry, data_file, where: str) -> ObservedImage:
    """``obs`` as the panel images ``setup.image_shape`` [P, S, F]: as it is, a CrystFEL data slab cut by
    ``geometry`` (masked as the geometry says, with the masks kept in ``data_file``, an HDF5 image, or None), or
    panels stacked along slow; ``ValueError`` starting with ``where`` naming both shapes."""
    want = tuple(setup.image_shape)
    shape = tuple(obs.data.shape)
    slab = tuple(slab_shape(geometry)) if geometry is not None else None
    if shape == want:
        out = obs
    elif slab is not None and obs.data.size == math.prod(slab) and shape in (slab, (math.prod(slab[:-1]), slab[-1]),
                                                                             (1, *slab)):
        cut = {k: slab_to_panels(getattr(obs, k).reshape(slab), geometry) for k in ("data", "mask", "saturated")}
        out = obs._replace(**cut)
        try:
            good = geometry_mask(geometry, data_file) != 0
        except ValueError as exc:
            raise ValueError(f"{where}: {' '.join(str(exc).split())}") from None
        out = out._replace(mask=out.mask & good)
    elif shape == _stacked(setup):
        out = _shaped(obs, want)
    else:
        layouts = f"[P, S, F] = {list(want)}, panels stacked along slow {list(_stacked(setup))}"
        if slab is not None:
            layouts += f" or the geometry's data slab {list(slab)}"
        raise ValueError(f"{where} is {list(shape)} but the model's panel detector needs {layouts}")
    out = _shaped(out, want)
    return out._replace(mask=out.mask & panel_extent_mask(setup))


def observed_array(observed, setup: Setup, geometry=None):
    """An observed image (tensor, array, :class:`nbtorch.io.images.ObservedImage` or a path read with
    :func:`read_observed`, raw files taking their shape from ``setup``; ``geometry`` the CrystFEL geometry of a panel
    detector, see there) → (float64 array ``setup.image_shape``, its own mask (bool, same shape) or None, the gain
    its values were divided by (ADU per photon: a number or a per-pixel map; None for tensors and arrays))."""
    if isinstance(observed, str) or hasattr(observed, "__fspath__"):
        observed = read_observed(os.fspath(observed), setup, label="observed", geometry=geometry)
    if isinstance(observed, ObservedImage):
        return np.asarray(observed.data, dtype=np.float64), np.asarray(observed.mask, dtype=bool), observed.gain
    if torch.is_tensor(observed):
        return observed.detach().cpu().double().numpy(), None, None
    return np.asarray(observed, dtype=np.float64), None, None


def read_gain_map(path: str, setup: Setup, geometry=None) -> np.ndarray:
    """A per-pixel gain map (ADU per photon) of ``setup.image_shape`` from ``path``: raw float32 (the image's
    shape, as an observed image's), SMV, CBF or HDF5 — read like an observed image (a panel detector's data slab cut
    by ``geometry``), without offset, gain or saturation.  ValueError starting with ``--gain-map``."""
    if not os.path.isfile(path):
        raise ValueError(f"--gain-map {path}: no such file")
    obs = read_observed(path, setup, label="--gain-map", adc=0.0, gain=1.0, geometry=geometry, overload=math.inf)
    data = np.asarray(obs.data, dtype=np.float64)
    if not good_gain(data, data.shape).any():
        raise ValueError(f"--gain-map {path}: no pixel has a gain that is finite and > 0 (ADU per photon)")
    return data
