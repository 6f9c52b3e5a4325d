"""Rendering with a text progress bar: ``simulate`` in horizontal bands of rows so the bar can advance."""
from __future__ import annotations

import time
from typing import Optional, TextIO

import torch

from ..simulate import simulate
from ..types import Params, Setup
from ..units import PERCENT

__all__ = ["Progress", "render", "BANDED_SAMPLES", "BANDS"]

#: Work (pixel samples) above which :func:`render` renders the image in horizontal bands.
BANDED_SAMPLES = 1 << 22
#: Number of bands of a banded rendering.
BANDS = 20


class Progress:
    """A one-line text progress bar on ``stream`` (carriage returns on a terminal, one line per update otherwise)."""

    def __init__(self, stream: TextIO, total: int, label: str):
        self.stream, self.total, self.label = stream, max(total, 1), label
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_pct = -1

    def update(self, done: int) -> None:
        """Show ``done`` of ``total`` units (only when the percentage changes)."""
        pct = int(PERCENT * done / self.total)
        if pct == self.last_pct:
            return
        self.last_pct = pct
        n = 30 * done // self.total
        msg = f"{self.label} [{'#' * n}{'-' * (30 - n)}] {pct:3d}% {time.perf_counter() - self.t0:6.1f} s"
        self.stream.write("\r" + msg if self.tty else msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line on a terminal."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def render(params: Params, setup: Setup, progress: Optional[TextIO] = None, label: str = "nbtorch") -> torch.Tensor:
    """``simulate(params, setup)`` with an optional text progress bar written to ``progress`` (a text stream).

    Large jobs (more than :data:`BANDED_SAMPLES` pixel samples) are rendered in :data:`BANDS` horizontal bands of
    rows (each a ``Setup.roi``), so the bar advances; small ones report start and end only.  Returns photons/pixel
    ``[spixels, fpixels]`` (pixels outside the ROI or masked are 0), identical to :func:`nbtorch.simulate`.
    """
    if progress is None:
        return simulate(params, setup)
    x0, x1, y0, y1 = setup.roi if setup.roi is not None else (0, setup.fpixels - 1, 0, setup.spixels - 1)
    per_pixel = setup.thicksteps * setup.oversample**2 * setup.n_sources * setup.n_domains * setup.phisteps
    n_pix, rows = (x1 - x0 + 1) * (y1 - y0 + 1), y1 - y0 + 1
    bar = Progress(progress, rows, f"{label}: {n_pix} pixels x {per_pixel} samples")
    bar.update(0)
    if n_pix * per_pixel <= BANDED_SAMPLES or rows == 1:
        image = simulate(params, setup)
        bar.update(rows)
        bar.close()
        return image
    nb = min(BANDS, rows)
    edges = [y0 + (rows * k) // nb for k in range(nb + 1)]
    image = None
    for k in range(nb):
        b0, b1 = edges[k], edges[k + 1] - 1
        band = simulate(params, setup.replace(roi=(x0, x1, b0, b1)), check=(k == 0))
        if image is None:
            image = band  # zero outside this band: later bands fill their rows in
        else:
            image[b0 : b1 + 1] = band[b0 : b1 + 1]
        bar.update(edges[k + 1] - y0)
    bar.close()
    return image
