"""Structure factors from many stills: |F| of the asymmetric unit refined jointly with every still's own model
(:func:`fit_structure_factors`), in this process or on Dask; docs/refine.md, "Structure factors from many stills".

:mod:`.asu` (reflection classes of the P1 table, gemmi), :mod:`.fmodel` (log-scale parameters, restraints),
:mod:`.design` (a shot's pixels as a sparse linear function of F²), :mod:`.shots` (per-shot fits and each shot's
share of the F objective), :mod:`.backend` (local or Dask shards), :mod:`.run` (the outer cycles),
:mod:`.checkpoint`, :mod:`.result` (MTZ, JSON lines, the cycles' table).
"""
from .asu import AsuMap, asu_map
from .fmodel import FModel, Restraints
from .result import EnsembleResult
from .run import fit_structure_factors

__all__ = ["fit_structure_factors", "EnsembleResult", "Restraints", "FModel", "AsuMap", "asu_map"]
