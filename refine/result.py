"""Refinement results: values in user units with standard uncertainties, correlations, history, JSON, plots, and the
refined model written back as nanoBragg flags.

Uncertainties: at the solution the normal matrix H = JᵀWJ (+ prior terms) is built over every free scalar on the
fitted pixels; the covariance of the increments is ``cov = H⁻¹·k`` with k = 1 for likelihood targets (Poisson,
Gaussian: H is the Fisher information) and k = reduced χ² for least squares (``esd_scale='auto'``); ``'chi2'`` forces
the χ² scaling, ``'none'`` disables it.  Every reported quantity (cell, misset angles, detector values, …) is a
function of the increments, and its ESD is propagated with the Jacobian of that function (delta method).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.func import jacfwd

from nbtorch.units import rad2deg

from .parameters import Parameterisation, total_rotation, xyz_angles

#: Reported model quantities: name → length.  ``beam_center`` is in mm (MOSFLM/DENZO/ADXV/CUSTOM) or pixels
#: (XDS/DIALS ORGX/ORGY), see ``Result.parameters['beam_center_unit']``.
REPORT_FIELDS = (
    ("cell", 6), ("misset_deg", 3), ("distance_mm", 1), ("beam_center", 2), ("detector_rotation_deg", 3),
    ("twotheta_deg", 1), ("wavelength_A", 1), ("ncells", 3), ("mosaic_deg", 1), ("fluence", 1), ("scale", 1),
    ("background", 3), ("water_size_um", 1),
)


def report_vector(par: Parameterisation, x: torch.Tensor) -> torch.Tensor:
    """Every reported quantity at increments ``x`` as one flat vector (order of :data:`REPORT_FIELDS`); differentiable.

    ``scale`` is the fluence relative to the parameterisation's reference (the starting model)."""
    p = par.unpack(x)
    R = total_rotation(p)
    misset = rad2deg(xyz_angles(R))
    one = lambda t: t.reshape(1)  # noqa: E731
    parts = [
        p.crystal.cell, misset, one(p.detector.distance), p.detector.beam_center, p.detector.rotation,
        one(p.detector.twotheta), one(p.beam.wavelength), p.crystal.ncells, one(p.crystal.mosaic_spread),
        one(p.beam.fluence), one(p.beam.fluence / par.ref.beam.fluence), par.plane(x), one(p.background.water_size),
    ]
    return torch.cat([t.to(x.dtype) for t in parts])


def split_report(vec) -> Dict[str, object]:
    """Flat report vector → {name: float or list of floats}."""
    out, k = {}, 0
    v = [float(t) for t in vec]
    for name, n in REPORT_FIELDS:
        out[name] = v[k] if n == 1 else v[k: k + n]
        k += n
    return out


@dataclasses.dataclass
class Result:
    """Outcome of :func:`refine.fit`.

    Attributes:
        converged, message: whether the last stage met a convergence rule, and which.
        method, target: minimiser ('lm', 'lbfgs', 'adam') and target ('poisson', 'gaussian', 'lsq').
        names: free scalars (see :mod:`refine.parameters`); ``x`` their refined increments [n] and ``x_esd`` ESDs.
        values, esd: {scalar name: user value / ESD} (cell in Å/deg, orientation increments in mrad, distance mm,
            beam centre mm or px, tilts deg, λ Å, N cells, mosaic deg, scale, background photons, water µm).
        parameters, parameter_esd: the whole refined model in user units (:data:`REPORT_FIELDS`) and ESDs (0 for
            fixed quantities).
        covariance [n, n] (of x), correlation [n, n].
        loss: final loss (data + priors); loss_history: loss after every iteration of every stage; history: per
            iteration dicts (stage, iteration, loss, step, damping, accepted, seconds).
        iterations, evaluations, seconds: totals over stages (wall time includes set-up and ESDs).
        chi2_reduced: Pearson χ²/(n − p) at the solution; esd_factor: the factor applied to H⁻¹.
        n_pixels: pixels in the final fit; stages: per-stage summaries.
        params, setup: the refined :class:`~nbtorch.types.Params` and the model's Setup.
        par: the final :class:`~refine.parameters.Parameterisation`; observed: observed image [slow, fast];
        pixels: bool [slow, fast] of the fitted pixels.
        nanobragg_base: the starting model's nanoBragg flags (list) if known.
        matrix_path: where :meth:`to_nanobragg_args` writes a MOSFLM matrix for ``-mat`` models.
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
    notes: List[str] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------ images
    def model_image(self) -> torch.Tensor:
        """The refined model image [slow, fast] (photons/pixel, including the background plane)."""
        from nbtorch.simulate import simulate

        from .targets import plane_basis

        with torch.no_grad():
            img = simulate(self.params, self.setup)
            if self.par.has_plane():
                basis = plane_basis(self.setup, self.par.dtype, self.par.device)
                img = img + (self.par.plane(self.x) @ basis).reshape(img.shape)
        return img

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
        the beam centre as the convention uses it, detector rotations, ``-twotheta``, ``-water``, an explicit
        ``-oversample`` …); from the starting flags (``base_args``, default the ones given to :func:`refine.fit`)
        only what a model cannot express is copied: ``-hkl``, ``-mask``, source and divergence flags, a
        non-default ``-mosaic_seed``.  Output-only and derived flags (``-flux``, ``-N``, ``-xtalsize`` …) are not
        written.  ValueError for what flags cannot express (e.g. a structure-factor table without starting flags).

        The background plane (refine-owned) has no nanoBragg flag: it is reported in ``parameters['background']``.
        ``nbtorch.from_nanobragg_args(result.to_nanobragg_args())`` re-simulates ``result.params`` (the -mat route is
        limited by the 8 decimals of the MOSFLM matrix format).
        """
        from nbtorch.args import to_nanobragg_args

        base = base_args if base_args is not None else self.nanobragg_base
        matrix_path = matrix_path if matrix_path is not None else self.matrix_path
        return to_nanobragg_args(self.params, self.setup, base=base, matrix_path=matrix_path,
                                 write_matrix=write_matrix)

    def nanobragg_command(self, **kw) -> str:
        """:meth:`to_nanobragg_args` as one shell-quoted string."""
        import shlex

        return " ".join(shlex.quote(t) for t in self.to_nanobragg_args(**kw))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """Plain-Python summary (what :meth:`to_json` writes)."""
        try:
            flags = self.to_nanobragg_args(matrix_path=self.matrix_path or "refined.mat", write_matrix=False)
        except ValueError as exc:
            flags = None
            self.notes.append(f"nanobragg_args unavailable: {exc}")
        params = dict(self.parameters)
        params["beam_center_unit"] = "px" if self.setup.convention in ("XDS", "DIALS") else "mm"
        return {
            "converged": bool(self.converged),
            "message": self.message,
            "method": self.method,
            "target": self.target,
            "parameters": params,
            "esd": dict(self.parameter_esd),
            "free": list(self.names),
            "values": {k: float(v) for k, v in self.values.items()},
            "value_esd": {k: float(v) for k, v in self.esd.items()},
            "units": {s.name: s.unit for s in self.par.scalars},
            "correlation": [[float(v) for v in row] for row in self.correlation],
            "loss": float(self.loss),
            "loss_history": [float(v) for v in self.loss_history],
            "iterations": int(self.iterations),
            "evaluations": int(self.evaluations),
            "seconds": float(self.seconds),
            "chi2_reduced": float(self.chi2_reduced),
            "esd_factor": float(self.esd_factor),
            "n_pixels": int(self.n_pixels),
            "stages": self.stages,
            "nanobragg_args": flags,
            "notes": list(self.notes),
        }

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        """JSON text of :meth:`to_dict`; also written (atomically) to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, allow_nan=True)
        if path is not None:
            from nbtorch.io._atomic import atomic_write

            atomic_write(path, (text + "\n").encode())
        return text

    def summary(self) -> str:
        """Human-readable table of the free scalars with ESDs, and the fit statistics."""
        lines = [f"{'parameter':24s} {'value':>16s} {'esd':>12s}  unit"]
        for n in self.names:
            unit = next(s.unit for s in self.par.scalars if s.name == n)
            lines.append(f"{n:24s} {self.values[n]:16.8g} {self.esd[n]:12.4g}  {unit}")
        lines.append(f"loss {self.loss:.8g}  χ²/ν {self.chi2_reduced:.4g}  pixels {self.n_pixels}  "
                     f"iterations {self.iterations}  {self.seconds:.2f} s  "
                     f"{'' if self.converged else 'NOT converged: '}{self.message}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ plots
    def plot(self, path: Optional[str] = None, log: bool = True):
        """Figure with observed / model / residual images and the loss curve; saved to ``path`` when given.

        ``log``: show images as log10(1 + photons).  Needs matplotlib (imported lazily)."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        obs = self.observed.detach().cpu().numpy()
        mod = self.model_image().detach().cpu().numpy()
        res = self.residual_image().detach().cpu().numpy()
        tf = (lambda a: np.log10(1.0 + np.clip(a, 0, None))) if log else (lambda a: a)
        fig, ax = plt.subplots(1, 4, figsize=(16, 4))
        vmax = float(max(tf(obs).max(), tf(mod).max()))
        for a, img, title in ((ax[0], tf(obs), "observed"), (ax[1], tf(mod), "model")):
            im = a.imshow(img, vmin=0, vmax=vmax, cmap="viridis")
            a.set_title(title + (" (log10 1+I)" if log else ""))
            fig.colorbar(im, ax=a, fraction=0.046)
        lim = float(np.abs(res).max()) or 1.0
        im = ax[2].imshow(res, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax[2].set_title("observed − model")
        fig.colorbar(im, ax=ax[2], fraction=0.046)
        self._loss_axes(ax[3])
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return fig

    def _loss_axes(self, a):
        L = np.asarray(self.loss_history, dtype=float)
        floor = float(np.nanmin(L)) if len(L) else 0.0
        a.semilogy(np.arange(len(L)), L - floor + 1.0, "o-", ms=3)
        a.set_xlabel("iteration (all stages)")
        a.set_ylabel(f"loss − {floor:.6g} + 1")
        a.set_title("loss")

    def plot_loss(self, path: Optional[str] = None):
        """Loss curve over all iterations; saved to ``path`` when given."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, a = plt.subplots(figsize=(5, 4))
        self._loss_axes(a)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return fig


def correlation_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """Correlation matrix [n, n] of a covariance matrix (zero rows where the variance is 0)."""
    sd = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
    inv = torch.where(sd > 0, 1.0 / torch.where(sd > 0, sd, torch.ones_like(sd)), torch.zeros_like(sd))
    return cov * inv[:, None] * inv[None, :]


def propagate(par: Parameterisation, x: torch.Tensor, cov: torch.Tensor):
    """Reported values and ESDs of every :data:`REPORT_FIELDS` quantity (delta method through the Jacobian)."""
    vec = report_vector(par, x)
    if par.n == 0:
        return split_report(vec), split_report(torch.zeros_like(vec))
    J = jacfwd(lambda xx: report_vector(par, xx))(x)
    var = torch.einsum("ij,jk,ik->i", J, cov, J).clamp_min(0)
    return split_report(vec), split_report(torch.sqrt(var))
