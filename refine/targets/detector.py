"""The detector behind an observed image, as a fit needs it: how its values become photons and which values are
measurements.

A detector reads ``value = gain · photons + ADC offset + read-out noise`` (ADU; ``gain`` ADU per photon, a scalar or
one per pixel; read-out noise Gaussian with σ_r ADU).  :class:`DetectorResponse` holds what the detector files say
(a CrystFEL ``.geom``'s ``adu_per_photon``/``adu_per_eV`` and ``max_adu``: :func:`from_crystfel`; a DIALS
``.expt`` panel's ``gain`` and ``trusted_range``: :func:`from_dials`).
:func:`~refine.targets.observed.read_observed` applies it (the one place values become photons; a per-pixel gain map
file: :func:`~refine.targets.observed.read_gain_map`), and the Gaussian–Poisson target takes its read-out noise in
photons, σ_r / gain, per pixel (:func:`read_noise_photons`).  Neither file format records a read-out noise: σ_r
comes from the options only.
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
    ``sources``: what each came from, for the notes of a fit."""

    gain: Any = None
    trusted: Tuple[Any, Any] = (None, None)
    sources: Tuple[str, ...] = ()

    def merged(self, other: "DetectorResponse") -> "DetectorResponse":
        """This response with ``other``'s values where this one has none (``self`` wins)."""
        low, high = (a if a is not None else b for a, b in zip(self.trusted, other.trusted))
        return DetectorResponse(self.gain if self.gain is not None else other.gain, (low, high),
                                self.sources + other.sources)


def _per_panel(values, setup: Setup):
    """One value per panel → None (all None), a number (all equal) or an array ``setup.image_shape`` (a panel
    without a value gets ``nan``)."""
    if all(v is None for v in values):
        return None
    vals = np.array([math.nan if v is None else float(v) for v in values])
    if np.all(vals == vals[0]):
        return float(vals[0])
    return np.broadcast_to(vals[:, None, None], tuple(setup.image_shape)).copy()


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
    ``max_adu`` per panel as the top of the trusted range (CrystFEL leaves out values above it)."""
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
    sources = tuple(f"{what} from {name}" for what, v in (("gain (adu_per_photon/adu_per_eV)", gain),
                                                         ("max_adu", high)) if v is not None)
    return DetectorResponse(gain, (None, high), sources)


def from_dials(detector, setup: Setup, name: str = "the -expt file") -> DetectorResponse:
    """The response a DIALS :class:`~nbtorch.io.dials.Detector` gives a panel detector ``setup`` (its panels in the
    file's order): each panel's ``gain`` (counts per photon) and ``trusted_range`` (inclusive; (0, 0) = not
    given)."""
    panels = detector.panels
    given = [tuple(p.trusted_range) != (0.0, 0.0) for p in panels]
    low = _per_panel([p.trusted_range[0] if g else None for p, g in zip(panels, given)], setup)
    high = _per_panel([p.trusted_range[1] if g else None for p, g in zip(panels, given)], setup)
    gain = _per_panel([p.gain for p in panels], setup)
    sources = (f"gain from {name}",) + ((f"trusted_range from {name}",) if any(given) else ())
    return DetectorResponse(gain, (low, high), sources)


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


def read_noise_photons(readout_adu: float, gain, shape=None):
    """The read-out noise σ in photons, σ_r / gain: a float for a number ``gain`` (None: 1), else an array of the
    map's shape (``inf`` where the gain is not finite and > 0: such pixels are left out)."""
    if not (isinstance(readout_adu, (int, float)) and math.isfinite(readout_adu) and readout_adu >= 0):
        raise ValueError(f"readout_noise_adu must be a finite number >= 0 (ADU); got {readout_adu!r}")
    if gain is None or np.ndim(gain) == 0:
        return float(readout_adu) / (1.0 if gain is None else float(gain))
    g = np.asarray(gain, dtype=np.float64)
    ok = good_gain(g, g.shape)
    return np.where(ok, float(readout_adu) / np.where(ok, g, 1.0), math.inf)
