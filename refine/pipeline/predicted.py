"""The refined model's predicted spot centroids as a DIALS reflection table (``nbtorch-refine --out-refl``), and the
rows of a ``.refl`` that belong to one experiment of a list.

:func:`predicted_table` keeps the input rows and every input column (bit for bit: ``flags`` included, no flag is
set or cleared) and adds or replaces ``xyzcal.px`` (fast px, slow px, the row's ``xyzobs.px.value`` frame z or 0;
pixel i spans [i, i + 1)), ``xyzcal.mm`` (x mm, y mm on the panel, φ0 in radians) from
:func:`nbtorch.spots.predict_spots` (stills convention, the image's first φ), and ``panel`` and ``id`` where the
input has none.  A row with a ``panel`` is predicted on that panel's plane, as DIALS predicts an indexed reflection
on the panel its table names: where the model's ray meets another panel, ``xyzcal.px`` is the point of the named
panel's plane the ray meets (outside that panel's pixel range).  Rows that are not predicted — Miller index (0, 0, 0)
(DIALS's unindexed spots), or a ray that meets no panel (no ``panel`` column) or runs away from the named panel's
plane — get ``xyzcal.px`` = ``xyzcal.mm`` = (0, 0, 0) (and panel 0 where the panel is added); :func:`predicted_rows`
tells them apart.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from nbtorch.io.refl import ReflectionTable
from nbtorch.spots import predict_spots
from nbtorch.units import deg2rad

__all__ = ["predicted_table", "predicted_rows", "rows_of_experiment", "check_rows"]


def rows_of_experiment(table: ReflectionTable, index: int, identifier: str = "") -> ReflectionTable:
    """The rows of ``table`` that belong to experiment ``index`` (0-based, its place in the experiment list) whose
    identifier is ``identifier``: rows whose ``id`` is the table's id for that identifier (its ``identifiers`` map),
    or ``index`` when the map or the identifier is empty.  Unindexed spots (``id`` −1) belong to none.  A table
    without an ``id`` column is one experiment's: all its rows.  The whole table (opaque columns kept) when every row
    belongs; else :meth:`ReflectionTable.select` (opaque columns such as shoeboxes left out).  ``ValueError`` naming
    the table when the identifier is not in a non-empty map."""
    if "id" not in table:
        return table
    key = index
    if identifier and table.identifiers:
        keys = [k for k, v in table.identifiers.items() if v == identifier]
        if not keys:
            known = ", ".join(f"{k}: {v!r}" for k, v in sorted(table.identifiers.items()))
            raise ValueError(f"{table.source}: no experiment identifier {identifier!r} (experiment {index}) in its "
                             f"identifiers ({known})")
        key = keys[0]
    mine = np.asarray(table["id"]) == key
    return table if bool(mine.all()) else table.select(mine)


def predicted_rows(table: ReflectionTable) -> np.ndarray:
    """Which rows of a :func:`predicted_table` were predicted → bool ``[N]`` (those without are all-zero
    ``xyzcal.px``, as written for unindexed spots and rays that miss)."""
    return np.any(np.asarray(table["xyzcal.px"]) != 0, axis=1)


def check_rows(table: ReflectionTable, setup) -> None:
    """Raise ``ValueError`` (naming the table and column) unless the rows can be predicted for a model of ``setup``:
    a ``miller_index`` column, and every ``panel`` one the model's detector has."""
    if "miller_index" not in table:
        raise ValueError(f"{table.source}: no column 'miller_index': only indexed reflections can be predicted "
                         "(index the spots first, e.g. dials.index)")
    if "panel" in table and table.nrows and int(np.max(table["panel"])) >= setup.n_panels:
        n = setup.n_panels
        raise ValueError(f"{table.source}: column 'panel' holds panel {int(np.max(table['panel']))}, but the model's "
                         f"detector has {n} panel{'s' if n != 1 else ''} (0 to {n - 1})")


def _predict(table: ReflectionTable, params, setup) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xyzcal.px [N, 3], xyzcal.mm [N, 3], predicted panel [N] (−1: none), predicted [N] bool) of the rows."""
    check_rows(table, setup)
    hkl = torch.as_tensor(np.asarray(table["miller_index"]).astype(np.int64))
    given = torch.as_tensor(np.asarray(table["panel"]).astype(np.int64)) if "panel" in table else None
    with torch.no_grad():
        spots = predict_spots(params, setup, hkl, panel=given)
    ok = spots.valid.cpu().numpy()
    z = np.asarray(table["xyzobs.px.value"], dtype=np.float64)[:, 2] if "xyzobs.px.value" in table else \
        np.zeros(table.nrows)
    px = np.stack([spots.fast_px.cpu().double().numpy(), spots.slow_px.cpu().double().numpy(), z], 1)
    phi = float(deg2rad(setup.phi0))
    mm = np.stack([spots.x_mm.cpu().double().numpy(), spots.y_mm.cpu().double().numpy(),
                   np.full(table.nrows, phi)], 1)
    px[~ok], mm[~ok] = 0.0, 0.0
    return px, mm, spots.panel.cpu().numpy(), ok


def predicted_table(table: ReflectionTable, params, setup, experiment_id: int) -> ReflectionTable:
    """``table`` (the rows to predict, e.g. :func:`rows_of_experiment`'s) with the predicted centroids of the model
    ``(params, setup)`` (:class:`~nbtorch.types.Params`, :class:`~nbtorch.types.Setup`; e.g. a refinement's
    ``result.params``, ``result.setup``): ``xyzcal.px``, ``xyzcal.mm`` added or replaced; ``panel`` (the predicted
    one) and ``id`` (``experiment_id``) added where the input has none; every other column, the identifiers and the
    opaque columns as read (the module docstring says what a named panel and an unpredicted row give).
    ``ValueError`` naming the table and column (:func:`check_rows`)."""
    px, mm, panel, _ = _predict(table, params, setup)
    new = {"xyzcal.px": px, "xyzcal.mm": mm}
    if "panel" not in table:
        new["panel"] = np.maximum(panel, 0).astype(np.uint64)
    if "id" not in table:
        new["id"] = np.full(table.nrows, int(experiment_id), dtype=np.int32)
    return table.with_columns(**new)
