"""Shared synthetic cases for the refine tests: small, bright stills with plentiful spots (float64 throughout)."""
from __future__ import annotations

import math

import numpy as np
import torch

import nbtorch
from nbtorch.mosaic import matrix_to_xyz_angles
from nbtorch.rotation import rot_axis
from refine.model.parameters import total_rotation

#: 96×96 pixels of 0.2 mm at 60 mm, λ = 1 Å: 2θ up to ~12° (edge), spots every 5–8 px, peaks ~40000 photons.
BASE = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -lambda 1 -distance 60 -pixel 0.2 "
        "-detpixels 96 -oversample 1 -fluence 1e30")
#: Water cube (µm) giving ~10 photons/pixel at the BASE fluence (nanoBragg scales water by fluence², spec Q10).
WATER = 0.005
#: The same water background at fluence 1e31 (water intensity ∝ size³·fluence²).
WATER_1E31 = 0.005 * 10 ** (-2 / 3)


def model(extra: str = "", base: str = BASE):
    """(params, setup, flags) of BASE plus ``extra`` flags."""
    flags = f"{base} {extra}".strip()
    params, setup = nbtorch.from_nanobragg_args(flags, dtype=torch.float64)
    return params, setup, flags


def observe(params, setup, seed: int = 0, plane=None) -> torch.Tensor:
    """Poisson-noisy observation of the model (plus an optional background plane (c0, c_fast, c_slow))."""
    img = nbtorch.simulate(params, setup)
    if plane is not None:
        from refine.model.predict import plane_basis

        img = img + (torch.as_tensor(plane, dtype=img.dtype) @ plane_basis(setup, img.dtype)).reshape(img.shape)
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(img, generator=g)


def misorientation_deg(p1, p2) -> float:
    """Angle (deg) of the rotation between the crystal orientations of two models."""
    R = total_rotation(p1) @ total_rotation(p2).T
    c = (float(torch.trace(R)) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def rotate_crystal(params, axis, angle_deg: float):
    """The model with its crystal rotated by ``angle_deg`` about the lab ``axis`` (expressed as a new misset)."""
    ax = torch.as_tensor(axis, dtype=torch.float64)
    ax = ax / torch.linalg.vector_norm(ax)
    R = rot_axis(ax, torch.tensor(math.radians(angle_deg), dtype=torch.float64)) @ total_rotation(params)
    mis = torch.tensor(np.degrees(matrix_to_xyz_angles(R.numpy())), dtype=torch.float64)
    c = params.crystal
    return params._replace(crystal=c._replace(misset=mis, orientation=torch.eye(3, dtype=torch.float64)))


def with_detector(params, **changes):
    return params._replace(detector=params.detector._replace(**changes))


def with_crystal(params, **changes):
    return params._replace(crystal=params.crystal._replace(**changes))


def with_beam(params, **changes):
    return params._replace(beam=params.beam._replace(**changes))


def indexing_start(params, setup, seed: int = 1, cell_scale=(1.008, 0.994, 1.01), angle_deg: float = 0.4,
                   distance_mm: float = 1.5, bc_px=(2.5, -2.2), scale: float = 2.0):
    """A starting model with errors typical of indexing: cell ~1 %, orientation 0.3–0.5° about a random axis,
    distance 1–2 mm, beam centre 2–3 px, fluence × 2."""
    rng = np.random.default_rng(seed)
    p = rotate_crystal(params, rng.normal(size=3), angle_deg)
    cell = p.crystal.cell.clone()
    cell[:3] = cell[:3] * torch.tensor(cell_scale, dtype=torch.float64)
    p = with_crystal(p, cell=cell)
    # beam_center is (x, y) in mm; for MOSFLM x is the slow coordinate, for XDS the fast one; either way shift by px
    bc = p.detector.beam_center + torch.tensor(bc_px, dtype=torch.float64) * setup.pixel_size
    p = with_detector(p, distance=p.detector.distance + distance_mm, beam_center=bc)
    return with_beam(p, fluence=p.beam.fluence * scale)


def beam_center_error_px(p, truth, setup) -> float:
    """Largest beam-centre error in pixels (``Detector.beam_center`` is in mm for every convention)."""
    return float((p.detector.beam_center - truth.detector.beam_center).abs().max()) / setup.pixel_size
