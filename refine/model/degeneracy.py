"""Free parameter combinations that one image cannot determine, found before a fit starts (after it,
:func:`refine.pipeline.report.covariance` names any null direction of the normal matrix).

* A crystal rotation about the beam turns the pattern about the direct beam and a detector rotation about the beam
  turns the pixel grid the opposite way: every spot moves alike.  Degenerate when both the crystal's and the
  detector's free (lab-axis) rotations span the beam direction.
* Under a beam pivot a two-theta swing is the same motion as a detector rotation about the two-theta axis:
  degenerate when the free detector rotations span that axis.
* A panel detector's rigid bodies (:mod:`nbtorch.panels`): when free panel groups hold every panel and their shifts
  span a direction, they move the whole detector along it as ``distance`` (along the beam) and ``beam_center``
  (across it) do; when their rotations span the beam (with shifts across it) they turn the whole detector about the
  beam as a crystal or detector rotation about the beam does; a free group whose free sub-groups hold all its panels
  shifts with them.
* A beam of one wavelength (every source's wavelength factor alike: no spectrum, no dispersion): a spectrum's shift
  ``spectrum.lam0`` moves that wavelength as ``wavelength`` or the stretch ``spectrum.lam1`` does.  (``wavelength``
  and ``spectrum.lam1`` scale the same λ0 and are never free together: :func:`refine.model.parameters.parameterise`
  refuses them.)

Near degeneracies are found after a fit, from the correlation of the increments (:func:`near_degenerate_notes`):
the point-spread function's FWHM (``psf``) widens every spot as a small crystal (``ncells``) or a mosaic spread
(``mosaic``) does, and on coarse pixels or weak spots a still barely tells them apart.  A pair whose |correlation|
exceeds :data:`NEAR_CORRELATION` gets a note in the result.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

from nbtorch.panels import in_plane_axes

from .parameters import Parameterisation
from .table import NODE_GROUP

#: A component of a unit vector below this counts as zero (the axis lies in the span of the others).
_AXIS_TOL = 1e-6
#: Groups whose free scalars a still may barely tell apart, and the motion they share (:func:`near_degenerate_notes`).
NEAR_PAIRS = (("psf", "ncells", "both widen every spot"), ("psf", "mosaic", "both widen every spot"))
#: A near-degenerate pair is noted when the |correlation| of its increments exceeds this.
NEAR_CORRELATION = 0.9


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


def _node_axes(par: Parameterisation) -> Dict[int, Dict[int, str]]:
    """Free panel-group scalars: {node: {axis 0-5 (shift x, y, z, rotation x, y, z): scalar name}}."""
    out: Dict[int, Dict[int, str]] = {}
    for i in par.index(NODE_GROUP):
        sp = par.scalars[i].spec
        node, k = divmod(sp.index, 3)
        out.setdefault(node, {})[k + (3 if sp.leaf.endswith("rotation") else 0)] = sp.name
    return out


def _covering(par: Parameterisation, axes: Dict[int, Dict[int, str]], direction, first: int,
              panels: Set[int]) -> Tuple[str, ...]:
    """The free node scalars (``first`` 0: shifts, 3: rotations) spanning ``direction`` of the nodes that do, when
    those nodes hold every panel in ``panels``; else ()."""
    needed = [k for k in range(3) if abs(direction[k]) > _AXIS_TOL]
    nodes = [g for g, ax in axes.items() if all(first + k in ax for k in needed)]
    held = {p for g in nodes for p in par.setup.panels.nodes[g].panels}
    if not needed or not panels <= held:
        return ()
    return tuple(axes[g][first + k] for g in nodes for k in needed)


def _short(names: Tuple[str, ...]) -> str:
    return ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} … ({len(names)} scalars)"


def _panel_pairs(par: Parameterisation) -> List[Degeneracy]:
    """Panel groups against the whole detector's motions and against each other (module docstring)."""
    layout, st = par.setup.panels, par.setup
    axes = _node_axes(par) if layout is not None else {}
    if not axes:
        return []
    out, every = [], set(range(layout.n_panels))
    e1, e2 = in_plane_axes(layout.beam)
    for name, direction in (("distance", st.beam), ("beam_center.x", e1), ("beam_center.y", e2)):
        shifts = _covering(par, axes, direction, 0, every)
        if shifts and par.index(name):
            out.append(Degeneracy((name, _short(shifts)), "both move the whole detector",
                                  f"fix {name} or refine fewer panel groups"))
    turns = _covering(par, axes, st.beam, 3, every)
    across = _covering(par, axes, e1, 0, every) and _covering(par, axes, e2, 0, every)
    for group in ("orientation", "detector_rotation"):
        about = _spanning(par, group, st.beam)
        if turns and across and about:
            out.append(Degeneracy(about + (_short(turns),), "both turn the pattern about the beam",
                                  f"fix {', '.join(about)} or refine fewer panel groups"))
    for g, ax in axes.items():
        below = {h: a for h, a in axes.items() if _descends(layout, h, g)}
        for k in (k for k in range(3) if k in ax):
            sub = _covering(par, below, [float(j == k) for j in range(3)], 0, set(layout.nodes[g].panels))
            if sub:
                out.append(Degeneracy((ax[k], _short(sub)), "the group moves with its sub-groups",
                                      f"fix {ax[k]} or its sub-groups"))
    return out


def _descends(layout, node: int, ancestor: int) -> bool:
    """Whether ``node`` lies below ``ancestor`` in the panel hierarchy."""
    while node >= 0:
        node = layout.nodes[node].parent
        if node == ancestor:
            return True
    return False


def _wavelength_pairs(par: Parameterisation) -> List[Degeneracy]:
    """A spectrum's shift against the scale of a beam of one wavelength (module docstring)."""
    free = [n for n in ("wavelength", "spectrum.lam1") if par.index(n)]
    one = len({float(factor) for _, factor in par.setup.sources}) == 1
    if not (one and free and par.index("spectrum.lam0")):
        return []
    return [Degeneracy(("spectrum.lam0", free[0]), "a beam of one wavelength: both move it",
                       f"fix spectrum.lam0 or {free[0]} (or give the beam a spectrum: -spectrum FILE.lam)")]


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
    return out + _panel_pairs(par) + _wavelength_pairs(par)


def _in_group(name: str, group: str) -> bool:
    return name == group or name.startswith(group + ".")


def near_degenerate_notes(names: Sequence[str], correlation, threshold: Optional[float] = None) -> List[str]:
    """One note per free pair of :data:`NEAR_PAIRS` groups whose increments (scalar ``names`` [n], ``correlation``
    [n, n]) correlate beyond ``threshold`` (default :data:`NEAR_CORRELATION`) in absolute value: the pair, the
    correlation, why, and what to do."""
    threshold, out = NEAR_CORRELATION if threshold is None else threshold, []
    for first, second, why in NEAR_PAIRS:
        rows = [i for i, a in enumerate(names) if _in_group(a, first)]
        cols = [j for j, b in enumerate(names) if _in_group(b, second)]
        for i in rows:
            a = names[i]
            for j in cols:
                b, c = names[j], float(correlation[i][j])
                if abs(c) > threshold:
                    out.append(f"{a} and {b} are nearly degenerate (correlation {c:+.3f}: {why}): their ESDs are "
                               f"large; fix one of them, or give it a prior, unless the spots are well sampled")
    return out
