"""Refinement results: values in reported units with standard uncertainties, correlations, history, JSON, plots, and
the refined model written back as nanoBragg flags.  :func:`finish` turns the last :class:`~refine.strategy.FitState`
into a :class:`Result` (uncertainties: :mod:`refine.report`)."""
from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from nbtorch.args import to_nanobragg_args
from nbtorch.io._atomic import atomic_write

from . import plots
from ..model.parameters import Parameterisation
from ..model.predict import predict_image
from .report import REPORT_FIELDS, correlation_from_covariance, covariance, propagate  # noqa: F401
from .strategy import FitState
from ..targets import Objective


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
    """Outcome of :func:`refine.fit` (immutable).

    Attributes:
        converged, message: whether the final stage met a convergence rule, and which (plus any undetermined
            combination of parameters).
        method, target: minimiser ('lm', 'lbfgs', 'adam') and target ('poisson', 'gaussian', 'lsq', 'anscombe').
        names: free scalars (:data:`refine.table.SCALARS`); ``x`` their refined increments [n] and ``x_esd`` ESDs.
        values, esd: {scalar name: reported value / ESD} (cell Å/deg, orientation increments mrad, distance and beam
            centre mm, tilts deg, λ Å, N cells, mosaic deg, scale, background photons, water µm).
        parameters, parameter_esd: the whole refined model in reported units (:data:`refine.report.REPORT_FIELDS`;
            the beam centre in mm and in the convention's pixels) and ESDs (0 for fixed quantities).
        covariance [n, n] (of x), correlation [n, n].
        loss: final loss (data + priors) on the fitted pixels; loss_all: the final model's loss on all usable pixels;
            start_loss: the starting model's; loss_history: the loss after every iteration of every stage, each on
            its stage's own pixels, model and target; history: per-iteration dicts (stage, iteration, loss, step,
            damping, accepted, seconds, pixels); stages: per-stage summaries (with ``loss_all``).
        iterations, evaluations, seconds: totals over stages (wall time includes set-up and ESDs).
        chi2_reduced: Pearson χ²/(n − p) on the fitted pixels; esd_factor: the factor applied to H⁻¹.
        poor_fit: '' or why the fit is poor (a likelihood target with χ²/ν outside [1/3, 3],
            :data:`POOR_FIT_CHI2`, and the likely causes); ``ok``: converged and not poor.
        n_pixels: pixels in the final fit; n_usable: usable pixels.
        params, setup: the refined :class:`~nbtorch.types.Params` and the model's Setup; par: the
        :class:`~refine.parameters.Parameterisation`; crystal_system: the one refined; observed: image [slow, fast];
        pixels: bool [slow, fast] of the fitted pixels.
        nanobragg_base: the starting model's nanoBragg flags (list) if known; matrix_path: where
        :meth:`to_nanobragg_args` writes a MOSFLM matrix for ``-mat`` models; notes: what the fit had to say
        (automatic crystal system, degenerate pairs).
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

    @property
    def ok(self) -> bool:
        """Converged and not a poor fit (what ``nbtorch-refine`` exits 0 for)."""
        return bool(self.converged) and not self.poor_fit

    # ------------------------------------------------------------------ images
    def model_image(self) -> torch.Tensor:
        """The refined model image [slow, fast] (photons/pixel, including the background plane)."""
        return predict_image(self.par, self.x)

    def residual_image(self) -> torch.Tensor:
        """observed − model [slow, fast] (0 outside the fitted pixels)."""
        r = self.observed - self.model_image()
        return torch.where(torch.as_tensor(self.pixels), r, torch.zeros_like(r))

    # ------------------------------------------------------------------ nanoBragg flags
    def to_nanobragg_args(self, matrix_path: Optional[str] = None, write_matrix: bool = True,
                          base_args=None) -> List[str]:
        """The refined model as nanoBragg flags (a list of tokens), by :func:`nbtorch.to_nanobragg_args`.

        Every value a Params/Setup pair expresses is written from the refined model (``-cell``+``-misset``, or
        ``-mat`` with a new MOSFLM matrix written to ``matrix_path`` for models from a matrix; ``-Na -Nb -Nc``,
        ``-mosaic``, ``-lambda``, ``-fluence`` (scale × the starting fluence), ``-distance`` or ``-close_distance``,
        the beam centre as the convention writes it (``-Xbeam/-Ybeam`` mm, ``-ORGX/-ORGY`` pixels), detector
        rotations, ``-twotheta``, ``-water``, an explicit ``-oversample`` …); from the starting flags (``base_args``,
        default the ones given to :func:`refine.fit`) only what a model cannot express is copied: ``-hkl``,
        ``-mask``, source and divergence flags, a non-default ``-mosaic_seed``.  ValueError for what flags cannot
        express (e.g. a structure-factor table without starting flags).

        The background plane (refine-owned) has no nanoBragg flag: it is reported in ``parameters['background']``.
        ``nbtorch.from_nanobragg_args(result.to_nanobragg_args())`` re-simulates ``result.params`` (the -mat route is
        limited by the 8 decimals of the MOSFLM matrix format).
        """
        base = base_args if base_args is not None else self.nanobragg_base
        matrix_path = matrix_path if matrix_path is not None else self.matrix_path
        return to_nanobragg_args(self.params, self.setup, base=base, matrix_path=matrix_path,
                                 write_matrix=write_matrix)

    def nanobragg_command(self, **kw) -> str:
        """:meth:`to_nanobragg_args` as one shell-quoted string."""
        return " ".join(shlex.quote(t) for t in self.to_nanobragg_args(**kw))

    # ------------------------------------------------------------------ JSON and text
    def to_dict(self) -> dict:
        """Plain-Python summary (what :meth:`to_json` writes); does not change the result."""
        notes = list(self.notes)
        try:
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
        }

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            atomic_write(path, (text + "\n").encode())
        return text

    def summary(self) -> str:
        """Human-readable table of the free scalars with ESDs and flags, the notes, and the fit statistics."""
        lines = [f"{'parameter':24s} {'value':>16s} {'esd':>12s}  {'unit':6s} flag"]
        for s in self.par.scalars:
            lines.append(f"{s.name:24s} {self.values[s.name]:16.8g} {self.esd[s.name]:12.4g}  {s.unit:6s} "
                         f"{'/'.join(s.spec.flags)}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"loss {self.loss:.8g}  χ²/ν {self.chi2_reduced:.4g}  pixels {self.n_pixels}  "
                     f"iterations {self.iterations}  {self.seconds:.2f} s  "
                     f"{'' if self.converged else 'NOT converged: '}{self.message}")
        if self.poor_fit:
            lines.append(self.poor_fit.replace("poor fit", "POOR FIT", 1))
        return "\n".join(lines)

    # ------------------------------------------------------------------ plots
    def plot(self, path: Optional[str] = None, log: bool = True):
        """Figure with observed / model / residual images and the loss per stage (:func:`refine.plots.plot_fit`);
        saved to ``path`` when given, atomically (:func:`nbtorch.io.atomic_write_from`)."""
        return plots.plot_fit(self, path, log)

    def plot_loss(self, path: Optional[str] = None):
        """The loss per stage (:func:`refine.plots.plot_loss`); saved to ``path`` when given, atomically."""
        return plots.plot_loss(self, path)


# ---------------------------------------------------------------------------------------------------------------
# from the last state to a Result


def _statistics_objective(state: FitState):
    """(objective, normal): the fit's target on the pixels the final stage fitted (all usable ones when no final
    stage ran), and the final minimiser's normal equations when they can be reused at ``state.x``."""
    pb, f = state.problem, state.final
    if f is None or np.array_equal(f.pixels, pb.usable_index):
        objective = pb.objective
    else:
        o = pb.options
        objective = Objective(pb.par, pb.observed, f.pixels, pb.target, o.chunk_pixels, fused=o.fused)
    normal = None
    if (f is not None and f.normal is not None and f.target == pb.target.name and torch.equal(f.x, state.x)
            and list(f.normal[0]) == list(range(pb.par.n))):
        normal = f.normal[1:]
    return objective, normal


def _convergence(state: FitState) -> Tuple[bool, str]:
    """(converged, message) of the final stage."""
    f = state.final
    if state.problem.par.n == 0:
        return True, "nothing to refine"
    if f is None:
        return False, "no final stage minimised (max_iter = 0, or only preliminary stages ran)"
    if not torch.equal(f.x, state.x):
        return False, "a stage after the final one moved the model"
    return f.converged, f.message


def finish(state: FitState, seconds: Optional[float] = None) -> Result:
    """The :class:`Result` of a fit's last state: values, ESDs (covariance on the final stage's pixels), the
    final model's loss on all usable pixels, and the history.  ``seconds``: wall time to report (default: the
    stages' time)."""
    pb, x, par, o = state.problem, state.x, state.problem.par, state.problem.options
    objective, normal = _statistics_objective(state)
    converged, message = _convergence(state)
    if par.n:
        cov, chi2, k, L, degenerate = covariance(objective, x, o.esd_scale, normal=normal)
        for combo in degenerate:
            message += f" (undetermined combination of {', '.join(combo)}: fix one of them; their ESDs omit it)"
    else:
        cov, k = torch.zeros(0, 0, dtype=par.dtype), 1.0
        L, chi2 = objective.loss(x), objective.chi2_reduced(objective.model(x), 0)
    x_esd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
    parameters, parameter_esd = propagate(par, x, cov)
    base = o.nanobragg_args
    base = shlex.split(base) if isinstance(base, str) else (None if base is None else [str(t) for t in base])
    return Result(
        converged=bool(converged), message=message, method=o.method, target=pb.target.name, names=par.names, x=x,
        x_esd=x_esd, values={s.name: float(s.value(x[i])) for i, s in enumerate(par.scalars)},
        esd={s.name: abs(s.dvalue_dx(float(x[i]))) * float(x_esd[i]) for i, s in enumerate(par.scalars)},
        parameters=parameters, parameter_esd=parameter_esd, covariance=cov,
        correlation=correlation_from_covariance(cov),
        loss=float(L), loss_history=[h["loss"] for h in state.history], history=list(state.history),
        iterations=state.iterations, evaluations=state.evaluations,
        seconds=state.seconds if seconds is None else seconds, chi2_reduced=float(chi2), esd_factor=float(k),
        n_pixels=objective.n_pixels, stages=list(state.stages), params=par.unpack(x), setup=par.setup, par=par,
        observed=pb.observed, pixels=objective.pixels(), nanobragg_base=base, matrix_path=o.matrix_path,
        notes=pb.notes, crystal_system=par.crystal_system,
        loss_all=float(L) if objective is pb.objective else pb.objective.loss(x), start_loss=state.start_loss,
        n_usable=len(pb.usable_index), poor_fit=poor_fit_message(pb.target.likelihood, float(chi2)))
