"""refine: fit nbtorch models to observed diffraction images.

    import nbtorch, refine
    params, setup = nbtorch.from_nanobragg_args(flags)
    result = refine.fit(observed, params, setup, free=["cell", "orientation", "distance", "beam_center", "scale"])
    print(result.summary())
    result.to_json("fit.json")
    nbtorch.from_nanobragg_args(result.to_nanobragg_args())   # re-simulates the fit

    # the same fit, driven stage by stage (a notebook, a study)
    state = refine.prepare(observed, params, setup, refine.FitOptions(free=("distance", "beam_center")))
    for stage in refine.default_stages():
        state = refine.run_stage(state, stage)
    result = refine.finish(state)

One image or many, it is one pipeline (see docs/refine.md for the diagram): :mod:`refine.model` (the refinable
scalars, parameterisation, prediction), :mod:`refine.targets` (losses, pixels, the objective),
:mod:`refine.minimise` (Levenberg–Marquardt with its linear solves, L-BFGS, Adam), :mod:`refine.pipeline` (options,
problem, stages, results), :mod:`refine.studies` (Optuna), :mod:`refine.scaleout` (Dask) and :mod:`refine.cli`.
"""
import nbtorch.interrupt  # noqa: F401  (first: a console script interrupted while importing is quiet)
from .minimise.lm import MinimizeResult, levenberg_marquardt
from .minimise.optim import adam, lbfgs
from .model.cells import CRYSTAL_SYSTEMS, detect_crystal_system, symmetrize_cell
from .model.degeneracy import Degeneracy, degenerate_pairs
from .model.parameters import Parameterisation, Scalar, pack, parameterise, total_rotation, unpack, xyz_angles
from .model.predict import Predict, make_predict, predict_image
from .model.table import DEFAULT_FREE, GROUPS, REPORT_FIELDS, SCALARS, ScalarSpec
from .ensemble import fit_structure_factors
from .pipeline.fit import fit, fit_many, fit_options
from .pipeline.options import METHODS, FitOptions
from .pipeline.problem import FitState, prepare
from .pipeline.report import covariance
from .pipeline.result import ImageResult, JointResult, Result, finish, finish_many
from .pipeline.stages import Stage, default_stages
from .pipeline.strategy import run_stage, schedule
from .targets import TARGETS, Objective, make_target, select_pixels, usable_mask

__all__ = [
    "fit", "fit_options", "fit_many", "fit_structure_factors", "JointResult", "ImageResult", "FitOptions", "Result", "METHODS", "covariance",
    "prepare", "run_stage", "finish", "finish_many", "FitState", "Stage", "default_stages", "schedule",
    "parameterise", "Parameterisation", "pack", "unpack", "Scalar", "SCALARS", "ScalarSpec", "GROUPS",
    "DEFAULT_FREE", "CRYSTAL_SYSTEMS", "symmetrize_cell", "detect_crystal_system", "total_rotation", "xyz_angles",
    "make_predict", "Predict", "predict_image",
    "make_target", "TARGETS", "Objective", "usable_mask", "select_pixels",
    "degenerate_pairs", "Degeneracy",
    "levenberg_marquardt", "lbfgs", "adam", "MinimizeResult", "REPORT_FIELDS",
]
