"""Refinement results: values in reported units with standard uncertainties, correlations, history, JSON, plots, and
the refined model written back as nanoBragg flags.  :func:`finish` turns the last
:class:`~refine.pipeline.problem.FitState` into a :class:`Result`, and a fit of many images into a
:class:`JointResult` (the shared values and one :class:`Result` per image); uncertainties:
:mod:`refine.pipeline.report`."""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from nbtorch.io._atomic import atomic_write
from nbtorch.io.crystfel import moved_geometry, write_geom
from nbtorch.io.dials import write_experiments
from nbtorch.panels import panel_lab_vectors
from nbtorch.spectrum import write_lam

from ..minimise.solve import DENSE, _inverse, choose_solve, image_covariance, schur_covariance
from ..model.degeneracy import near_degenerate_notes
from ..model.parameters import Parameterisation
from ..model.predict import predict_image
from ..targets.objective import Objective
from . import plots
from .model_flags import model_flags, refined_spectrum
from .problem import FitState, Problem
from .report import correlation_from_covariance, covariance, esd_factor, propagate


#: A likelihood fit (Poisson, Gaussian, Anscombe) whose Pearson χ²/ν lies outside [1/POOR_FIT_CHI2, POOR_FIT_CHI2]
#: is reported as a poor fit: its ESDs (from the Fisher information) do not describe the errors.
POOR_FIT_CHI2 = 3.0


def poor_fit_message(target_likelihood: bool, chi2_reduced: float) -> str:
    """Why a fit is poor ('' when it is not, or for least squares whose ESDs are scaled by χ²/ν): χ²/ν of a
    likelihood target far from 1, with the likely causes."""
    if not target_likelihood:
        return ""
    if chi2_reduced > POOR_FIT_CHI2 or not chi2_reduced == chi2_reduced:
        return (f"poor fit: χ²/ν = {chi2_reduced:.4g} (> {POOR_FIT_CHI2:g}); likely causes: the image is in counts, "
                "not photons (an ADC offset or gain: --adc/--gain, or ADC_OFFSET/GAIN in the header), a read noise "
                "too small for the gaussian target, or a model that misses part of the image (background, spot "
                "shape, mosaicity, a wrong starting solution); the ESDs are not reliable")
    if chi2_reduced < 1.0 / POOR_FIT_CHI2:
        return (f"poor fit: χ²/ν = {chi2_reduced:.4g} (< {1 / POOR_FIT_CHI2:.3g}); likely causes: a gain below 1 "
                "(--gain), a read noise too large for the gaussian target, or smoothed/processed data; the ESDs are "
                "not reliable")
    return ""


@dataclasses.dataclass(frozen=True, eq=False)
class Result:
    """Outcome of :func:`refine.fit`, and of each image of :func:`refine.fit_many` (immutable).

    Each field is described in docs/refine.md ("Results"): ``converged``/``message`` (the final stage's rule, and any
    undetermined combination); ``names``, ``x`` [n] (refined increments), ``x_esd``, ``covariance``/``correlation``
    [n, n] of x; ``values``/``esd`` ({scalar: reported value / ESD}: cell Å/deg, orientation mrad, distance and beam
    centre mm, tilts deg, λ Å, N cells, mosaic deg, scale, background photons, water µm); ``parameters`` /
    ``parameter_esd`` (the whole model, :data:`~refine.model.table.REPORT_FIELDS`); ``loss`` (fitted pixels),
    ``loss_all`` and ``start_loss`` (all usable pixels), ``loss_history``, ``history``, ``stages``, totals;
    ``chi2_reduced``, ``esd_factor``, ``poor_fit`` ('' or why χ²/ν of a likelihood fit is outside
    [1/:data:`POOR_FIT_CHI2`, :data:`POOR_FIT_CHI2`]), ``n_pixels``, ``n_usable``; ``params``, ``setup``, ``par``,
    ``crystal_system``, ``observed`` [slow, fast], ``pixels`` (bool [slow, fast], fitted), ``nanobragg_base``,
    ``matrix_path``, ``spectrum_path`` (where :meth:`write_spectrum` writes the refined spectrum, which the flags then
    name; None: the flags of a moved spectrum are unavailable, with a note), ``notes`` (with a note for each nearly
    degenerate pair, :func:`refine.model.degeneracy.near_degenerate_notes`), ``geometry`` (the CrystFEL geometry the
    panel detector came from, or None); an image
    of a joint fit also has ``path`` and ``normal`` (its own normal matrix [n, n], shared then own scalars: what a
    fit of it alone would have); ``expt`` (None, or where the model came from in a DIALS experiment list:
    ``{"input", "experiment", "identifier", "out"}``, the JSON report's ``expt``).  A panel detector's images
    (``observed``, ``pixels``, :meth:`model_image`) are [panel, slow, fast].
    """

    converged: bool
    message: str
    method: str
    target: str
    names: List[str]
    x: torch.Tensor
    x_esd: torch.Tensor
    values: Dict[str, float]
    esd: Dict[str, float]
    parameters: Dict[str, object]
    parameter_esd: Dict[str, object]
    covariance: torch.Tensor
    correlation: torch.Tensor
    loss: float
    loss_history: List[float]
    history: List[dict]
    iterations: int
    evaluations: int
    seconds: float
    chi2_reduced: float
    esd_factor: float
    n_pixels: int
    stages: List[dict]
    params: object
    setup: object
    par: Parameterisation
    observed: torch.Tensor
    pixels: np.ndarray
    nanobragg_base: Optional[List[str]] = None
    matrix_path: Optional[str] = None
    notes: Tuple[str, ...] = ()
    crystal_system: str = ""
    loss_all: float = float("nan")
    start_loss: float = float("nan")
    n_usable: int = 0
    poor_fit: str = ""
    path: Optional[str] = None
    normal: Optional[torch.Tensor] = None
    geometry: object = None
    expt: Optional[dict] = None
    spectrum_path: Optional[str] = None

    @property
    def ok(self) -> bool:
        """Converged and not a poor fit (what ``nbtorch-refine`` exits 0 for)."""
        return bool(self.converged) and not self.poor_fit

    @property
    def chi2_nu(self) -> float:
        """Pearson χ²/ν of this image (:attr:`chi2_reduced`)."""
        return self.chi2_reduced

    # ------------------------------------------------------------------ images
    def model_image(self) -> torch.Tensor:
        """The refined model image ``setup.image_shape`` ([slow, fast] or [panel, slow, fast]; photons/pixel,
        including the background plane)."""
        return predict_image(self.par, self.x)

    def residual_image(self) -> torch.Tensor:
        """observed − model (``setup.image_shape``; 0 outside the fitted pixels)."""
        r = self.observed - self.model_image()
        return torch.where(torch.as_tensor(self.pixels), r, torch.zeros_like(r))

    # ------------------------------------------------------------------ nanoBragg flags
    def to_nanobragg_args(self, matrix_path: Optional[str] = None, write_matrix: bool = True,
                          base_args=None, spectrum_path: Optional[str] = None) -> List[str]:
        """The refined model as nanoBragg flags (a list of tokens), by :func:`nbtorch.to_nanobragg_args`: every
        value the model expresses is written from it (``-cell``+``-misset``, or ``-mat`` with a new MOSFLM matrix at
        ``matrix_path`` for models from a matrix; N, mosaic, λ, fluence, distance, the beam centre as the convention
        writes it, tilts, water …); from the starting flags (``base_args``, default those given to the fit) only
        what a model cannot express (``-hkl``, ``-mask``, sources, divergence, ``-mosaic_seed``).  A fit with a
        point-spread function adds ``-psf KIND -psf_fwhm µm -psf_radius px`` (the refined FWHM when ``psf`` was
        free).  ``spectrum_path`` (default :attr:`spectrum_path`): the model's spectrum as ``-spectrum
        spectrum_path`` (in place of the starting flags' wavelengths; the file is written by
        :meth:`write_spectrum`) — needed when the spectrum moved (``spectrum.lam0``/``lam1`` refined, or λ0 of a
        ``-spectrum`` beam).  ValueError for what flags cannot express (e.g. a structure-factor table without
        starting flags, a moved spectrum without ``spectrum_path``).  The background plane has no flag
        (``parameters['background']``); the flags re-simulate ``params`` (``-mat`` to its 8 decimals).
        """
        base = base_args if base_args is not None else self.nanobragg_base
        matrix_path = matrix_path if matrix_path is not None else self.matrix_path
        spectrum_path = spectrum_path if spectrum_path is not None else self.spectrum_path
        return model_flags(self, base, matrix_path, write_matrix, spectrum_path)

    def write_spectrum(self, path: str) -> None:
        """Write the refined model's spectrum to ``path`` as a diffBragg ``.lam`` file (atomically,
        :func:`nbtorch.spectrum.write_lam`): one channel per wavelength of a beam direction, λ0·f_c +
        ``spectrum_shift`` Å with its weight (:func:`refine.pipeline.model_flags.refined_spectrum`; one channel for a
        beam of one wavelength).  ValueError for sources that are not one spectrum (a ``-sourcefile``'s)."""
        write_lam(path, *refined_spectrum(self.params, self.setup))

    def nanobragg_command(self, **kw) -> str:
        """:meth:`to_nanobragg_args` as one shell-quoted string."""
        return " ".join(shlex.quote(t) for t in self.to_nanobragg_args(**kw))

    # ------------------------------------------------------------------ the refined panel detector
    def panel_vectors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The refined panels in the lab frame: (outer corner of pixel (0, 0), fast step, slow step), mm, [P, 3] each
        (:func:`nbtorch.panels.panel_lab_vectors`; ValueError for nanoBragg's one-panel detector)."""
        st = self.setup
        if st.panels is None:
            raise ValueError("panel_vectors: the detector is nanoBragg's one panel, not a panel detector")
        with torch.no_grad():
            return panel_lab_vectors(st.panels, self.params.detector, st.beam, st.twotheta_axis)

    def refined_geometry(self):
        """The refined detector as a CrystFEL :class:`~nbtorch.io.crystfel.Geometry`: the starting file's (``geometry``)
        with every panel moved to its refined corner and steps (:func:`nbtorch.io.crystfel.moved_geometry`; every other
        key kept).  ValueError when the fit was not given the geometry (``FitOptions.geometry``; ``-geom FILE``)."""
        if self.geometry is None:
            raise ValueError("the refined detector is written as a CrystFEL geometry only for a detector read from "
                             "one: give the fit geometry=read_geom(FILE) (nbtorch-refine: -geom FILE)")
        corner, fast, slow = (t.detach().cpu().double() for t in self.panel_vectors())
        return moved_geometry(self.geometry, corner, fast, slow)

    def write_geom(self, path: str) -> None:
        """Write :meth:`refined_geometry` to ``path`` (atomically, :func:`nbtorch.io.crystfel.write_geom`)."""
        write_geom(path, self.refined_geometry())

    def write_expt(self, path: str, source, record) -> None:
        """Write the refined experiment list to ``path`` (atomically, :func:`nbtorch.io.dials.write_experiments`):
        ``source`` (the ``.expt`` path, bytes or JSON document the model came from) with ``record``'s experiment (a
        :func:`~nbtorch.io.dials.read_experiments` record of it) given this result's refined crystal
        (``real_space_a/b/c``), detector (panel and group frames in the hierarchy's local frames) and wavelength;
        every other experiment and model as read.  ValueError when the model's panels are not that experiment's
        detector's; OSError when writing fails (nothing is written)."""
        write_experiments(path, source, [record._replace(params=self.params, setup=self.setup)])

    # ------------------------------------------------------------------ JSON and text
    def to_dict(self) -> dict:
        """Plain-Python summary (what :meth:`to_json` writes); does not change the result."""
        notes = list(self.notes)
        try:
            if self.expt is not None and self.matrix_path is None and not self.setup.nanobragg_cell:
                raise ValueError("the crystal is the .expt's exact lattice, written with --out-expt (write_expt); "
                                 "as flags it needs a matrix file (--matrix-out, matrix_path)")
            flags = self.to_nanobragg_args(matrix_path=self.matrix_path or "refined.mat", write_matrix=False)
        except ValueError as exc:
            flags = None
            notes.append(f"nanobragg_args unavailable: {exc}")
        scalars = {s.name: s for s in self.par.scalars}
        return {
            "converged": bool(self.converged), "message": self.message, "method": self.method,
            "target": self.target, "crystal_system": self.crystal_system,
            "parameters": dict(self.parameters, beam_center_unit="mm"), "esd": dict(self.parameter_esd),
            "free": list(self.names), "values": {k: float(v) for k, v in self.values.items()},
            "value_esd": {k: float(v) for k, v in self.esd.items()},
            "units": {n: s.unit for n, s in scalars.items()},
            "flags": {n: "/".join(s.spec.flags) for n, s in scalars.items()},
            "correlation": [[float(v) for v in row] for row in self.correlation],
            "loss": float(self.loss), "loss_all": float(self.loss_all), "start_loss": float(self.start_loss),
            "loss_history": [float(v) for v in self.loss_history],
            "iterations": int(self.iterations), "evaluations": int(self.evaluations), "seconds": float(self.seconds),
            "chi2_reduced": float(self.chi2_reduced), "esd_factor": float(self.esd_factor),
            "n_pixels": int(self.n_pixels), "n_usable": int(self.n_usable), "stages": list(self.stages),
            "nanobragg_args": flags, "notes": notes, "poor_fit": self.poor_fit or None, "ok": self.ok,
            "chi2_nu": float(self.chi2_reduced),  # the name every mode's JSON uses (lines, joint, sweep)
        } | ({"expt": dict(self.expt)} if self.expt is not None else {})

    def image_dict(self) -> dict:
        """One image's entry in a joint fit's JSON: ``{"path", "converged", "ok", "chi2_nu", "poor_fit",
        "parameters", "esd", "nanobragg_args"}`` (flags None when they cannot express the model), and ``expt`` for
        a model of an experiment list."""
        d = self.to_dict()
        return dict({k: d[k] for k in ("converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd",
                                       "nanobragg_args", "expt") if k in d}, path=self.path)

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written (atomically) to ``path`` when given."""
        return _json(self.to_dict(), path, indent)

    def summary(self) -> str:
        """Human-readable table of the free scalars with ESDs and flags, the notes, and the fit statistics."""
        w = max([24] + [len(s.name) for s in self.par.scalars])  # panel groups have long names
        lines = [f"{'parameter':{w}s} {'value':>16s} {'esd':>12s}  {'unit':6s} flag"]
        for s in self.par.scalars:
            lines.append(f"{s.name:{w}s} {self.values[s.name]:16.8g} {self.esd[s.name]:12.4g}  {s.unit:6s} "
                         f"{'/'.join(s.spec.flags)}")
        return "\n".join(lines + _summary_end(self, f"pixels {self.n_pixels}"))

    # ------------------------------------------------------------------ plots
    def plot(self, path: Optional[str] = None, log: bool = True):
        """Figure with observed / model / residual images and the loss per stage
        (:func:`refine.pipeline.plots.plot_fit`); saved to ``path`` when given, atomically
        (:func:`nbtorch.io.atomic_write_from`)."""
        return plots.plot_fit(self, path, log)

    def plot_loss(self, path: Optional[str] = None):
        """The loss per stage (:func:`refine.pipeline.plots.plot_loss`); saved to ``path`` when given, atomically."""
        return plots.plot_loss(self, path)


def _overall_poor_fit(likelihood: bool, chi2_nu: float, images: List[Result]) -> str:
    """Why a joint fit is poor: its χ²/ν over all images (:func:`poor_fit_message`), else the first poor image's
    reason with the count of poor images; '' when no fit is poor."""
    why = poor_fit_message(likelihood, chi2_nu)
    poor = [(k, img) for k, img in enumerate(images, start=1) if img.poor_fit]
    if why or not poor:
        return why
    k, img = poor[0]
    return (f"poor fit of {len(poor)} of {len(images)} images; image {k} ({img.path or 'no path'}): "
            f"{img.poor_fit.split(': ', 1)[-1]}")


#: An image of a joint fit is a :class:`Result` (the name earlier versions used).
ImageResult = Result


@dataclasses.dataclass(frozen=True, eq=False)
class JointResult:
    """Outcome of :func:`refine.fit_many`.

    ``converged``/``message`` (the final stage's), ``loss`` (all images, all usable pixels, the fit's target),
    ``seconds``, ``iterations``, ``evaluations``, ``target``; ``shared_names``, ``shared``/``shared_esd`` ({scalar:
    reported value / ESD}), ``shared_covariance``/``shared_correlation`` [n_s, n_s] (of the increments);
    ``images`` (one :class:`Result` each); ``stages``, ``history``, ``notes``; ``esd_factor``; ``X`` [n];
    ``chi2_nu`` (Pearson χ²/(N − n) over all images) and ``poor_fit`` ('' or why the fit is poor: the whole fit's
    χ²/ν, else the first poor image's; :func:`refine.pipeline.result.poor_fit_message`)."""

    converged: bool
    message: str
    loss: float
    seconds: float
    iterations: int
    evaluations: int
    target: str
    shared_names: List[str]
    shared: Dict[str, float]
    shared_esd: Dict[str, float]
    shared_covariance: torch.Tensor
    shared_correlation: torch.Tensor
    images: List[Result]
    stages: List[dict]
    history: List[dict]
    notes: Tuple[str, ...]
    esd_factor: float
    X: torch.Tensor
    chi2_nu: float = float("nan")
    poor_fit: str = ""

    @property
    def ok(self) -> bool:
        """Converged and no poor fit, overall or of any image (what ``nbtorch-refine --images`` exits 0 for)."""
        return bool(self.converged) and not self.poor_fit and all(img.ok for img in self.images)

    def single_image_esd(self) -> List[Dict[str, float]]:
        """Per image, the ESD each shared scalar would have from that image alone ({name: ESD}, reported units):
        its own normal matrix over (shared, own) inverted, at the joint solution."""
        out = []
        for img in self.images:
            cov = _inverse(img.normal) * self.esd_factor
            row = {}
            for j, name in enumerate(self.shared_names):
                s = img.par.scalars[img.names.index(name)]
                xj = float(self.X[j])
                row[name] = abs(s.dvalue_dx(xj)) * math.sqrt(max(float(cov[j, j]), 0.0))
            out.append(row)
        return out

    def to_dict(self) -> dict:
        """``{"converged", "ok", "chi2_nu", "poor_fit", "loss", "seconds", "shared", "shared_esd", "images":
        [Result.image_dict()]}`` (``poor_fit`` null when no fit is poor)."""
        return {"converged": bool(self.converged), "ok": self.ok, "chi2_nu": float(self.chi2_nu),
                "poor_fit": self.poor_fit or None, "loss": float(self.loss), "seconds": float(self.seconds),
                "shared": dict(self.shared), "shared_esd": dict(self.shared_esd),
                "images": [img.image_dict() for img in self.images]}

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written atomically to ``path`` when given."""
        return _json(self.to_dict(), path, indent)

    def summary(self) -> str:
        """The shared values ± ESD, then one line per image with its own values, and the fit statistics."""
        w = max([24] + [len(n) for n in self.shared_names])
        lines = [f"{'shared':{w}s} {'value':>16s} {'esd':>12s}"]
        lines += [f"{n:{w}s} {self.shared[n]:16.8g} {self.shared_esd[n]:12.4g}" for n in self.shared_names]
        for k, img in enumerate(self.images, start=1):
            own = [n for n in img.names if n not in self.shared]
            vals = "  ".join(f"{n} {img.values[n]:.6g}±{img.esd[n]:.2g}" for n in own)
            poor = "  POOR FIT" if img.poor_fit else ""
            lines.append(f"image {k} {img.path or ''}: {vals}  χ²/ν {img.chi2_nu:.4g}{poor}")
        return "\n".join(lines + _summary_end(self, f"images {len(self.images)}"))


def _summary_end(result, count: str) -> List[str]:
    """The closing lines of a summary: the notes, the statistics (``count``: pixels or images) and convergence, and
    the poor-fit reason."""
    lines = [f"note: {n}" for n in result.notes]
    lines.append(f"loss {result.loss:.8g}  χ²/ν {result.chi2_nu:.4g}  {count}  iterations {result.iterations}  "
                 f"{result.seconds:.2f} s  {'' if result.converged else 'NOT converged: '}{result.message}")
    return lines + ([result.poor_fit.replace("poor fit", "POOR FIT", 1)] if result.poor_fit else [])


def _json(d: dict, path: Optional[str], indent: int) -> str:
    """JSON text of ``d``; also written atomically to ``path`` when given."""
    text = json.dumps(d, indent=indent, allow_nan=True)
    if path is not None:
        atomic_write(path, (text + "\n").encode())
    return text


# ---------------------------------------------------------------------------------------------------------------
# from the last state to the results


class _Statistics(NamedTuple):
    """What finishing a fit computes once for all its images: the objective on the final stage's pixels, its loss,
    the normal equations, the covariance of each image's x (its parameterisation's order) and of the shared scalars,
    the ESD factor, the overall χ²/ν, per image the loss (one image: the fit's, priors included) on those pixels and
    on all usable ones and χ²/ν, and the undetermined combinations."""

    objective: Objective
    loss: float
    normal: object
    covariances: List[torch.Tensor]
    shared_covariance: torch.Tensor
    esd_factor: float
    chi2_nu: float
    losses: List[float]
    losses_all: List[float]
    chi2_nus: List[float]
    degenerate: List[List[str]]


def _final_normal(state: FitState):
    """(objective, loss, BlockNormal, models): the fit's target on the pixels the final stage fitted (every usable
    one when no final stage ran; its passes reported as 'ESDs'), with the final minimiser's normal equations when
    they can be reused at ``state.x``."""
    pb, f, x = state.problem, state.final, state.x
    same = f is None or all(np.array_equal(a, b) for a, b in zip(f.pixels, pb.usable_index))
    objective = pb.objective_on(pixels=None if same else f.pixels, what="ESDs")
    if (f is not None and f.normal is not None and f.target == pb.target.name and torch.equal(f.x, x)
            and list(f.normal[0]) == list(range(pb.layout.n))):
        return objective, objective.loss(x), f.normal[1], f.normal[2]
    L, blk, models = objective.normal(x)
    return objective, L, blk, models


def _image_chi2(pb: Problem, objective: Objective, models) -> List[float]:
    """Pearson χ²/ν_i per image, with ν_i = n_i − own_i − n_s·n_i/N: the n_s shared scalars shared out by pixels
    (N pixels in all), so that Σ ν_i = N − n as in the overall χ²/ν."""
    lay, n_all = pb.layout, max(objective.n_pixels, 1)
    out = []
    for i, t in enumerate(objective.image_terms(models, "chi2")):
        n_i = len(objective.index[i])
        out.append(float(t.sum()) / max(n_i - len(lay.own_pos[i]) - len(lay.shared) * n_i / n_all, 1.0))
    return out


def _statistics(state: FitState) -> _Statistics:
    """Covariances (dense with the undetermined combinations named, or blockwise through the Schur complement for
    many images), ESD factor and χ² of a fit's last state."""
    pb, lay = state.problem, state.problem.layout
    objective, L, blk, models = _final_normal(state)
    if lay.n == 0:
        chi2, k, degenerate = objective.chi2_reduced(models, 0), 1.0, []
        covs, shared = [torch.zeros(0, 0, dtype=pb.par.dtype)] * len(pb.pars), torch.zeros(0, 0, dtype=pb.par.dtype)
    elif choose_solve(blk) is DENSE:
        cov, chi2, k, L, degenerate = covariance(objective, state.x, pb.options.esd_scale, normal=(blk, models))
        covs = [cov[idx][:, idx] for idx in
                (torch.as_tensor([lay.position(i, j) for j in range(p.n)]) for i, p in enumerate(pb.pars))]
        shared = cov[:len(lay.shared), :len(lay.shared)]
    else:
        chi2 = objective.chi2_reduced(models, lay.n)
        k, degenerate = esd_factor(pb.options.esd_scale, pb.target.likelihood, chi2), []
        shared, cross, own = schur_covariance(blk)
        shared, cross, own = shared * k, [c * k for c in cross], [c * k for c in own]
        covs = []
        for i, p in enumerate(pb.pars):
            order = torch.as_tensor(list(lay.shared_pos[i]) + list(lay.own_pos[i]), dtype=torch.long)
            block, c = image_covariance(shared, cross[i], own[i]), torch.zeros(p.n, p.n, dtype=shared.dtype)
            c[order[:, None], order[None, :]] = block
            covs.append(c)
    one, same = len(pb.pars) == 1, objective.n_pixels == sum(len(i) for i in pb.usable_index)
    losses = [float(L)] if one else objective.image_losses(state.x, models)
    losses_all = losses if same else ([pb.objective.loss(state.x)] if one else pb.objective.image_losses(state.x))
    return _Statistics(objective, float(L), blk, covs, shared, k, chi2, losses, losses_all,
                       _image_chi2(pb, objective, models), degenerate)


def _convergence(state: FitState, degenerate) -> Tuple[bool, str]:
    """(converged, message) of the final stage, with the undetermined combinations."""
    f = state.final
    if state.problem.layout.n == 0:
        return True, "nothing to refine"
    if f is None:
        return False, "no final stage minimised (max_iter = 0, or only preliminary stages ran)"
    if not torch.equal(f.x, state.x):
        return False, "a stage after the final one moved the model"
    return f.converged, f.message + "".join(
        f" (undetermined combination of {', '.join(c)}: fix one of them; their ESDs omit it)" for c in degenerate)


def _image_result(state: FitState, st: _Statistics, i: int, seconds: float) -> Result:
    """Image ``i``'s :class:`Result` (one image: the whole fit's loss; several: its share)."""
    pb, o = state.problem, state.problem.options
    par, x, cov, one = pb.pars[i], pb.layout.image_x(state.x, i), st.covariances[i], len(pb.pars) == 1
    converged, message = _convergence(state, st.degenerate)
    x_esd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
    parameters, parameter_esd = propagate(par, x, cov)
    correlation = correlation_from_covariance(cov)
    return Result(
        converged=bool(converged), message=message, method=o.method, target=pb.target.name, names=par.names, x=x,
        x_esd=x_esd, values={s.name: float(s.value(x[j])) for j, s in enumerate(par.scalars)},
        esd={s.name: abs(s.dvalue_dx(float(x[j]))) * float(x_esd[j]) for j, s in enumerate(par.scalars)},
        parameters=parameters, parameter_esd=parameter_esd, covariance=cov,
        correlation=correlation, loss=st.losses[i], loss_all=float(st.losses_all[i]),
        loss_history=[h["loss"] for h in state.history], history=list(state.history), iterations=state.iterations,
        evaluations=state.evaluations, seconds=seconds, chi2_reduced=float(st.chi2_nus[i]),
        esd_factor=float(st.esd_factor), n_pixels=len(st.objective.index[i]), stages=list(state.stages),
        params=par.unpack(x), setup=par.setup, par=par, observed=pb.observed[i], pixels=st.objective.pixels(i),
        nanobragg_base=pb.flags[i], matrix_path=o.matrix_path if one else None,
        notes=pb.notes + tuple(near_degenerate_notes(par.names, correlation)),
        crystal_system=par.crystal_system, start_loss=state.start_loss, n_usable=len(pb.usable_index[i]),
        poor_fit=poor_fit_message(pb.target.likelihood, float(st.chi2_nus[i])), path=pb.paths[i],
        normal=None if one or st.normal.H is None else st.normal.H[i], geometry=o.geometry)


def finish(state: FitState, seconds: Optional[float] = None) -> Result:
    """The :class:`Result` of a one-image fit's last state: values, ESDs (covariance on the final stage's pixels),
    the final model's loss on all usable pixels, and the history.  ``seconds``: wall time to report (default: the
    stages' time).  A fit of several images: :func:`finish_many`."""
    if len(state.problem.pars) != 1:
        raise ValueError(f"finish: the state holds {len(state.problem.pars)} images; use finish_many")
    return _image_result(state, _statistics(state), 0, state.seconds if seconds is None else seconds)


def finish_many(state: FitState, seconds: Optional[float] = None) -> JointResult:
    """The :class:`JointResult` of a fit's last state: the shared values with ESDs and one :class:`Result` per
    image, from the joint normal matrix at the solution."""
    pb, x, lay = state.problem, state.x, state.problem.layout
    seconds = state.seconds if seconds is None else seconds
    st = _statistics(state)
    images = [_image_result(state, st, i, seconds) for i in range(len(pb.pars))]
    shared, shared_esd, par0 = {}, {}, pb.pars[0]
    for j, name in enumerate(lay.shared):
        s, xj = par0.scalars[lay.shared_pos[0][j]], float(x[j])
        shared[name] = float(s.value(torch.tensor(xj, dtype=torch.float64)))
        shared_esd[name] = abs(s.dvalue_dx(xj)) * math.sqrt(max(float(st.shared_covariance[j, j]), 0.0))
    converged, message = _convergence(state, st.degenerate)
    return JointResult(bool(converged), message, st.loss, seconds, state.iterations, state.evaluations,
                       pb.target.name, list(lay.shared), shared, shared_esd, st.shared_covariance,
                       correlation_from_covariance(st.shared_covariance), images, list(state.stages),
                       list(state.history), pb.notes, st.esd_factor, x, st.chi2_nu,
                       _overall_poor_fit(pb.target.likelihood, st.chi2_nu, images))
