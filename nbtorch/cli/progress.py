"""Rendering with a text progress bar that advances tile by tile."""
from __future__ import annotations

import time
from typing import Optional, TextIO

import torch

from ..simulate import rendered_pixels, samples_per_pixel, simulate
from ..types import Params, Setup
from ..units import PERCENT

__all__ = ["Progress", "render"]


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

    One call of :func:`nbtorch.simulate`; the bar counts rendered pixels and advances after every tile (the tiles
    are set by ``setup.sample_budget``).  Returns photons/pixel ``[spixels, fpixels]`` (pixels outside the ROI or
    masked are 0), identical to :func:`nbtorch.simulate`.
    """
    if progress is None:
        return simulate(params, setup)
    per_pixel = samples_per_pixel(setup)
    n_pix = int(len(rendered_pixels(setup)))
    bar = Progress(progress, n_pix, f"{label}: {n_pix} pixels x {per_pixel} samples")
    bar.update(0)
    image = simulate(params, setup, progress=lambda done, total: bar.update(done))
    bar.update(n_pix)
    bar.close()
    return image
