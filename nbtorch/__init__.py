"""nbtorch: differentiable X-ray crystal diffraction image simulation with nanoBragg's physics, in PyTorch.

Public API::

    params, setup = nbtorch.from_nanobragg_args("-cell 100 100 100 90 90 90 -default_F 100 -N 5 ...")
    image = nbtorch.simulate(params, setup)        # photons/pixel, [slow, fast]
    flags = nbtorch.to_nanobragg_args(params, setup)  # and back to nanoBragg flags
"""
import gc as _gc

from .interrupt import quiet_startup as _quiet_startup

_quiet_startup()  # first: Ctrl-C while a console script imports torch ends it quietly (nbtorch.interrupt)

# Importing torch makes about a million objects, none of them garbage: the collector's passes over them took ≈ 10 %
# of the import (≈ 0.1 s of every process).  Off while the package is imported, then as it was.
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    from .args import from_nanobragg_args, parse_args, to_nanobragg_args  # noqa: E402
    from .simulate import crystal_orientations, crystal_rotation, simulate  # noqa: E402
    from .spots import predict_spots  # noqa: E402
    from .pytree import get_leaf, replace_leaf, tree_leaves, tree_map  # noqa: E402
    from .types import Background, Beam, Crystal, Detector, Params, Setup, Structure  # noqa: E402
    from .validate import check_params  # noqa: E402
finally:
    if _gc_was_enabled:
        _gc.enable()

__all__ = [
    "simulate", "from_nanobragg_args", "to_nanobragg_args", "parse_args", "check_params", "crystal_orientations",
    "crystal_rotation", "predict_spots",
    "Params", "Crystal", "Beam", "Detector", "Structure", "Background", "Setup",
    "get_leaf", "replace_leaf", "tree_leaves", "tree_map",
]
__version__ = "0.1.0"
