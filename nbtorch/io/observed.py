"""An observed detector image with its usable-pixel mask (:class:`ObservedImage`), as every reader returns it.

Shared by :mod:`.images` (SMV, raw, fabio) and :mod:`.nexus` (NXmx), which both build it through
:func:`observed_image`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

__all__ = ["ObservedImage", "observed_image"]


class ObservedImage(NamedTuple):
    """A detector image with its usable-pixel mask and whatever geometry its header provides.

    Attributes:
        data: float64 [slow, fast] pixel values (counts or photons).
        mask: bool [slow, fast], True = usable (finite, ≥ 0 and not saturated).
        saturated: bool [slow, fast], True where value ≥ the overload level (all False when no level is known).
        pixel_size_mm: pixel size (mm) or None.
        distance_mm: sample-detector distance (mm) or None.
        wavelength_A: wavelength (Å) or None.
        beam_center_mm: (BEAM_CENTER_X, BEAM_CENTER_Y) in mm from the header, or None.
        size: (fast, slow) pixel counts.
        header: the header as a dict of strings (empty for raw images).
        geometry: the full geometry of an NXmx file (:class:`~nbtorch.io.nexus.NexusGeometry`), else None.
        adc_offset: counts subtracted from the file's values (header ``ADC_OFFSET`` or ``read_image(adc=...)``).
        gain: counts per photon the values were divided by (header ``GAIN`` or ``read_image(gain=...)``).
        precision: for each of ``pixel_size_mm``, ``distance_mm``, ``wavelength_A`` read from a text header, half a
            unit in the last digit printed there (in the field's unit; :func:`~nbtorch.io.images.printed_tolerance`);
            None or a missing key where the value is binary (NXmx) or absent.
    """

    data: np.ndarray
    mask: np.ndarray
    saturated: np.ndarray
    pixel_size_mm: float | None
    distance_mm: float | None
    wavelength_A: float | None
    beam_center_mm: tuple[float, float] | None
    size: tuple[int, int]
    header: dict
    geometry: Optional[Any] = None
    adc_offset: float = 0.0
    gain: float = 1.0
    precision: Optional[dict] = None


def observed_image(data, header, overload, pixel, dist, wl, beam, precision=None) -> ObservedImage:
    """An :class:`ObservedImage` of ``data`` [slow, fast] (as float64) with its masks: saturated where ≥ ``overload``
    (None: nowhere), usable where finite, ≥ 0 and not saturated.  ``header``, ``pixel`` (mm), ``dist`` (mm), ``wl``
    (Å), ``beam`` ((x, y) mm) and ``precision`` fill the fields of those names."""
    data = np.asarray(data, dtype=np.float64)
    finite = np.isfinite(data)
    if overload is None:
        saturated = np.zeros(data.shape, dtype=bool)
    else:
        saturated = finite & (data >= float(overload))
    mask = finite & (np.where(finite, data, -1.0) >= 0.0) & ~saturated
    slow, fast = data.shape
    return ObservedImage(data, mask, saturated, pixel, dist, wl, beam, (fast, slow), header, precision=precision)
