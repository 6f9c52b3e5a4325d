"""The detector behind an observed image, as a fit needs it: how its values become photons and which values are
measurements.

A detector reads ``value = gain · photons + ADC offset + read-out noise`` (ADU; ``gain`` ADU per photon, a scalar or
one per pixel; read-out noise Gaussian with σ_r ADU).  :class:`DetectorResponse` holds what the detector files say
(a CrystFEL ``.geom``'s ``adu_per_photon``/``adu_per_eV`` and ``max_adu``: :func:`from_crystfel`; a DIALS
``.expt`` panel's ``gain`` and ``trusted_range``: :func:`from_dials`).
:func:`~refine.targets.observed.read_observed` applies it (the one place values become photons; a per-pixel gain map
file: :func:`~refine.targets.observed.read_gain_map`), and the Gaussian–Poisson target takes its read-out noise in
photons, σ_r / gain, per pixel (:func:`read_noise_photons`).  Neither file format records a read-out noise; nbtorch
reads its own extension key ``readout_noise`` (ADU) in both — a ``.geom``'s global or ``panel/readout_noise``, an
``.expt`` panel's ``"readout_noise"`` — and a fit takes σ_r from there when its gaussian target has none given
(:func:`readout_option`; one value per panel gives a per-pixel σ_r map).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import numpy as np

from nbtorch.types import Setup
from nbtorch.units import HC_EV_ANGSTROM

#: Photons are per-pixel (value − offset)/gain; a pixel whose gain is not finite and > 0 is left out.
GAIN_RULE = "finite and > 0 (a pixel with another gain is left out)"


@dataclasses.dataclass(frozen=True, eq=False)
class DetectorResponse:
    """What the detector files say about the values of an image ``setup.image_shape``.

    ``gain``: ADU per photon — None (not given), a number > 0, or an array of the image's shape (one value per
    pixel; a pixel whose gain is not finite and > 0 is left out of a fit).  ``trusted``: ``(low, high)`` — the
    inclusive range of file values (ADU, before the ADC offset is subtracted) that are measurements, each None, a
    number or an array of the image's shape (values above ``high`` are saturated; below ``low``, untrusted).
    ``readout``: the read-out noise σ_r (ADU) — None, a number >= 0, or an array of the image's shape (one value per
    panel).  ``sources``: what each came from, for the notes of a fit."""

    gain: Any = None
    trusted: Tuple[Any, Any] = (None, None)
    sources: Tuple[str, ...] = ()
    readout: Any = None

    def merged(self, other: "DetectorResponse") -> "DetectorResponse":
        """This response with ``other``'s values where this one has none (``self`` wins)."""
        low, high = (a if a is not None else b for a, b in zip(self.trusted, other.trusted))
        return DetectorResponse(self.gain if self.gain is not None else other.gain, (low, high),
                                self.sources + other.sources,
                                self.readout if self.readout is not None else other.readout)


def _per_panel(values, setup: Setup):
    """One value per panel → None (all None), a number (all equal) or an array ``setup.image_shape`` (a panel
    without a value gets ``nan``)."""
    if all(v is None for v in values):
        return None
    vals = np.array([math.nan if v is None else float(v) for v in values])
    if np.all(vals == vals[0]):
        return float(vals[0])
    return np.broadcast_to(vals[:, None, None], tuple(setup.image_shape)).copy()


def _readout(values, names, setup: Setup, name: str):
    """The read-out noise of one value (ADU or None) per panel (:func:`_per_panel`); ValueError naming the file and
    the first panel without one when only some panels have one."""
    missing = [n for n, v in zip(names, values) if v is None]
    if missing and len(missing) < len(names):
        raise ValueError(f"{name}: readout_noise is given for some panels but not for panel {missing[0]}: give it "
                         "for every panel (or once for all)")
    return _per_panel(values, setup)


def _extra(panel, key: str) -> Optional[float]:
    """A number kept in a CrystFEL panel's ``extra`` keys, or None."""
    text = dict(panel.extra).get(key)
    try:
        return None if text is None else float(str(text).split()[0])
    except ValueError:
        raise ValueError(f"geometry panel {panel.name}: {key} = {text!r} is not a number") from None


def from_crystfel(geometry, setup: Setup, photon_energy_eV: Optional[float]) -> DetectorResponse:
    """The response a CrystFEL :class:`~nbtorch.io.crystfel.Geometry` gives a panel detector ``setup`` (its panels
    in the geometry's order): gain per panel from ``adu_per_photon``, or ``adu_per_eV`` × ``photon_energy_eV``;
    ``max_adu`` per panel as the top of the trusted range (CrystFEL leaves out values above it); ``readout_noise``
    (nbtorch's extension key, ADU) per panel as the read-out noise."""
    gains = []
    for p in geometry.panels:
        if p.adu_per_photon is not None:
            gains.append(p.adu_per_photon)
        elif p.adu_per_eV is not None and photon_energy_eV is not None:
            gains.append(p.adu_per_eV * float(photon_energy_eV))
        else:
            gains.append(None)
    high = _per_panel([_extra(p, "max_adu") for p in geometry.panels], setup)
    gain = _per_panel(gains, setup)
    name = getattr(geometry, "source", None) or "the -geom file"
    readout = _readout([_extra(p, "readout_noise") for p in geometry.panels], [p.name for p in geometry.panels],
                       setup, name)
    sources = tuple(f"{what} from {name}" for what, v in (("gain (adu_per_photon/adu_per_eV)", gain),
                                                         ("max_adu", high), ("readout_noise", readout))
                    if v is not None)
    return DetectorResponse(gain, (None, high), sources, readout)


def from_dials(detector, setup: Setup, name: str = "the -expt file") -> DetectorResponse:
    """The response a DIALS :class:`~nbtorch.io.dials.Detector` gives a panel detector ``setup`` (its panels in the
    file's order): each panel's ``gain`` (counts per photon), ``trusted_range`` (inclusive; (0, 0) = not
    given) and ``readout_noise`` (nbtorch's extension key, ADU)."""
    panels = detector.panels
    given = [tuple(p.trusted_range) != (0.0, 0.0) for p in panels]
    low = _per_panel([p.trusted_range[0] if g else None for p, g in zip(panels, given)], setup)
    high = _per_panel([p.trusted_range[1] if g else None for p, g in zip(panels, given)], setup)
    gain = _per_panel([p.gain for p in panels], setup)
    readout = _readout([p.readout_noise for p in panels], [p.name or str(k) for k, p in enumerate(panels)], setup,
                       name)
    sources = (f"gain from {name}",) + ((f"trusted_range from {name}",) if any(given) else ()) + (
        (f"readout_noise from {name}",) if readout is not None else ())
    return DetectorResponse(gain, (low, high), sources, readout)


def photon_energy_eV(wavelength_A: float) -> float:
    """Photon energy (eV) of a wavelength (Å)."""
    return HC_EV_ANGSTROM / float(wavelength_A)


def check_gain(gain, shape, name: str = "gain"):
    """``gain`` as a float > 0, or a float64 array of ``shape`` (image axes); ValueError naming ``name`` and the
    allowed values otherwise."""
    if gain is None:
        return None
    if np.ndim(gain) == 0:
        g = float(gain)
        if not (math.isfinite(g) and g > 0):
            raise ValueError(f"{name} must be a finite number > 0 (ADU per photon); got {gain!r}")
        return g
    arr = np.asarray(gain, dtype=np.float64)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must be a number or a per-pixel map of the image's shape {list(shape)}; got shape "
                         f"{list(arr.shape)}")
    return arr


def good_gain(gain, shape) -> np.ndarray:
    """Bool ``shape``: pixels whose gain is finite and > 0 (all True for a number)."""
    if gain is None or np.ndim(gain) == 0:
        return np.ones(tuple(shape), dtype=bool)
    g = np.asarray(gain, dtype=np.float64)
    return np.isfinite(g) & (np.where(np.isfinite(g), g, 0.0) > 0)


def check_readout(readout, name: str = "readout_noise_adu"):
    """``readout`` (σ_r, ADU) as a float >= 0, or a float64 array (a per-pixel map, of at least 2 axes) of values
    >= 0; ValueError naming ``name`` otherwise."""
    if np.ndim(readout) == 0:
        if isinstance(readout, bool) or not (isinstance(readout, (int, float, np.floating, np.integer))
                                             and math.isfinite(readout) and readout >= 0):
            raise ValueError(f"{name} must be a number >= 0 (ADU, finite) or a per-pixel map; got {readout!r}")
        return float(readout)
    arr = np.asarray(readout, dtype=np.float64)
    if arr.ndim < 2 or not (np.isfinite(arr).all() and (arr >= 0).all()):
        raise ValueError(f"{name} must be a number >= 0 (ADU, finite) or a per-pixel map of such numbers of the "
                         f"image's shape; got {'shape ' + str(list(arr.shape)) if arr.ndim < 2 else 'other values'}")
    return arr


def read_noise_photons(readout_adu, gain, shape=None):
    """The read-out noise σ in photons, σ_r / gain (σ_r ``readout_adu`` ADU: a number, or a per-pixel map): a float
    when both are numbers (``gain`` None: 1), else an array of the map's shape (``inf`` where the gain is not finite
    and > 0: such pixels are left out).  ValueError when the maps' shapes differ."""
    readout = check_readout(readout_adu)
    if (gain is None or np.ndim(gain) == 0) and np.ndim(readout) == 0:
        return readout / (1.0 if gain is None else float(gain))
    g = np.asarray(1.0 if gain is None else gain, dtype=np.float64)
    if g.ndim and np.ndim(readout) and g.shape != np.shape(readout):
        raise ValueError(f"readout_noise_adu map has shape {list(np.shape(readout))} but the gain map "
                         f"{list(g.shape)}")
    ok = good_gain(g, g.shape)
    return np.where(ok, readout / np.where(ok, g, 1.0), math.inf)


def readout_text(readout_adu) -> str:
    """A read-out noise (ADU: a number or a per-pixel map) in words for a note: ``3 ADU`` or ``2–4 ADU per pixel``."""
    if np.ndim(readout_adu) == 0:
        return f"{float(readout_adu):g} ADU"
    arr = np.asarray(readout_adu, dtype=np.float64)
    return f"{arr.min():g}–{arr.max():g} ADU per pixel"


def readout_option(response: Optional[DetectorResponse], target, given) -> dict:
    """The fit option of a detector file's read-out noise: ``{"readout_noise_adu": σ_r}`` (a number, or a per-pixel
    map of one value per panel) when the ``target`` is gaussian, none is ``given`` (the option wins over the file)
    and the file (``response``) has one; else {}."""
    if given is not None or response is None or response.readout is None or target != "gaussian":
        return {}
    return {"readout_noise_adu": response.readout}
