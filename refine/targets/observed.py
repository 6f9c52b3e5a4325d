"""Reading an observed image for a model: the one place every refine entry (``nbtorch-refine``, its ``--images``
modes, ``nbtorch-sweep`` and ``refine.fit`` given a path) turns a file into photons on the model's detector."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch

from nbtorch.io.images import RAW_EXTENSIONS, HeaderWarning, ObservedImage, header_mismatches, read_image
from nbtorch.types import Params, Setup

def read_observed(path: str, setup: Setup, params: Optional[Params] = None, *, label: str = "OBSERVED",
                  overload: Optional[float] = None, adc: Optional[float] = None,
                  gain: Optional[float] = None) -> ObservedImage:
    """The image at ``path`` in photons, ``data`` [spixels, fpixels]: (value − ``adc``) / ``gain`` (None: the
    header's, else 0 and 1); raw float files take their shape from ``setup``; ``overload`` (counts) marks saturated
    pixels.  ``ValueError`` whose one line starts with ``label`` and the path when the file cannot be read or its
    size is not the model's.  With ``params``, first a :class:`~nbtorch.io.images.HeaderWarning` line for each of the
    header's pixel size (mm), distance (mm) and wavelength (Å) that disagrees with the model beyond the header's
    precision."""
    raw = os.path.splitext(path)[1].lower() in RAW_EXTENSIONS
    try:
        obs = read_image(path, shape=(setup.spixels, setup.fpixels) if raw else None, overload=overload, adc=adc,
                         gain=gain)
    except (ValueError, OSError, ImportError) as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"{label} {text}" if text.startswith(path) else f"{label} {path}: {text}") from None
    if params is not None:
        given = {"pixel_size_mm": ("-pixel", setup.pixel_size),
                 "wavelength_A": ("-lambda", float(params.beam.wavelength))}
        if not setup.distance_is_close:
            given["distance_mm"] = ("-distance", float(params.detector.distance))
        for line in header_mismatches(obs, f"{label} {path}", given):
            warnings.warn(line, HeaderWarning, stacklevel=2)
    if obs.data.shape != (setup.spixels, setup.fpixels):
        raise ValueError(f"{label} {path} is {obs.data.shape[1]}×{obs.data.shape[0]} pixels (fast × slow) but the "
                         f"flags describe a {setup.fpixels}×{setup.spixels} detector")
    return obs


def observed_array(observed, setup: Setup):
    """An observed image (tensor, array, :class:`nbtorch.io.images.ObservedImage` or a path read with
    :func:`nbtorch.io.images.read_image`, raw files taking their shape from ``setup``) → (float64 array [slow, fast],
    its own mask (bool [slow, fast]) or None)."""
    if isinstance(observed, str) or hasattr(observed, "__fspath__"):
        observed = read_observed(os.fspath(observed), setup, label="observed")
    if isinstance(observed, ObservedImage):
        return np.asarray(observed.data, dtype=np.float64), np.asarray(observed.mask, dtype=bool)
    if torch.is_tensor(observed):
        return observed.detach().cpu().double().numpy(), None
    return np.asarray(observed, dtype=np.float64), None
