"""nanoBragg's detector conventions in one table (spec §4, Q2–Q4, Q24, Q25).

Each :class:`Convention` says what its flag (``-mosflm``, ``-denzo``, ``-adxv``, ``-xds``, ``-dials``; CUSTOM is
chosen by giving any detector or beam vector) sets: the Setup's unit vectors, how the beam-centre values map to mm
along fast and slow from the outer corner of pixel (0, 0), their defaults, and the pivot.  The flag parser and
writer (:mod:`nbtorch.args`), the detector frame (:mod:`nbtorch.detector`), the SMV header and the Setup checks all
read it.  Pure Python: the Setup's own checks import it.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

__all__ = ["Convention", "CONVENTION_TABLE", "CONVENTIONS", "VECTOR_FIELDS"]

#: The Setup fields a convention's ``vectors`` give, in order.
VECTOR_FIELDS = ("fdet", "sdet", "odet", "beam", "twotheta_axis", "polar_axis", "spindle")


@dataclasses.dataclass(frozen=True)
class Convention:
    """One detector convention.

    vectors: the Setup's fast, slow and normal detector axes, beam direction, two-theta axis, E vector and spindle
        (lab frame, :data:`VECTOR_FIELDS` order); for CUSTOM the defaults of the vector flags.
    x_slow: Xbeam counts along slow and Ybeam along fast (MOSFLM, DENZO); otherwise X is fast, Y slow.
    half_pixel: the beam centre counts from the centre of pixel (0, 0) (MOSFLM), not from its outer corner.
    y_from_far: Y counts from the far slow edge (ADXV: Sbeam = detsize_s − Ybeam).
    default_pad: the default (Xbeam, Ybeam) is ((D_X + k_X·p)/2, (D_Y + k_Y·p)/2) with D the detector size (mm)
        along the axis X (Y) counts along and p the pixel size; None: the near point (Xclose, Yclose).
    pivot: the pivot the convention forces; None (CUSTOM): the pivot flags choose it and the vectors are the flags'.
    pixel_origin: the beam-centre flags are ``-ORGX``/``-ORGY`` (the near point, 1-based pixel-centre coordinates
        along fast, slow; :func:`nbtorch.detector.orgx_to_mm`); ``-Xbeam``/``-Ybeam`` only reach the header (Q3).
    """

    vectors: Tuple[Tuple[float, float, float], ...]
    x_slow: bool = False
    half_pixel: bool = False
    y_from_far: bool = False
    default_pad: Optional[Tuple[int, int]] = None
    pivot: Optional[str] = None
    pixel_origin: bool = False

    def fast_slow(self, x, y, pixel_size: float, spixels: int):
        """(Xbeam, Ybeam) → (Fbeam, Sbeam): mm along fast and slow from the outer corner of pixel (0, 0) (for a
        pixel-origin convention the near point, mm as held).  Floats or tensors of one shape; ``pixel_size`` mm."""
        f, s = (y, x) if self.x_slow else (x, y)
        if self.half_pixel:
            f, s = f + 0.5 * pixel_size, s + 0.5 * pixel_size
        if self.y_from_far:
            s = spixels * pixel_size - s
        return f, s

    def xy(self, fbeam, sbeam, pixel_size: float, spixels: int):
        """The inverse of :meth:`fast_slow`: (Fbeam, Sbeam) mm → (Xbeam, Ybeam) mm as this convention counts them."""
        if self.y_from_far:
            sbeam = spixels * pixel_size - sbeam
        if self.half_pixel:
            fbeam, sbeam = fbeam - 0.5 * pixel_size, sbeam - 0.5 * pixel_size
        return (sbeam, fbeam) if self.x_slow else (fbeam, sbeam)

    def default_xy(self, fpixels: int, spixels: int, pixel_size: float) -> Optional[Tuple[float, float]]:
        """The default (Xbeam, Ybeam) in mm, or None where it is the near point (Xclose, Yclose)."""
        if self.default_pad is None:
            return None
        sizes = (spixels * pixel_size, fpixels * pixel_size)
        (dx, dy), (kx, ky) = (sizes if self.x_slow else sizes[::-1]), self.default_pad
        return (dx + kx * pixel_size) / 2, (dy + ky * pixel_size) / 2


_MOSFLM_VECTORS = ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1))

#: Every convention by its ``Setup.convention`` name; MOSFLM is the default.
CONVENTION_TABLE: Dict[str, Convention] = {
    "MOSFLM": Convention(_MOSFLM_VECTORS, x_slow=True, half_pixel=True, default_pad=(1, 1), pivot="beam"),
    "DENZO": Convention(_MOSFLM_VECTORS, x_slow=True, default_pad=(1, 1), pivot="beam"),
    "ADXV": Convention(((1, 0, 0), (0, -1, 0), (0, 0, 1), (0, 0, 1), (-1, 0, 0), (1, 0, 0), (1, 0, 0)),
                       y_from_far=True, default_pad=(1, -1), pivot="beam"),
    "XDS": Convention(((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0)),
                      pivot="sample", pixel_origin=True),
    "DIALS": Convention(((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0)),
                        pivot="sample", pixel_origin=True),
    "CUSTOM": Convention(((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1))),
}
#: The names (``Setup.convention``).
CONVENTIONS = tuple(CONVENTION_TABLE)
