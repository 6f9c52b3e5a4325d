"""refine: fit nbtorch models to observed diffraction images.

    import nbtorch, refine
    params, setup = nbtorch.from_nanobragg_args(flags)
    result = refine.fit(observed, params, setup, free=["cell", "orientation", "distance", "beam_center", "scale"])
    print(result.summary())
    result.to_json("fit.json")
    nbtorch.from_nanobragg_args(result.to_nanobragg_args())   # re-simulates the fit

Parameterisation (:mod:`refine.parameters`) → targets (:mod:`refine.targets`) → minimisers (:mod:`refine.lm`,
:mod:`refine.optim`) with a coarse-to-fine strategy (:mod:`refine.strategy`) → :class:`Result`
(:mod:`refine.result`).  See docs/refine.md.
"""
from .fit import METHODS, covariance, fit
from .lm import MinimizeResult, levenberg_marquardt
from .optim import adam, lbfgs
from .parameters import (
    CRYSTAL_SYSTEMS,
    DEFAULT_FREE,
    GROUPS,
    Parameterisation,
    Scalar,
    pack,
    parameterise,
    symmetrize_cell,
    total_rotation,
    unpack,
    xyz_angles,
)
from .result import REPORT_FIELDS, Result
from .strategy import Stage, default_stages
from .targets import TARGETS, Objective, make_target, select_pixels, usable_mask

__all__ = [
    "fit", "Result", "METHODS", "covariance",
    "parameterise", "Parameterisation", "pack", "unpack", "Scalar", "GROUPS", "DEFAULT_FREE", "CRYSTAL_SYSTEMS", "symmetrize_cell",
    "total_rotation", "xyz_angles",
    "make_target", "TARGETS", "Objective", "usable_mask", "select_pixels",
    "levenberg_marquardt", "lbfgs", "adam", "MinimizeResult",
    "Stage", "default_stages", "REPORT_FIELDS",
]
