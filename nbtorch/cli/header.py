"""SMV header values of nanoBragg's ``-intfile``/``-noisefile`` images, computed from (Params, Setup) (spec §1.7, §4).

nanoBragg writes, after SIZE1/SIZE2, the detector geometry in several programs' conventions.  The values are derived
from the detector frame exactly as the C program reports them (spec §4 step 5):

* ``close = pix0·o'``, ``distance = close/ratio`` with ``ratio = beam·(R·o0)`` **without** the two-theta rotation
  (stale after ``-twotheta``, spec Q12);
* ``(Fbeam, Sbeam)`` = projections of ``distance·beam − pix0`` onto ``f'``, ``s'``; ``Fclose = −pix0·f'``,
  ``Sclose = −pix0·s'``; ``ORGX = Fclose/p + ½``, ``ORGY = Sclose/p + ½``;
* ``DIALS_ORIGIN = (pix0·(0,0,1), pix0·(0,1,0), pix0·(−1,0,0))``;
* ``BEAM_CENTER_X/Y``: the input (or default) ``-Xbeam``/``-Ybeam`` in mm, not recomputed.

All lengths in mm, angles in degrees, λ in Å; every value is formatted with C's ``%g`` by
:func:`nbtorch.io.smv.nanobragg_header_items`.  A detector of panels has no one frame to report: its header
(:func:`panel_header_items`) holds the pixel size, nominal distance, wavelength and spindle, and says how the panels
are laid out.
"""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch

from ..conventions import CONVENTION_TABLE
from ..detector import detector_frame, mm_to_orgx
from ..io.smv import nanobragg_header_items
from ..rotation import rot_xyz
from ..types import Detector, Params, Setup
from ..units import deg2rad

__all__ = ["HeaderGeometry", "header_geometry", "header_beam_center", "smv_header_items", "panel_header_items"]


class HeaderGeometry(NamedTuple):
    """Reported detector geometry (floats; mm unless stated).

    pix0: (x, y, z) lab position of the outer corner of pixel (0, 0); fdet, sdet, odet: rotated unit vectors;
    close: perpendicular sample–plane distance; distance: close/ratio (nanoBragg's stale ratio, spec Q12);
    fbeam, sbeam: direct-beam spot along fast/slow from pix0; fclose, sclose: near point along fast/slow;
    orgx, orgy: XDS origin (1-based pixels); dials_origin: (x, y, z) of pix0 in the DIALS frame.
    """

    pix0: Tuple[float, float, float]
    fdet: Tuple[float, float, float]
    sdet: Tuple[float, float, float]
    odet: Tuple[float, float, float]
    close: float
    distance: float
    fbeam: float
    sbeam: float
    fclose: float
    sclose: float
    orgx: float
    orgy: float
    dials_origin: Tuple[float, float, float]


def _cpu64(det: Detector) -> Detector:
    return Detector(*(torch.as_tensor(t).detach().to("cpu", torch.float64) for t in det))


def header_geometry(params: Params, setup: Setup) -> HeaderGeometry:
    """The geometry nanoBragg reports in its log and SMV headers (spec §4 step 5), computed in float64 on the CPU.

    ``params``: a :class:`~nbtorch.types.Params` with an unbatched detector (``distance`` ``[]``, ``beam_center``
    ``[2]``, ``rotation`` ``[3]``, ``twotheta`` ``[]``); ``setup``: the matching :class:`~nbtorch.types.Setup`.
    Returns a :class:`HeaderGeometry` of Python floats.
    """
    det = _cpu64(params.detector)
    if det.distance.dim() != 0:
        raise ValueError(
            f"header_geometry needs an unbatched detector, got distance of shape {tuple(det.distance.shape)}")
    fr = detector_frame(det, setup)
    beam = torch.tensor(setup.beam, dtype=torch.float64)
    o0 = torch.tensor(setup.odet, dtype=torch.float64)
    ratio = float((beam * (rot_xyz(deg2rad(det.rotation)) @ o0)).sum())  # no two-theta (spec Q12)
    pix0 = fr.pix0
    close = float((pix0 * fr.odet).sum())
    distance = close / ratio
    v = distance * beam - pix0
    fbeam, sbeam = float((v * fr.fdet).sum()), float((v * fr.sdet).sum())
    fclose, sclose = -float((pix0 * fr.fdet).sum()), -float((pix0 * fr.sdet).sum())
    p = setup.pixel_size
    px = [float(x) for x in pix0]
    return HeaderGeometry(
        pix0=tuple(px), fdet=tuple(float(x) for x in fr.fdet), sdet=tuple(float(x) for x in fr.sdet),
        odet=tuple(float(x) for x in fr.odet), close=close, distance=distance, fbeam=fbeam, sbeam=sbeam,
        fclose=fclose, sclose=sclose, orgx=mm_to_orgx(fclose, p), orgy=mm_to_orgx(sclose, p),
        dials_origin=(px[2], px[1], -px[0]),
    )


def header_beam_center(params: Params, setup: Setup, extras, base_dir: str = ".") -> Tuple[float, float]:
    """``BEAM_CENTER_X/Y`` (mm) as nanoBragg writes them: the user's (or an input image header's) Xbeam/Ybeam.

    For XDS and DIALS, whose geometry ignores ``-Xbeam``/``-Ybeam`` (spec Q3), the default Xbeam/Ybeam is the near
    point Xclose/Yclose, which itself defaults to (ORGX − ½)·p, (ORGY − ½)·p (or to the detector centre without
    ``-ORGX``/``-ORGY``); :func:`nbtorch.args.build` applies these defaults.  ``extras``: the
    :class:`nbtorch.args.Extras` from :func:`nbtorch.args.build`; ``base_dir``: the directory relative file names
    (``-img``, ``-mask``) were read from.
    """
    return float(extras.xbeam_mm), float(extras.ybeam_mm)


def smv_header_items(params: Params, setup: Setup, extras, base_dir: str = ".") -> List[Tuple[str, str]]:
    """nanoBragg's SMV header items after SIZE2, in its order and text format (C ``%g``).

    ``params``/``setup``: the simulated model (unbatched detector); ``extras``: :class:`nbtorch.args.Extras` (for
    Xbeam/Ybeam, phi0, osc); ``base_dir``: where relative input names were resolved.
    Returns ``[(KEY, text), ...]``: PIXEL_SIZE (mm), DISTANCE (mm, close/ratio with the stale ratio, Q12),
    WAVELENGTH (Å), BEAM_CENTER_X/Y (mm, input values), ADXV_CENTER_X/Y = (Fbeam, Ds − Sbeam),
    MOSFLM_CENTER_X/Y = (Sbeam − p/2, Fbeam − p/2), DENZO_X/Y_BEAM = (Sbeam, Fbeam), DIALS_ORIGIN (mm),
    XDS_ORGX/ORGY (pixels), CLOSE_DISTANCE (mm), PHI, OSC_START, OSC_RANGE, TWOTHETA (deg), DETECTOR_SN=000,
    BEAMLINE=fake.  Pass them to :func:`nbtorch.io.smv.write_smv`.  A detector of panels: :func:`panel_header_items`.
    """
    if setup.panels is not None:
        return panel_header_items(params, setup, extras)
    g = header_geometry(params, setup)
    p = setup.pixel_size
    bx, by = header_beam_center(params, setup, extras, base_dir)
    # the beam spot as ADXV, MOSFLM and DENZO count it
    adxv, mosflm, denzo = (CONVENTION_TABLE[c].xy(g.fbeam, g.sbeam, p, setup.spixels)
                           for c in ("ADXV", "MOSFLM", "DENZO"))
    return nanobragg_header_items(
        pixel_size_mm=p,
        distance_mm=g.distance,
        wavelength_A=float(torch.as_tensor(params.beam.wavelength).detach().cpu()),
        beam_center_x_mm=bx,
        beam_center_y_mm=by,
        adxv_center_x_mm=adxv[0],
        adxv_center_y_mm=adxv[1],
        mosflm_center_x_mm=mosflm[0],
        mosflm_center_y_mm=mosflm[1],
        denzo_x_beam_mm=denzo[0],
        denzo_y_beam_mm=denzo[1],
        dials_origin_mm=g.dials_origin,
        xds_orgx_px=g.orgx,
        xds_orgy_px=g.orgy,
        close_distance_mm=g.close,
        phi_deg=float(extras.phi0),
        osc_start_deg=float(extras.phi0),
        osc_range_deg=float(extras.osc),
        twotheta_deg=float(torch.as_tensor(params.detector.twotheta).detach().cpu()),
    )


def panel_header_items(params: Params, setup: Setup, extras) -> List[Tuple[str, str]]:
    """SMV header items of a detector of panels (after SIZE2): PIXEL_SIZE (mm, the set-up's nominal pixel),
    DISTANCE (mm, where the beam meets the detector), WAVELENGTH (Å), PHI, OSC_START, OSC_RANGE (deg), PANELS (the
    count), PANEL_LAYOUT (``crystfel_slab``: a -geom file's data layout, else ``stacked``: panel after panel along
    slow), DETECTOR_SN=000, BEAMLINE=fake; numbers in C's ``%g``.  ``extras``: :class:`nbtorch.args.Extras`."""
    g = lambda x: "%g" % float(torch.as_tensor(x).detach().cpu())  # noqa: E731
    source = getattr(extras, "panels", None)
    layout = "stacked" if source is None or source.geometry is None else "crystfel_slab"
    return [("PIXEL_SIZE", g(setup.pixel_size)), ("DISTANCE", g(params.detector.distance)),
            ("WAVELENGTH", g(params.beam.wavelength)), ("PHI", g(extras.phi0)), ("OSC_START", g(extras.phi0)),
            ("OSC_RANGE", g(extras.osc)), ("PANELS", str(setup.n_panels)), ("PANEL_LAYOUT", layout),
            ("DETECTOR_SN", "000"), ("BEAMLINE", "fake")]
