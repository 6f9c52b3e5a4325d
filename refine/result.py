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

from nbtorch.lattice import reciprocal_matrix
from nbtorch.units import deg2rad, rad2deg

from .parameters import Parameterisation, total_rotation, xyz_angles

#: Reported model quantities: name → length.  ``beam_center`` is in mm (MOSFLM/DENZO/ADXV/CUSTOM) or pixels
#: (XDS/DIALS ORGX/ORGY), see ``Result.parameters['beam_center_unit']``.
REPORT_FIELDS = (
    ("cell", 6), ("misset_deg", 3), ("distance_mm", 1), ("beam_center", 2), ("detector_rotation_deg", 3),
    ("twotheta_deg", 1), ("wavelength_A", 1), ("ncells", 3), ("mosaic_deg", 1), ("fluence", 1), ("scale", 1),
    ("background", 3), ("water_size_um", 1),
)

# flags that the refined model replaces in the starting command line (plus output-only flags, which are dropped)
_REPLACED = {
    "-cell", "-mat", "-misset", "-misset_seed", "-N", "-Na", "-Nb", "-Nc", "-xtalsize", "-xtal_thick", "-xtal_width",
    "-xtal_height", "-mosaic", "-lambda", "-energy", "-fluence", "-flux", "-exposure", "-distance", "-close_distance",
    "-Xbeam", "-Ybeam", "-ORGX", "-ORGY", "-Xclose", "-Yclose", "-detector_rotx", "-detector_roty", "-detector_rotz",
    "-twotheta", "-water", "-oversample", "-interpolate", "-nointerpolate", "-pivot",
}
_OUTPUT_ONLY = {
    "-floatfile", "-intfile", "-noisefile", "-pgmfile", "-scale", "-pgmscale", "-adc", "-seed", "-nonoise", "-nopgm",
    "-printout", "-printout_pixel", "-noprogress", "-progress",
}


def _num(v: float) -> str:
    """Shortest text that reads back as the same float64."""
    v = float(v)
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


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
    def _crystal_flags(self, matrix_path: Optional[str], write_matrix: bool) -> List[str]:
        p = self.params
        cell = p.crystal.cell
        R = total_rotation(p)
        if self.setup.nanobragg_cell:
            mis = rad2deg(xyz_angles(R))
            return ["-cell", *(_num(v) for v in cell), "-misset", *(_num(v) for v in mis)]
        # -mat model: exact lattice, write the λ-scaled matrix A = λ·R·B(cell)
        if matrix_path is None:
            raise ValueError("the model came from a MOSFLM matrix (-mat): give matrix_path to write the refined matrix")
        lam = float(p.beam.wavelength)
        B = R @ reciprocal_matrix(cell)
        if write_matrix:
            from nbtorch.io.matrix import write_mosflm_matrix

            write_mosflm_matrix(matrix_path, (lam * B).detach().cpu().numpy(), cell=cell.detach().cpu().numpy(),
                                U=R.detach().cpu().numpy())
        return ["-mat", str(matrix_path)]

    def to_nanobragg_args(self, matrix_path: Optional[str] = None, write_matrix: bool = True,
                          base_args=None) -> List[str]:
        """The refined model as nanoBragg flags (a list of tokens).

        Starts from the starting model's flags (``base_args``, default the ones given to :func:`refine.fit`) with the
        refined flags replaced: ``-cell``+``-misset`` (XYZ decomposition of the total crystal rotation) or ``-mat``
        (a new MOSFLM matrix written to ``matrix_path`` when the model came from a matrix), ``-Na -Nb -Nc``,
        ``-mosaic``, ``-lambda``, ``-fluence`` (scale × the starting fluence; ``-flux``/``-exposure`` dropped),
        ``-distance`` or ``-close_distance``, ``-Xbeam -Ybeam`` or ``-ORGX -ORGY`` (as the convention uses them),
        ``-detector_rotx/y/z``, ``-twotheta``, ``-water``, ``-oversample`` (explicit: the automatic rule depends on N
        and the distance), ``-interpolate``/``-nointerpolate`` when a structure-factor table is used, and ``-pivot``
        for the CUSTOM convention.  Output-only flags are dropped.  Without base flags the static set-up is written
        from :class:`~nbtorch.types.Setup` (ValueError for what flags cannot express, e.g. a structure-factor table).

        The background plane (refine-owned) has no nanoBragg flag: it is reported in ``parameters['background']``.
        ``nbtorch.from_nanobragg_args(result.to_nanobragg_args())`` re-simulates ``result.params`` (the -mat route is
        limited by the 8 decimals of the MOSFLM matrix format).
        """
        from nbtorch.args import parse_args

        base = base_args if base_args is not None else self.nanobragg_base
        matrix_path = matrix_path if matrix_path is not None else self.matrix_path
        p, st = self.params, self.setup
        out: List[str] = []
        if base is not None:
            o = parse_args(base)
            last = {f: i for i, f in enumerate(o.order)}
            for i, f in enumerate(o.order):
                if last[f] != i or f in _REPLACED or f in _OUTPUT_ONLY:
                    continue
                v = o[f]
                out.append(f)
                if v is True:
                    continue
                if isinstance(v, list):
                    out.extend(str(t) if isinstance(t, str) else _num(t) for t in v)
                else:
                    out.append(v if isinstance(v, str) else _num(v))
        else:
            out.extend(_setup_flags(p, st))
        out += self._crystal_flags(matrix_path, write_matrix)
        N = p.crystal.ncells
        out += ["-Na", _num(N[0]), "-Nb", _num(N[1]), "-Nc", _num(N[2])]
        if float(p.crystal.mosaic_spread) > 0 and st.n_domains > 1:
            out += ["-mosaic", _num(p.crystal.mosaic_spread)]
        out += ["-lambda", _num(p.beam.wavelength), "-fluence", _num(p.beam.fluence)]
        d = p.detector
        out += ["-close_distance" if st.distance_is_close else "-distance", _num(d.distance)]
        if st.convention in ("XDS", "DIALS"):
            out += ["-ORGX", _num(d.beam_center[0]), "-ORGY", _num(d.beam_center[1])]
        else:
            out += ["-Xbeam", _num(d.beam_center[0]), "-Ybeam", _num(d.beam_center[1])]
        out += ["-detector_rotx", _num(d.rotation[0]), "-detector_roty", _num(d.rotation[1]),
                "-detector_rotz", _num(d.rotation[2]), "-twotheta", _num(d.twotheta)]
        if st.convention == "CUSTOM":
            out += ["-pivot", st.pivot]
        if float(p.background.water_size) > 0:
            out += ["-water", _num(p.background.water_size)]
        out += ["-oversample", str(st.oversample)]
        if p.structure.F.numel() > 0:
            out.append("-interpolate" if st.interpolate else "-nointerpolate")
        return out

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


def _setup_flags(params, setup) -> List[str]:
    """Static nanoBragg flags of a Setup (no starting command line known)."""
    st = setup
    conv_flag = {"MOSFLM": "-mosflm", "DENZO": "-denzo", "ADXV": "-adxv", "XDS": "-xds", "DIALS": "-dials"}
    out: List[str] = []
    if params.structure.F.numel() > 0:
        raise ValueError("the model uses a structure-factor table; pass the starting flags (with -hkl) as "
                         "nanobragg_args to refine.fit to write it back as flags")
    if st.convention == "CUSTOM":
        for flag, v in (("-fdet_vector", st.fdet), ("-sdet_vector", st.sdet), ("-odet_vector", st.odet),
                        ("-beam_vector", st.beam), ("-polar_vector", st.polar_axis), ("-spindle_axis", st.spindle),
                        ("-twotheta_axis", st.twotheta_axis)):
            out += [flag, *(_num(t) for t in v)]
    else:
        out.append(conv_flag[st.convention])
    out += ["-pixel", _num(st.pixel_size), "-detpixels_f", str(st.fpixels), "-detpixels_s", str(st.spixels)]
    out += ["-default_F", _num(params.structure.default_F)]
    if st.nopolar:
        out.append("-nopolar")
    else:
        out += ["-polar", _num(params.beam.polarization)]
    out.append({"square": "-square_xtal", "round": "-round_xtal", "gauss": "-gauss_xtal",
                "tophat": "-tophat_spots"}[st.shape])
    if st.fudge != 1.0:
        out += ["-fudge", _num(st.fudge)]
    if st.phisteps > 1 or st.phi0 != 0.0:
        out += ["-phi", _num(st.phi0)]
        if st.phisteps > 1:
            out += ["-osc", _num(st.phistep * st.phisteps), "-phisteps", str(st.phisteps)]
    if len(st.sources) != 1 or tuple(st.sources[0][0]) != tuple(st.beam) or st.sources[0][1] != 1.0:
        raise ValueError("the model has several sources (divergence/dispersion/sourcefile); pass the starting flags as "
                         "nanobragg_args to refine.fit to write them back")
    if st.n_domains > 1:
        from nbtorch.mosaic import DEFAULT_MOSAIC_SEED, mosaic_domains

        axes, fr = mosaic_domains(deg2rad(float(params.crystal.mosaic_spread)), st.n_domains,
                                  DEFAULT_MOSAIC_SEED)
        if not np.allclose(np.asarray(axes), np.asarray(st.mosaic_axes), atol=1e-9):
            raise ValueError("the mosaic domains do not come from the default seed; pass the starting flags as "
                             "nanobragg_args to refine.fit")
        out += ["-mosaic_domains", str(st.n_domains)]
    if st.thickness_um > 0:
        out += ["-detector_thick", _num(st.thickness_um), "-detector_thicksteps", str(st.thicksteps)]
        out += ["-detector_abs", _num(1.0 / st.mu_per_um) if st.mu_per_um > 0 else "0"]
    for flag, on in (("-point_pixel", st.point_pixel), ("-curved_det", st.curved_det),
                     ("-oversample_thick", st.oversample_thick), ("-oversample_polar", st.oversample_polar),
                     ("-oversample_omega", st.oversample_omega)):
        if on:
            out.append(flag)
    if st.dmin > 0:
        out += ["-dmin", _num(st.dmin)]
    if st.roi is not None:
        out += ["-roi", *(str(v) for v in st.roi)]
    return out


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
