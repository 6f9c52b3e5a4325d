"""Targets: losses (:mod:`.losses`), the observed image for a set-up (:mod:`.observed`), the pixels that take part
(:mod:`.pixels`) and the objective of N ≥ 1 images that minimisers call (:mod:`.objective`)."""
from .losses import TARGETS, Anscombe, Gaussian, LeastSquares, Poisson, Target, make_target  # noqa: F401
from .objective import Objective  # noqa: F401
from .observed import observed_array, read_observed  # noqa: F401
from .pixels import select_pixels, usable_mask  # noqa: F401
from ..model.predict import plane_basis  # noqa: F401  (re-exported)
