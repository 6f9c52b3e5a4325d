"""Detector.beam_center is in mm for every convention; XDS/DIALS -ORGX/-ORGY pixels are converted at the flags."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.cli.header import header_geometry
from nbtorch.conventions import CONVENTION_TABLE
from nbtorch.detector import beam_center_to_pixels, detector_frame, mm_to_orgx, orgx_to_mm

BASE = "-default_F 100 -cell 40 50 60 90 90 90 -N 3 -lambda 1 -distance 80 -detpixels_f 60 -detpixels_s 50"


@pytest.mark.parametrize("conv", ["-xds", "-dials"])
def test_orgx_is_held_in_mm(conv):
    p, s = nbtorch.from_nanobragg_args(f"{BASE} {conv} -pixel 0.2 -ORGX 50.5 -ORGY 47.25")
    assert p.detector.beam_center.tolist() == [(50.5 - 0.5) * 0.2, (47.25 - 0.5) * 0.2]
    g = header_geometry(p, s)
    assert (g.orgx, g.orgy) == pytest.approx((50.5, 47.25), abs=1e-12)
    assert beam_center_to_pixels(p.detector.beam_center, s.convention, s.pixel_size).tolist() == \
        pytest.approx([50.5, 47.25], abs=1e-12)
    # without -ORGX/-ORGY the near point is the detector centre, whatever -Xbeam says (spec Q3)
    p, s = nbtorch.from_nanobragg_args(f"{BASE} {conv} -pixel 0.2 -Xbeam 3 -Ybeam 4")
    assert p.detector.beam_center.tolist() == [60 * 0.2 / 2, 50 * 0.2 / 2]


def test_xds_beam_center_means_what_custom_does():
    """The XDS near point in mm is the CUSTOM convention's (fast, slow) from the corner of pixel (0, 0): the same
    Detector under both set-ups gives the same frame."""
    p, s = nbtorch.from_nanobragg_args(f"{BASE} -xds -ORGX 21.3 -ORGY 30.8 -detector_rotx 2 -twotheta 3")
    custom = s.replace(convention="CUSTOM")
    a, b = detector_frame(p.detector, s), detector_frame(p.detector, custom)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    img = nbtorch.simulate(p, s, fused=False)
    torch.testing.assert_close(nbtorch.simulate(p, custom, fused=False), img, rtol=0, atol=0)


@pytest.mark.parametrize("conv", ["-xds", "-dials"])
def test_flags_write_orgx_that_read_back_to_the_same_mm(conv):
    rng = np.random.default_rng(3)
    exact = 0
    for pixel in (0.1, 0.172, 0.075):
        p, s = nbtorch.from_nanobragg_args(f"{BASE} {conv} -pixel {pixel}")
        for _ in range(20):
            bc = torch.tensor(rng.uniform(-5.0, 12.0, size=2), dtype=torch.float64)
            q = p._replace(detector=p.detector._replace(beam_center=bc))
            flags = nbtorch.to_nanobragg_args(q, s)
            assert "-ORGX" in flags and "-Xbeam" not in flags
            q2, s2 = nbtorch.from_nanobragg_args(flags)
            # exact where a float ORGX gives the mm exactly, else to the last place: (ORGX − ½)·p misses some floats
            ulp = torch.as_tensor(np.spacing(bc.abs().numpy()))
            assert bool(((q2.detector.beam_center - bc).abs() <= ulp).all()), (pixel, bc.tolist())
            exact += int(torch.equal(q2.detector.beam_center, bc))
            org = float(flags[flags.index("-ORGX") + 1])
            assert org == pytest.approx(mm_to_orgx(float(bc[0]), pixel), rel=1e-12)
    assert exact > 30  # most values come back bit for bit
    # a value that came from -ORGX comes back exactly, with the same short text
    p, s = nbtorch.from_nanobragg_args(f"{BASE} {conv} -pixel 0.172 -ORGX 50.5 -ORGY 47.25")
    flags = nbtorch.to_nanobragg_args(p, s)
    assert flags[flags.index("-ORGX") + 1: flags.index("-ORGX") + 4] == ["50.5", "-ORGY", "47.25"]


def test_conversions_are_inverse():
    mm = torch.tensor([0.0, 1.7, -3.2], dtype=torch.float64)
    torch.testing.assert_close(orgx_to_mm(mm_to_orgx(mm, 0.172), 0.172), mm, rtol=0, atol=1e-15)
    assert orgx_to_mm(1.0, 0.1) == pytest.approx(0.05)  # the centre of the first pixel
    assert beam_center_to_pixels(torch.tensor([2.0, 3.0]), "MOSFLM", 0.1).tolist() == pytest.approx([20.0, 30.0])


@pytest.mark.parametrize("conv", sorted(CONVENTION_TABLE))
def test_convention_table_maps_the_default_beam_centre_as_the_spec_says(conv):
    """Spec §4, Q24: with 256² pixels of 0.1 mm the default beam spot is at 0-based pixel-centre (128.5, 128.5) in
    MOSFLM, half a pixel past the centre (128, 128) in DENZO and ADXV, the centre (127.5, 127.5) where the default is
    the near point; the SMV header's centre of each convention is the inverse mapping."""
    c, p, n = CONVENTION_TABLE[conv], 0.1, 256
    flag = "-fdet_vector 0 0 1" if conv == "CUSTOM" else "-" + conv.lower()
    params, setup = nbtorch.from_nanobragg_args(f"-default_F 1 -cell 40 50 60 90 90 90 -detpixels {n} -pixel {p} "
                                                + flag)
    assert (setup.convention, setup.fdet, setup.twotheta_axis) == (conv, *(c.vectors[i] for i in (0, 4)))
    assert setup.pivot == (c.pivot or "beam")
    spot = {"MOSFLM": 128.5, "DENZO": 128.0, "ADXV": 128.0}.get(conv, 127.5)
    f, s = c.fast_slow(*params.detector.beam_center.tolist(), p, n)
    assert (f / p - 0.5, s / p - 0.5) == pytest.approx((spot, spot), abs=1e-9)
    assert c.xy(f, s, p, n) == pytest.approx(tuple(params.detector.beam_center.tolist()), abs=1e-12)
