"""The refine programs: ``nbtorch-refine`` (:mod:`.fit`, its ``--images`` modes :mod:`.many`), ``nbtorch-sweep``
(:mod:`.sweep`) and ``nbtorch-demo`` (:mod:`.demo`), with the checks they share (:mod:`.checks`)."""
from .fit import main  # noqa: F401  (the nbtorch-refine entry point)
