"""Results of a joint fit (:func:`refine.fit_many`): the shared values with ESDs, and per image its own values, ESDs,
correlations and refined model as nanoBragg flags.  Uncertainties come from the joint normal matrix at the solution,
inverted blockwise (:func:`refine.schur.schur_covariance`)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Dict, List, Optional, Tuple

import torch

from nbtorch.args import to_nanobragg_args
from nbtorch.io._atomic import atomic_write

from ..targets import Objective
from ..model.parameters import Parameterisation
from .report import correlation_from_covariance, propagate
from .result import poor_fit_message
from ..minimise.solve import _inverse, image_covariance, schur_covariance


@dataclasses.dataclass(frozen=True, eq=False)
class ImageResult:
    """One image of a joint fit.

    ``path`` (label), ``converged`` (the joint fit's), ``names`` (its free scalars, shared ones included, in its
    parameterisation's order), ``x`` [n_i] and ``x_esd``, ``values``/``esd`` ({scalar: reported value / ESD}),
    ``parameters``/``parameter_esd`` (the whole refined model in reported units, :data:`refine.report.REPORT_FIELDS`),
    ``covariance``/``correlation`` [n_i, n_i] (of x, joint: the shared scalars' uncertainty included), ``params``,
    ``setup``, ``par``, ``loss`` (this image's share of the final loss), ``normal`` [n_i, n_i] (this image's own
    normal matrix, in the order shared then own: what a single-image fit would have), ``nanobragg_base`` (the
    starting flags), ``matrix_path`` (where a ``-mat`` model's refined matrix goes), ``chi2_nu`` (its Pearson
    χ²/ν, :func:`image_chi2`) and ``poor_fit`` ('' or why its fit is poor, as a single-image fit says:
    :func:`refine.result.poor_fit_message`)."""

    path: Optional[str]
    converged: bool
    names: List[str]
    x: torch.Tensor
    x_esd: torch.Tensor
    values: Dict[str, float]
    esd: Dict[str, float]
    parameters: Dict[str, object]
    parameter_esd: Dict[str, object]
    covariance: torch.Tensor
    correlation: torch.Tensor
    params: object
    setup: object
    par: Parameterisation
    loss: float
    normal: torch.Tensor
    nanobragg_base: Optional[List[str]] = None
    matrix_path: Optional[str] = None
    chi2_nu: float = float("nan")
    poor_fit: str = ""

    @property
    def ok(self) -> bool:
        """Converged and not a poor fit."""
        return bool(self.converged) and not self.poor_fit

    def to_nanobragg_args(self, matrix_path: Optional[str] = None, write_matrix: bool = True) -> List[str]:
        """The refined model as nanoBragg flags (as :meth:`refine.Result.to_nanobragg_args`)."""
        return to_nanobragg_args(self.params, self.setup, base=self.nanobragg_base,
                                 matrix_path=matrix_path or self.matrix_path, write_matrix=write_matrix)

    def to_dict(self) -> dict:
        """``{"path", "converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd", "nanobragg_args"}`` (``poor_fit``
        null when the fit is not poor; flags None when they cannot express the model, e.g. a structure-factor table
        without starting flags)."""
        try:
            flags = self.to_nanobragg_args(matrix_path=self.matrix_path or "refined.mat", write_matrix=False)
        except ValueError:
            flags = None
        return {"path": self.path, "converged": bool(self.converged), "ok": self.ok,
                "chi2_nu": float(self.chi2_nu), "poor_fit": self.poor_fit or None,
                "parameters": dict(self.parameters, beam_center_unit="mm"), "esd": dict(self.parameter_esd),
                "nanobragg_args": flags}


def _full_normal(pb, X, final, batch: bool = True):
    """(loss, BlockNormal, objective) over every free scalar at X on all usable pixels with the fit's target:
    the final stage's when it ended at X with everything active, else computed."""
    lay = pb.layout
    obj = Objective(pb.pars, pb.observed, pb.usable, pb.target, pb.options.chunk_pixels, pb.options.fused,
                    layout=lay, batch=batch, progress=pb.reporter("ESDs"))
    if final is not None and final.normal is not None and torch.equal(final.x, X):
        active, blk, _ = final.normal
        if list(active) == list(range(lay.n)):
            return final.loss, blk, obj
    L, blk, _ = obj.normal(X)
    return L, blk, obj


def image_statistics(pb, obj: Objective, X) -> Tuple[List[float], List[float], List[float]]:
    """Per image at X, on its usable pixels with the fit's target (one simulation of every image): (loss, Pearson
    χ², degrees of freedom ν_i = n_i − own_i − n_s·n_i/N), with n_i its pixels, own_i its own free scalars and the n_s
    shared scalars shared out by pixels (N pixels in all), so that Σ ν_i = N − n as in the joint χ²/ν.  A loss is
    +inf where the model is not finite."""
    lay, n_all = pb.layout, max(obj.n_pixels, 1)
    losses, chi2, dof = [], [], []
    for i, m in enumerate(obj.models(X)):
        o = pb.observed[i].reshape(-1)[torch.as_tensor(pb.usable[i], device=m.device)].to(m.dtype)
        L = float(pb.target.loss_terms(m, o).sum())
        losses.append(L if bool(torch.isfinite(m).all()) and math.isfinite(L) else math.inf)
        chi2.append(float(pb.target.chi2_terms(m, o).sum()))
        n_i = len(pb.usable[i])
        dof.append(n_i - len(lay.own_pos[i]) - len(lay.shared) * n_i / n_all)
    return losses, chi2, dof


def _esd_factor(pb, chi2_nu: float) -> float:
    """1 for likelihood targets; the reduced χ² (all images) for least squares or ``esd_scale='chi2'``."""
    scale = pb.options.esd_scale
    if scale == "none" or (scale == "auto" and pb.target.likelihood):
        return 1.0
    return chi2_nu


def _image(pb, i: int, X, cov_block, H, loss: float, converged: bool, chi2_nu: float) -> ImageResult:
    """Image ``i``'s result from its (shared, own) covariance block, its loss and χ²/ν."""
    lay, par = pb.layout, pb.pars[i]
    x = lay.image_x(X, i)
    order = torch.as_tensor(list(lay.shared_pos[i]) + list(lay.own_pos[i]), dtype=torch.long)
    cov = torch.zeros_like(cov_block)
    cov[order[:, None], order[None, :]] = cov_block
    normal = H
    x_esd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
    parameters, parameter_esd = propagate(par, x, cov)
    return ImageResult(
        path=pb.paths[i], converged=converged, names=par.names, x=x, x_esd=x_esd,
        values={s.name: float(s.value(x[j])) for j, s in enumerate(par.scalars)},
        esd={s.name: abs(s.dvalue_dx(float(x[j]))) * float(x_esd[j]) for j, s in enumerate(par.scalars)},
        parameters=parameters, parameter_esd=parameter_esd, covariance=cov,
        correlation=correlation_from_covariance(cov), params=par.unpack(x), setup=par.setup, par=par, loss=loss,
        normal=normal, nanobragg_base=pb.flags[i], chi2_nu=chi2_nu,
        poor_fit=poor_fit_message(pb.target.likelihood, chi2_nu))


def _overall_poor_fit(likelihood: bool, chi2_nu: float, images: List[ImageResult]) -> str:
    """Why a joint fit is poor: its χ²/ν over all images (:func:`refine.result.poor_fit_message`), else the first
    poor image's reason with the count of poor images; '' when no fit is poor."""
    why = poor_fit_message(likelihood, chi2_nu)
    poor = [(k, img) for k, img in enumerate(images, start=1) if img.poor_fit]
    if why or not poor:
        return why
    k, img = poor[0]
    return (f"poor fit of {len(poor)} of {len(images)} images; image {k} ({img.path or 'no path'}): "
            f"{img.poor_fit.split(': ', 1)[-1]}")


@dataclasses.dataclass(frozen=True, eq=False)
class JointResult:
    """Outcome of :func:`refine.fit_many`.

    ``converged``/``message`` (the final stage's), ``loss`` (all images, all usable pixels, the fit's target),
    ``seconds``, ``iterations``, ``evaluations``, ``target``; ``shared_names``, ``shared``/``shared_esd`` ({scalar:
    reported value / ESD}), ``shared_covariance``/``shared_correlation`` [n_s, n_s] (of the increments);
    ``images`` (one :class:`ImageResult` each); ``stages``, ``history``, ``notes``; ``esd_factor``; ``X`` [n];
    ``chi2_nu`` (Pearson χ²/(N − n) over all images) and ``poor_fit`` ('' or why the fit is poor: the whole fit's
    χ²/ν, else the first poor image's; :func:`refine.result.poor_fit_message`)."""

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
    images: List[ImageResult]
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

    @classmethod
    def build(cls, pb, X, final, stages, history, seconds: float, batch: bool = True) -> "JointResult":
        """The result of a joint problem ``pb`` at X (``final``: the last non-preliminary MinimizeResult or None)."""
        L, blk, obj = _full_normal(pb, X, final, batch)
        Hs = blk.H
        losses, chi2, dof = image_statistics(pb, obj, X)
        chi2_nu = sum(chi2) / max(obj.n_pixels - pb.layout.n, 1)
        k = _esd_factor(pb, chi2_nu)
        cov_s, cross, own = schur_covariance(blk)
        cov_s, cross, own = cov_s * k, [c * k for c in cross], [c * k for c in own]
        converged = final is not None and torch.equal(final.x, X) and bool(final.converged)
        message = final.message if final is not None else "no final stage minimised"
        images = [_image(pb, i, X, image_covariance(cov_s, cross[i], own[i]), Hs[i], losses[i], converged,
                         chi2[i] / max(dof[i], 1.0)) for i in range(len(pb.pars))]
        par0, lay = pb.pars[0], pb.layout
        shared, shared_esd = {}, {}
        for j, name in enumerate(lay.shared):
            s, xj = par0.scalars[lay.shared_pos[0][j]], float(X[j])
            shared[name] = float(s.value(torch.tensor(xj, dtype=torch.float64)))
            shared_esd[name] = abs(s.dvalue_dx(xj)) * math.sqrt(max(float(cov_s[j, j]), 0.0))
        return cls(converged, message, float(L), seconds, sum(st.get("iterations", 0) for st in stages),
                   sum(st.get("evaluations", 0) for st in stages), pb.target.name,
                   list(lay.shared), shared, shared_esd, cov_s, correlation_from_covariance(cov_s), images, stages,
                   history, pb.notes, k, X, chi2_nu, _overall_poor_fit(pb.target.likelihood, chi2_nu, images))

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
        [ImageResult.to_dict()]}`` (``poor_fit`` null when no fit is poor)."""
        return {"converged": bool(self.converged), "ok": self.ok, "chi2_nu": float(self.chi2_nu),
                "poor_fit": self.poor_fit or None, "loss": float(self.loss), "seconds": float(self.seconds),
                "shared": dict(self.shared), "shared_esd": dict(self.shared_esd),
                "images": [img.to_dict() for img in self.images]}

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            atomic_write(path, (text + "\n").encode())
        return text

    def summary(self) -> str:
        """The shared values ± ESD, then one line per image with its own values, and the fit statistics."""
        lines = [f"{'shared':24s} {'value':>16s} {'esd':>12s}"]
        lines += [f"{n:24s} {self.shared[n]:16.8g} {self.shared_esd[n]:12.4g}" for n in self.shared_names]
        for k, img in enumerate(self.images, start=1):
            own = [n for n in img.names if n not in self.shared]
            vals = "  ".join(f"{n} {img.values[n]:.6g}±{img.esd[n]:.2g}" for n in own)
            poor = "  POOR FIT" if img.poor_fit else ""
            lines.append(f"image {k} {img.path or ''}: {vals}  χ²/ν {img.chi2_nu:.4g}{poor}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"loss {self.loss:.8g}  χ²/ν {self.chi2_nu:.4g}  images {len(self.images)}  iterations "
                     f"{self.iterations}  {self.seconds:.2f} s  {'' if self.converged else 'NOT converged: '}"
                     f"{self.message}")
        if self.poor_fit:
            lines.append(self.poor_fit.replace("poor fit", "POOR FIT", 1))
        return "\n".join(lines)
