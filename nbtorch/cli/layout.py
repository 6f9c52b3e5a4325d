"""The layout of the command line's image files: nanoBragg's one panel as simulated, or a detector of panels in its
file's layout (docs/cli.md "Detectors of panels").

* ``-geom``: the CrystFEL file's data layout, one array spanning every panel's ``min/max_fs/ss`` (slow index
  major; :func:`nbtorch.io.crystfel.panels_to_slab`), pixels in no panel 0.
* ``-expt`` (or a panel set-up without a CrystFEL file): the panels stacked ``[P, slow, fast]``, written as
  ``P·slow`` rows of ``fast`` pixels (raw float: the same bytes; SMV and PGM: the panels concatenated along slow);
  the padding of panels smaller than the largest is 0.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from ..pixels import mask_array, panel_extent_mask, rendered_mask

__all__ = ["FileImage", "file_image"]


class FileImage(NamedTuple):
    """An image as the output files hold it.

    image: 2-D ``[rows, fast]`` float32 photons/pixel; roi: the one-panel ``Setup.roi`` (None with panels); mask:
    uint8 of the image's shape, 0 where no pixel was rendered (masked, or in no panel), or None; on_panel: bool of
    the image's shape, True on the pixels of some panel (None for the one-panel detector); shape: the layout's own
    shape (``[S, F]``, the slab's, or ``[P, S, F]``); what: the layout in words for the summary ("" for one panel)."""

    image: np.ndarray
    roi: Optional[Tuple[int, int, int, int]]
    mask: Optional[np.ndarray]
    on_panel: Optional[np.ndarray]
    shape: Tuple[int, ...]
    what: str


def _rows(a: np.ndarray) -> np.ndarray:
    """An array of any rank as 2-D rows of its last axis."""
    return a.reshape(-1, a.shape[-1])


def file_image(image: np.ndarray, setup, extras) -> FileImage:
    """The simulated ``image`` (``setup.image_shape``, float32) in the layout of the output files.

    ``setup``: the simulated :class:`~nbtorch.types.Setup`; ``extras``: :class:`nbtorch.args.Extras` (its
    ``panels`` names the detector file whose layout the outputs take)."""
    if setup.panels is None:
        return FileImage(image, setup.roi, mask_array(setup), None, tuple(image.shape), "")
    source = getattr(extras, "panels", None)
    geometry = None if source is None else source.geometry
    if geometry is not None:
        from ..io.crystfel import panels_to_slab  # a -geom run's layout (the reader is loaded by then)
        to_file = lambda a: panels_to_slab(a, geometry)  # noqa: E731
        what = f"the data layout of {source.flag} {source.name}"
    else:
        to_file = lambda a: a  # noqa: E731
        what = f"{setup.n_panels} panels stacked [panel, slow, fast]"
    full = to_file(image)
    visited = to_file(rendered_mask(setup))
    on_panel = to_file(panel_extent_mask(setup))
    return FileImage(_rows(full), None, _rows(visited).astype(np.uint8), _rows(on_panel), tuple(full.shape),
                     f"{what}: {' x '.join(str(n) for n in full.shape)} pixels")
