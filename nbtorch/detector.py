"""Detector geometry: conventions, pivots, pix0 and the rotated detector frame, sub-pixel offsets.

All lengths are in **mm**, angles in the :class:`~nbtorch.types.Detector` pytree are in degrees.  Positions are lab
frame vectors from the sample.  The conventions (spec §4) are :data:`nbtorch.conventions.CONVENTION_TABLE`.  Sample
positions, the curved detector, solid angle and sensor capture are computed where the pixel sum uses them, in
:mod:`nbtorch.kernel` (``sample_positions``, ``curve``, ``solid_angle``, ``capture_fraction``;
:func:`nbtorch.simulate.pixel_lab_positions` for given pixels).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Tuple

import torch

from .conventions import CONVENTION_TABLE
from .panels import PanelFrames, PanelLayout, layout_frames
from .rotation import rot_axis, rot_xyz
from .types import Detector, Params, Setup
from .units import deg2rad


class DetectorFrame(NamedTuple):
    """Rotated detector basis and origin (mm).

    pix0:  [3] outer corner of pixel (0, 0);  fdet, sdet, odet: [3] rotated unit vectors;
    close: []  perpendicular sample–plane distance pix0·odet;  distance: [] close/ratio as nanoBragg reports it (its
    ratio ignores twotheta, spec Q12; used by the curved detector).
    """

    pix0: torch.Tensor
    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    close: torch.Tensor
    distance: torch.Tensor


def _vec(v, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def orgx_to_mm(org_px, pixel_size: float):
    """XDS ``ORGX``/``ORGY`` (1-based pixel-centre coordinates) → mm from the outer corner of pixel (0, 0):
    ``(org − ½)·p`` (nanoBragg's Fclose/Sclose).  Floats or tensors; ``pixel_size`` in mm."""
    return (org_px - 0.5) * pixel_size


def mm_to_orgx(mm, pixel_size: float):
    """Inverse of :func:`orgx_to_mm`: mm from the outer corner of pixel (0, 0) → ``mm/p + ½`` pixels."""
    return mm / pixel_size + 0.5


def beam_center_to_pixels(beam_center_mm, convention: str, pixel_size: float):
    """``Detector.beam_center`` (mm, ``[..., 2]`` tensor or floats) → the same point in pixels as the convention
    counts them: ``(ORGX, ORGY)`` for XDS/DIALS (:func:`mm_to_orgx`), ``mm/p`` along the convention's own X, Y
    otherwise.  ``pixel_size`` in mm."""
    if CONVENTION_TABLE[convention].pixel_origin:
        return mm_to_orgx(beam_center_mm, pixel_size)
    return beam_center_mm / pixel_size


def detector_frame(det: Detector, setup: Setup) -> DetectorFrame:
    """Detector origin and rotated basis from the ``Detector`` pytree and the static ``Setup`` (spec §4)."""
    like = det.distance
    f0, s0, o0 = _vec(setup.fdet, like), _vec(setup.sdet, like), _vec(setup.odet, like)
    beam = _vec(setup.beam, like)
    R = rot_xyz(deg2rad(det.rotation))
    T = rot_axis(_vec(setup.twotheta_axis, like), deg2rad(det.twotheta))
    TR = T @ R
    ratio = (beam * (R @ o0)).sum(-1)
    if setup.distance_is_close:
        close = det.distance
        distance = close / ratio
    else:
        distance = det.distance
        close = torch.abs(ratio * distance)
    # the beam spot (beam pivot) or the near point (sample pivot) along fast, slow from the corner of pixel (0, 0)
    fb, sb = CONVENTION_TABLE[setup.convention].fast_slow(det.beam_center[..., 0], det.beam_center[..., 1],
                                                          setup.pixel_size, setup.spixels)
    f, s, o = TR @ f0, TR @ s0, TR @ o0
    if setup.pivot == "sample":
        pix0 = TR @ (-fb[..., None] * f0 - sb[..., None] * s0 + close[..., None] * o0)
    else:
        pix0 = -fb[..., None] * f - sb[..., None] * s + distance[..., None] * beam
    close_r = (pix0 * o).sum(-1)
    return DetectorFrame(pix0, f, s, o, close_r, close_r / ratio)


def panel_frames(det: Detector, setup: Setup) -> PanelFrames:
    """The lab frame of every panel for the detector parameters ``det``: a panel detector's (``setup.panels``,
    :func:`nbtorch.panels.layout_frames`), or nanoBragg's one panel (:func:`detector_frame`) as a detector of
    P = 1 (leaves ``[1, 3]``, ``[1]``)."""
    if setup.panels is not None:
        return layout_frames(setup.panels, det, setup)
    fr = detector_frame(det, setup)
    return PanelFrames(fr.pix0[None], fr.fdet[None], fr.sdet[None], fr.odet[None], fr.close[None], fr.distance)


def with_panels(params: Params, setup: Setup, layout: PanelLayout) -> Tuple[Params, Setup]:
    """``(params, setup)`` with the detector replaced by the panel detector ``layout``, as the file described it:
    ``distance`` its nominal distance (mm), beam centre, rotations and rigid-body motions zero; the set-up's
    ``fpixels``/``spixels`` from its largest panel, ``pixel_size`` its first panel's fast step (mm); everything else
    (crystal, beam, sources, sampling) kept.  The set-up's beam must run along the layout's (``ValueError``
    otherwise: the crystal and the panels would be in different lab frames)."""
    b, lb = setup.beam, layout.beam
    if sum(x * y for x, y in zip(b, lb)) < 1 - 1e-9:
        raise ValueError(f"the panel detector was described with the beam along {tuple(lb)} but the set-up's beam "
                         f"runs along {tuple(b)}: give -beam_vector {' '.join(f'{x:g}' for x in lb)}")
    like = params.detector.distance
    zeros = torch.zeros(len(layout.nodes), 3, dtype=like.dtype, device=like.device)
    det = Detector(torch.as_tensor(layout.distance, dtype=like.dtype, device=like.device), torch.zeros_like(
        params.detector.beam_center), torch.zeros_like(params.detector.rotation), torch.zeros_like(like), zeros, zeros)
    new = Setup.for_panels(layout, **{f.name: getattr(setup, f.name) for f in dataclasses.fields(Setup)
                                      if f.name not in ("fpixels", "spixels", "pixel_size", "panels", "roi", "mask",
                                                        "curved_det", "distance_is_close", "convention", "pivot")})
    return params._replace(detector=det), new


def subpixel_offsets(setup: Setup, dtype, device=None) -> torch.Tensor:
    """Sub-pixel centre offsets from a pixel's corner, ``[n², 2]`` (fast, slow) in mm; slow-major order (j, i)."""
    n, p = setup.oversample, setup.pixel_size
    d = p / n
    idx = torch.arange(n, dtype=dtype, device=device)
    jj, ii = torch.meshgrid(idx, idx, indexing="ij")  # j slow (outer), i fast (inner)
    return torch.stack([d * ii.reshape(-1) + d / 2, d * jj.reshape(-1) + d / 2], -1)


# ---------------------------------------------------------------------------------------------------------------
# geometry checks


def check_detector(det: Detector, setup: Setup) -> None:
    """Raise ``ValueError`` unless the detector plane lies in front of the sample and the beam can reach it.

    ``det``: concrete :class:`~nbtorch.types.Detector` (distance mm, beam centre mm or px, rotations and two-theta in
    degrees; any float dtype, detached here).  The beam must not run parallel to the rotated plane (before
    two-theta; |beam·normal| >= 1e-6), and the perpendicular sample–plane distance must exceed 1e-6 of |pix0| plus
    the detector's extent (mm).  Messages name the detector parameters and their flags.
    """
    if setup.panels is not None:
        return _check_panel_detector(det, setup)
    with torch.no_grad():
        det = type(det)(*(t.detach().double().cpu() for t in det))
        o0 = torch.tensor(setup.odet, dtype=torch.float64)
        ratio = float((torch.tensor(setup.beam, dtype=torch.float64) * (rot_xyz(deg2rad(det.rotation)) @ o0)).sum())
        if abs(ratio) < 1e-6:
            raise ValueError(
                "detector.rotation makes the beam run parallel to the detector plane (beam·normal = "
                f"{ratio:.3g}): the distance along the beam is undefined; check detector.rotation / -detector_rot*")
        frame = detector_frame(det, setup)
        size = setup.pixel_size * (setup.fpixels + setup.spixels)
        scale = float(torch.linalg.vector_norm(frame.pix0)) + size
        close = float(frame.close)
        if not close > 1e-6 * scale:
            raise ValueError(
                "detector geometry puts the detector plane behind or through the sample (close distance "
                f"{close:.3g} mm): check detector.distance, detector.rotation and detector.twotheta "
                "(-distance, -detector_rot*, -twotheta)")


def _check_panel_detector(det: Detector, setup: Setup) -> None:
    """Every panel of ``setup.panels`` in front of the sample: its plane's perpendicular distance > 1e-6 of its
    corner's distance plus its extent (mm)."""
    with torch.no_grad():
        det = type(det)(*(t.detach().double().cpu() for t in det))
        frames = panel_frames(det, setup)
        for k, p in enumerate(setup.panels.panels):
            extent = p.fpixels * (sum(c * c for c in p.fast) ** 0.5) + p.spixels * (sum(c * c for c in p.slow) ** 0.5)
            scale = float(torch.linalg.vector_norm(frames.pix0[k])) + extent
            close = float(frames.close[k])
            if not close > 1e-6 * scale:
                raise ValueError(
                    f"detector geometry puts panel {p.name!r} behind or through the sample (close distance "
                    f"{close:.3g} mm): check detector.distance, detector.rotation, detector.group_shift and "
                    "detector.group_rotation")
