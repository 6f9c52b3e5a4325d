"""nanoBragg's detector conventions in one table (spec §4, Q2–Q4, Q24, Q25), read by the flag parser and writer, the
SMV header, the detector frame and the Setup checks.  Pure Python (the Setup's own checks import it).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

__all__ = ["Convention", "CONVENTION_TABLE", "CONVENTIONS", "VECTOR_FIELDS"]

#: The Setup fields a convention's ``vectors`` give, in order.
VECTOR_FIELDS = ("fdet", "sdet", "odet", "beam", "twotheta_axis", "polar_axis", "spindle")


@dataclasses.dataclass(frozen=True)
class Convention:
    """One detector convention (its flag, or CUSTOM: any detector or beam vector flag given).

    vectors: the Setup's :data:`VECTOR_FIELDS` (lab frame); for CUSTOM the vector flags' defaults.
    x_slow: Xbeam counts along slow, Ybeam along fast (else X fast, Y slow).  half_pixel: from the centre of pixel
    (0, 0), not its outer corner.  y_from_far: Y counts from the far slow edge (Sbeam = detsize_s − Ybeam).
    default_pad: (k_X, k_Y) of the default (Xbeam, Ybeam) = ((D_X + k_X·p)/2, (D_Y + k_Y·p)/2), D the detector size
    (mm) along X, Y; None: the near point (Xclose, Yclose).  pivot: the pivot forced; None (CUSTOM): the flags'.
    pixel_origin: the beam centre is the near point from ``-ORGX``/``-ORGY`` (:func:`nbtorch.detector.orgx_to_mm`);
    ``-Xbeam``/``-Ybeam`` only reach the header (Q3).
    """

    vectors: Tuple[Tuple[float, float, float], ...]
    x_slow: bool = False
    half_pixel: bool = False
    y_from_far: bool = False
    default_pad: Optional[Tuple[int, int]] = None
    pivot: Optional[str] = None
    pixel_origin: bool = False

    def fast_slow(self, x, y, pixel_size: float, spixels: int):
        """(Xbeam, Ybeam) mm → (Fbeam, Sbeam) mm along fast, slow from the outer corner of pixel (0, 0) (floats or
        tensors of one shape)."""
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

#: Every convention by its ``Setup.convention`` name.
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
