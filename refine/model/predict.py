"""Prediction: the model photons at chosen pixels, ``simulate`` plus refine's background plane — the only copy.

``make_predict(par, setup, pixels)(x)`` → photons [n] at increments x (differentiable, torch.func-safe), rendered with
:func:`nbtorch.simulate.simulate_pixels`: memory and work scale with the pixels asked for, not with the detector.
With a point-spread function (``par.psf``) the pixels and a margin of the kernel radius are rendered and blurred
(:class:`~refine.model.psf.PixelBlur`); the background plane is added after the blur (a plane blurred by a kernel of
sum 1 is the plane, but for the photons lost off a panel's edge).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from nbtorch.simulate import rendered_pixels, simulate_pixels
from nbtorch.types import Setup
from .parameters import Parameterisation
from .psf import PixelBlur


def image_axes(setup: Setup) -> str:
    """The axes of the set-up's images, for messages: ``[slow, fast]``, or ``[panel, slow, fast]`` for a panel
    detector (``setup.image_shape``)."""
    return "[slow, fast]" if setup.panels is None else "[panel, slow, fast]"


def pixel_index(pixels, setup: Setup) -> np.ndarray:
    """Flat slow-major pixel indices (slow·fpixels + fast, plus panel·spixels·fpixels for a panel detector) int64 [n]
    of a pixel choice: None (every pixel ``setup`` renders: inside its ROI and mask), a bool image of
    ``setup.image_shape``, or indices (validated)."""
    shape, n = tuple(setup.image_shape), setup.n_pixels
    if pixels is None:
        return np.asarray(rendered_pixels(setup), dtype=np.int64)
    pixels = np.asarray(pixels.detach().cpu().numpy() if torch.is_tensor(pixels) else pixels)
    if pixels.dtype == bool:
        if pixels.shape != shape:
            raise ValueError(f"pixel selection has shape {pixels.shape}, expected {image_axes(setup)} = {shape}")
        return np.flatnonzero(pixels.reshape(-1)).astype(np.int64)
    idx = pixels.reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"pixel indices must be within [0, {n - 1}] (slow·fpixels + fast"
                         f"{'' if setup.panels is None else ' + panel·spixels·fpixels'})")
    return idx


def plane_basis(setup: Setup, dtype=torch.float64, device=None, index=None) -> torch.Tensor:
    """Background-plane basis [3, n]: 1, u, v with u, v ∈ [−½, ½] the fast/slow pixel-centre coordinates, at the flat
    pixel ``index`` [n] (default: every pixel, slow-major, n = ``setup.n_pixels``).  A panel detector's u, v are
    each panel's own (one plane, the same coefficients on every panel)."""
    F, S = setup.fpixels, setup.spixels
    if index is None:
        index = torch.arange(setup.n_pixels, device=device)
    k = torch.as_tensor(index, device=device)
    u = ((k % F).to(dtype) + 0.5) / F - 0.5
    v = (((k // F) % S).to(dtype) + 0.5) / S - 0.5
    return torch.stack([torch.ones_like(u), u, v])


class Predict:
    """Model photons at fixed pixels as a function of the increments: ``model(x)`` → [n].

    Attributes: ``par``, ``setup`` (the set-up rendered; a stage may broaden the spots), ``index`` (long [n], flat
    slow-major pixel indices), ``basis`` ([3, n] plane basis, or None when the model has no plane), ``region`` (long
    [n]: each pixel's plane, all 0 but in a spot-ROI fit's regions, ``par.boxes``), ``blur``
    (:class:`~refine.model.psf.PixelBlur` of ``par.psf``, or None), ``fused`` (passed to
    :func:`~nbtorch.simulate.simulate_pixels`).
    """

    def __init__(self, par: Parameterisation, setup: Setup, index: np.ndarray, fused: Optional[bool] = None):
        self.par, self.setup, self.fused = par, setup, fused
        self.index = torch.as_tensor(index, dtype=torch.long, device=par.device)
        self.basis, self.region = None, None
        if par.has_plane() and par.boxes is not None:
            self.region, self.basis = par.boxes.basis(self.index, par.dtype, par.device)
        elif par.has_plane():
            self.basis = plane_basis(setup, par.dtype, par.device, self.index)
            self.region = torch.zeros_like(self.index)
        self.blur = None if par.psf is None else PixelBlur(par.psf, setup, index, par.device)

    n = property(lambda self: int(self.index.shape[0]), doc="Number of pixels predicted.")

    def bragg(self, x: torch.Tensor, check: bool = False, par: Optional[Parameterisation] = None) -> torch.Tensor:
        """What ``simulate`` gives at the pixels (photons [n]), blurred by the point-spread function when there is
        one; ``check`` validates the parameter values; ``par``: another parameterisation of the same scalars (an
        image of a batch), default ``self.par``."""
        par = self.par if par is None else par
        if self.blur is None:
            return simulate_pixels(par.unpack(x), self.setup, self.index, check=check, fused=self.fused)
        source = simulate_pixels(par.unpack(x), self.setup, self.blur.source, check=check, fused=self.fused)
        return self.blur(source, par.psf_fwhm(x))

    def background(self, x: torch.Tensor, par: Optional[Parameterisation] = None) -> torch.Tensor:
        """The background plane at the pixels (photons [n]; zeros when the model has none)."""
        if self.basis is None:
            return x.new_zeros(self.n)
        plane = (self.par if par is None else par).plane(x).reshape(-1, 3)
        return (plane.index_select(0, self.region) * self.basis.T).sum(-1)

    def plane_jacobian(self, slots, specs) -> torch.Tensor:
        """∂(model)/∂x [n, k] of the background plane's scalars (linear: the basis of each one's region, times its
        scale) — the closed form that spares a forward-mode tangent per plane scalar.  ``slots``: their positions in
        the returned columns; ``specs``: their :class:`~refine.model.table.ScalarSpec` (index c, or 3·region + c)."""
        J = self.basis.new_zeros(self.n, len(specs))
        for j, sp in zip(slots, specs):
            k, c = divmod(int(sp.index), 3)
            J[:, j] = torch.where(self.region == k, sp.scale * self.basis[c], 0.0)
        return J

    def __call__(self, x: torch.Tensor, check: bool = False, par: Optional[Parameterisation] = None) -> torch.Tensor:
        """Model photons [n] at increments ``x`` [n_par]: :meth:`bragg` + :meth:`background`."""
        m = self.bragg(x, check, par)
        return m if self.basis is None else m + self.background(x, par)


def make_predict(par: Parameterisation, setup: Optional[Setup] = None, pixels=None,
                 fused: Optional[bool] = None) -> Predict:
    """The :class:`Predict` (``model(x)`` → photons [n]) at ``pixels`` (as :func:`pixel_index` takes them) rendered
    with ``setup`` (default ``par.setup``)."""
    setup = par.setup if setup is None else setup
    return Predict(par, setup, pixel_index(pixels, setup), fused)


def predict_image(par: Parameterisation, x: torch.Tensor, setup: Optional[Setup] = None,
                  fused: Optional[bool] = None) -> torch.Tensor:
    """Model image of ``setup.image_shape`` ([slow, fast], or [panel, slow, fast]; photons/pixel, background plane
    included) at ``x``: every pixel ``setup`` (default ``par.setup``) renders, 0 elsewhere (outside its ROI or mask,
    or a smaller panel's padding).  No gradient."""
    model = make_predict(par, setup, None, fused)
    shape, n = tuple(model.setup.image_shape), model.setup.n_pixels
    with torch.no_grad():
        vals = model(x.detach(), check=True)
    if model.n == n:
        return vals.reshape(shape)
    return torch.zeros(n, dtype=vals.dtype, device=vals.device).index_put((model.index,), vals).reshape(shape)
