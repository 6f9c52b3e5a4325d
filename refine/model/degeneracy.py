"""Free parameter combinations that one image cannot determine, found before a fit starts.

* **Rotations about the beam.**  Rotating the crystal about the beam turns the whole diffraction pattern about the
  direct beam; rotating the detector about the beam turns the pixel grid the opposite way.  Both move every spot
  alike (only the polarization factor, fixed in the lab, tells them apart, and not at all for an unpolarized beam).
  The increments are rotations about the lab axes, so the pair is degenerate when both the crystal's and the
  detector's free rotation axes span the beam direction (MOSFLM/DENZO/ADXV: ``orientation.x`` with
  ``detector_rotation.x``; XDS/DIALS: ``.z``).
* **Two-theta under a beam pivot.**  With the beam pivot the direct-beam spot stays put and the detector only turns,
  so a two-theta swing about its axis is the same motion as a detector rotation about that axis: degenerate when the
  free detector rotations span the two-theta axis.

:func:`refine.pipeline.report.covariance` also names any null direction of the normal matrix after a fit.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence, Tuple

from .parameters import Parameterisation

#: A component of a unit vector below this counts as zero (the axis lies in the span of the others).
_AXIS_TOL = 1e-6


class Degeneracy(NamedTuple):
    """A combination of free scalars the image cannot separate: ``names`` (the scalars), ``why`` (the motion they
    share) and ``fix`` (the scalars to fix, or which to free instead)."""

    names: Tuple[str, ...]
    why: str
    fix: str

    def message(self) -> str:
        """One line naming the pair, the reason and what to fix."""
        return f"{' and '.join(self.names)} cannot be told apart ({self.why}): {self.fix}"


def _spanning(par: Parameterisation, group: str, direction: Sequence[float]) -> Tuple[str, ...]:
    """The free scalars of a lab-axis rotation ``group`` whose span contains ``direction`` (unit vector), or ()."""
    free = {par.scalars[i].spec.index: par.scalars[i].name for i in par.index(group)}
    needed = [k for k in range(3) if abs(direction[k]) > _AXIS_TOL]
    if not needed or any(k not in free for k in needed):
        return ()
    return tuple(free[k] for k in needed)


def degenerate_pairs(par: Parameterisation) -> List[Degeneracy]:
    """The degenerate combinations among ``par``'s free scalars (see the module docstring); empty when none."""
    st, out = par.setup, []
    crystal = _spanning(par, "orientation", st.beam)
    detector = _spanning(par, "detector_rotation", st.beam)
    if crystal and detector:
        out.append(Degeneracy(crystal + detector, "both rotate the pattern about the beam",
                              f"fix {', '.join(detector)} (refine the crystal's rotation about the beam)"))
    if st.pivot == "beam" and par.index("twotheta"):
        tilts = _spanning(par, "detector_rotation", st.twotheta_axis)
        if tilts:
            out.append(Degeneracy(("twotheta",) + tilts, "with the beam pivot both turn the detector about the "
                                  "two-theta axis", f"fix twotheta or {', '.join(tilts)}"))
    return out
