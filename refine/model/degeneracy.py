"""Free parameter combinations that one image cannot determine, found before a fit starts (after it,
:func:`refine.pipeline.report.covariance` names any null direction of the normal matrix).

* A crystal rotation about the beam turns the pattern about the direct beam and a detector rotation about the beam
  turns the pixel grid the opposite way: every spot moves alike.  Degenerate when both the crystal's and the
  detector's free (lab-axis) rotations span the beam direction.
* Under a beam pivot a two-theta swing is the same motion as a detector rotation about the two-theta axis:
  degenerate when the free detector rotations span that axis.
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
