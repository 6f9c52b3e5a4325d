"""The refine programs: ``nbtorch-refine`` (:mod:`.fit`, its ``--images`` modes :mod:`.many`), ``nbtorch-sweep``
(:mod:`.sweep`), ``nbtorch-demo`` (:mod:`.demo`), their option table (:mod:`.table`) and what they share
(:mod:`.checks`)."""


def main(argv=None) -> int:
    """The ``nbtorch-refine`` entry point (:func:`refine.cli.fit.main`; imported on call, so that ``python -m
    refine.cli.fit`` runs a module not yet imported)."""
    from .fit import main as refine_main

    return refine_main(argv)
