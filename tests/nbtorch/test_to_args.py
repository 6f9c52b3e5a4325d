"""``nbtorch.to_nanobragg_args``: (Params, Setup) → nanoBragg flags, the inverse of ``from_nanobragg_args``.

Round trips: flags → (Params, Setup) → flags → the same Params, the same Setup and identical images, for every golden
command and for random flag sets (hypothesis); and clear errors for what flags alone cannot express.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbtorch
from nbtorch.io import write_hkl, write_smv, write_sources
from nbtorch.types import tree_leaves
from tests.golden import CASES, command, in_case_dir

BASE = "-default_F 100 -cell 50 50 50 90 90 90 -N 3 -detpixels 10 -pixel 0.5 -distance 80 -oversample 1"


def _same_params(p1, p2) -> bool:
    return all(torch.equal(a, b) for (_, a), (_, b) in zip(tree_leaves(p1), tree_leaves(p2)))


def _round_trip(flags, **kw):
    """flags → model → flags → model; returns both models and the written flags."""
    p1, s1 = nbtorch.from_nanobragg_args(flags)
    out = nbtorch.to_nanobragg_args(p1, s1, **kw)
    p2, s2 = nbtorch.from_nanobragg_args(out)
    return (p1, s1), (p2, s2), out


def _assert_identical(m1, m2, flags=None):
    (p1, s1), (p2, s2) = m1, m2
    diffs = [f for f in s1.__dataclass_fields__ if getattr(s1, f) != getattr(s2, f)]
    assert not diffs, (diffs, flags)
    assert _same_params(p1, p2), flags
    assert torch.equal(nbtorch.simulate(p1, s1), nbtorch.simulate(p2, s2)), flags


# ----------------------------------------------------------------------------------------------------------------
# goldens


@pytest.mark.parametrize("case", CASES)
def test_golden_commands_round_trip_exactly(case, tmp_path):
    """Every golden command (with its files as base flags) comes back as the same model; the image of a small ROI
    is identical."""
    with in_case_dir(case):
        cmd = command(case)
        p1, s1 = nbtorch.from_nanobragg_args(cmd)
        flags = nbtorch.to_nanobragg_args(p1, s1, base=cmd, matrix_path=str(tmp_path / "A.mat"))
        p2, s2 = nbtorch.from_nanobragg_args(flags)
    assert s1 == s2 and _same_params(p1, p2)
    assert "-floatfile" not in flags and "-nonoise" not in flags  # output options are not part of the model
    roi = dict(roi=(10, 13, 20, 22), mask=None)
    assert torch.equal(nbtorch.simulate(p1, s1.replace(**roi)), nbtorch.simulate(p2, s2.replace(**roi)))


def test_flags_are_minimal_and_readable():
    _, _, out = _round_trip(BASE)
    assert out == ["-cell", "50", "50", "50", "90", "90", "90", "-misset", "0", "0", "0", "-Na", "3", "-Nb", "3",
                   "-Nc", "3", "-square_xtal", "-default_F", "100", "-mosflm", "-distance", "80", "-pixel", "0.5",
                   "-detpixels_f", "10", "-detpixels_s", "10", "-Xbeam", "2.75", "-Ybeam", "2.75", "-oversample", "1"]


# ----------------------------------------------------------------------------------------------------------------
# random flag sets


_CUSTOM = (
    "-fdet_vector 0 0 1 -sdet_vector 0 -1 0 -odet_vector 1 0 0 -beam_vector 1 0 0 -polar_vector 0 0 1 "
    "-spindle_axis 0 0 1 -twotheta_axis 0 1 0",
    "-fdet_vector 1 0 0 -sdet_vector 0 1 0 -odet_vector 0 0 1 -beam_vector 0 0 1 -polar_vector 0 1 0 "
    "-spindle_axis 1 0 0 -twotheta_axis 0 -1 0",
)


def _num(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda x: repr(x))


@st.composite
def flag_sets(draw):
    """A random, valid nanoBragg command line on a small detector (every flag the model can express alone)."""
    f = ["-default_F", draw(_num(1, 200))]
    cell = [draw(_num(20, 60)) for _ in range(3)]
    angles = draw(st.one_of(st.just(["90", "90", "90"]), st.lists(_num(80, 100), min_size=3, max_size=3)))
    f += ["-cell", *cell, *angles]
    f += draw(st.sampled_from([[], ["-misset", *[repr(x) for x in draw(st.lists(st.floats(-180, 180), min_size=3,
                                                                              max_size=3))]],
                               ["-misset", "random", "-misset_seed", str(draw(st.integers(1, 10**6)))]]))
    f += draw(st.sampled_from([["-N", draw(_num(1, 5))],
                               ["-Na", draw(_num(0, 5)), "-Nb", draw(_num(1, 5)), "-Nc", draw(_num(1, 5))]]))
    f += draw(st.sampled_from([[], ["-round_xtal"], ["-gauss_xtal", "-fudge", draw(_num(0.5, 2))],
                               ["-tophat_spots"], ["-round_xtal", "-square_xtal"]]))
    f += draw(st.sampled_from([[], ["-lambda", draw(_num(0.8, 1.5))], ["-energy", draw(_num(8000, 15000))]]))
    f += draw(st.sampled_from([[], ["-fluence", draw(_num(1e26, 1e30))],
                               ["-flux", draw(_num(1e10, 1e13)), "-exposure", "0.5", "-beamsize", "0.05"]]))
    f += draw(st.sampled_from([[], ["-polar", draw(_num(-1, 1))], ["-nopolar"]]))
    nf, ns = draw(st.integers(3, 8)), draw(st.integers(3, 8))
    f += ["-detpixels_f", str(nf), "-detpixels_s", str(ns), "-pixel", draw(_num(0.2, 0.5))]
    f += [draw(st.sampled_from(["-distance", "-close_distance"])), draw(_num(40, 120))]
    conv = draw(st.sampled_from(["", "-mosflm", "-xds", "-adxv", "-denzo", "-dials", "custom"]))
    f += _CUSTOM[draw(st.integers(0, 1))].split() if conv == "custom" else ([conv] if conv else [])
    f += draw(st.sampled_from([[], ["-Xbeam", draw(_num(0, 3)), "-Ybeam", draw(_num(0, 3))],
                               ["-ORGX", draw(_num(1, 8)), "-ORGY", draw(_num(1, 8))],
                               ["-Xclose", draw(_num(0, 3))]]))
    if conv == "custom":
        f += draw(st.sampled_from([[], ["-pivot", "sample"], ["-pivot", "beam"]]))
    for rot in ("-detector_rotx", "-detector_roty", "-detector_rotz", "-twotheta"):
        f += draw(st.sampled_from([[], [rot, draw(_num(-5, 5))]]))
    f += draw(st.sampled_from([[], ["-mosaic", draw(_num(0, 2))],
                               ["-mosaic", draw(_num(0.1, 2)), "-mosaic_domains", str(draw(st.integers(1, 4)))]]))
    f += draw(st.sampled_from([[], ["-phi", draw(_num(-10, 10))], ["-osc", draw(_num(0.1, 2))],
                               ["-phisteps", str(draw(st.integers(0, 3)))],
                               ["-osc", draw(_num(0.1, 2)), "-phistep", draw(_num(0.1, 1))],
                               ["-phistep", draw(_num(0.1, 1)), "-phisteps", "3"]]))
    f += draw(st.sampled_from([[], ["-detector_thick", draw(_num(50, 300))],
                               ["-detector_thick", draw(_num(50, 300)), "-detector_abs", draw(_num(20, 500)),
                                "-detector_thicksteps", str(draw(st.integers(0, 3)))],
                               ["-detector_thick", "100", "-detector_abs", "0"]]))
    f += ["-oversample", str(draw(st.integers(1, 2)))]
    for extra in (["-water", draw(_num(0, 0.1))], ["-dmin", draw(_num(0, 5))], ["-point_pixel"], ["-curved_det"],
                  ["-oversample_thick"], ["-oversample_polar"], ["-oversample_omega"], ["-roi", "1", str(nf - 1), "0",
                                                                                        "1"]):
        f += draw(st.sampled_from([[], extra]))
    return f


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag_sets())
def test_random_flags_round_trip_to_identical_images(flags):
    m1, m2, out = _round_trip(flags)
    _assert_identical(m1, m2, flags)
    # and the written flags are a fixed point
    assert nbtorch.to_nanobragg_args(*m2) == out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("carried")
    hkl = np.array([(h, k, l) for h in range(-3, 4) for k in range(-3, 4) for l in range(-3, 4)])
    write_hkl(d / "P1.hkl", hkl, np.random.default_rng(0).uniform(10, 200, len(hkl)))
    mask = np.ones((8, 9), np.uint16)
    mask[2, 3] = 0
    write_smv(d / "mask.img", mask, {"PIXEL_SIZE": 0.4, "DISTANCE": 70, "WAVELENGTH": 1.1, "BEAM_CENTER_X": 1.2,
                                     "BEAM_CENTER_Y": 1.4, "OSC_RANGE": 1.0, "PHI": 3})
    write_sources(d / "sources.txt", np.array([[-10, 0, 0, 1, 1.0e-10], [-10, 0.01, 0, 1, 1.02e-10],
                                               [-10, 0, -0.02, 1, math.nan]]))
    return d


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(flags=flag_sets(), carried=st.sampled_from([
    "-hkl {d}/P1.hkl", "-hkl {d}/P1.hkl -N 2", "-hkl {d}/P1.hkl -nointerpolate -N 2", "-divergence 2 -divsteps 3",
    "-hdivrange 1 -vdivrange 2 -hdivsteps 2 -square_div", "-dispersion 0.5 -dispsteps 3", "-sourcefile {d}/sources.txt",
    "-mosaic 0.5 -mosaic_domains 3 -mosaic_seed 777"]))
def test_flags_with_carried_parts_round_trip(flags, carried, files):
    """What the model cannot express alone (F table, sources, a mosaic seed) comes from the base flags."""
    flags = flags + carried.format(d=files).split()
    if "-sourcefile" in carried:  # a -sourcefile λ is absolute: keep the base wavelength
        flags += ["-lambda", "1"]
    m1, m2, out = _round_trip(flags, base=flags)
    _assert_identical(m1, m2, flags)


def test_a_carried_mask_header_never_overrides_the_model(files):
    flags = f"-default_F 100 -cell 50 50 50 90 90 90 -N 3 -oversample 1 -mask {files}/mask.img".split()
    (p1, s1), _, _ = m = _round_trip(flags, base=flags)
    assert s1.pixel_size == 0.4 and s1.phisteps == 2 and s1.mask is not None  # the header set them
    _assert_identical(*m[:2], flags)


# ----------------------------------------------------------------------------------------------------------------
# what flags alone cannot express


def test_structure_factor_table_needs_base_flags(files):
    p, s = nbtorch.from_nanobragg_args(f"{BASE} -hkl {files}/P1.hkl")
    with pytest.raises(ValueError, match="structure-factor table.*-hkl"):
        nbtorch.to_nanobragg_args(p, s)


def test_sources_need_base_flags():
    p, s = nbtorch.from_nanobragg_args(BASE + " -divergence 1 -divsteps 3")
    with pytest.raises(ValueError, match="9 sources|5 sources"):
        nbtorch.to_nanobragg_args(p, s)
    # base flags that no longer give the sources are refused too
    with pytest.raises(ValueError, match="do not give"):
        nbtorch.to_nanobragg_args(p, s, base=BASE + " -divergence 2 -divsteps 3")


def test_mosaic_seed_comes_from_the_base_flags():
    flags = BASE + " -mosaic 0.5 -mosaic_domains 3 -mosaic_seed 777"
    p, s = nbtorch.from_nanobragg_args(flags)
    with pytest.raises(ValueError, match="-mosaic_seed"):
        nbtorch.to_nanobragg_args(p, s)
    out = nbtorch.to_nanobragg_args(p, s, base=flags)
    assert out[out.index("-mosaic_seed") + 1] == "777"


def test_mask_needs_base_flags(files):
    p, s = nbtorch.from_nanobragg_args(f"-default_F 100 -cell 50 -N 3 -oversample 1 -mask {files}/mask.img")
    with pytest.raises(ValueError, match="-mask"):
        nbtorch.to_nanobragg_args(p, s)


def test_matrix_model_needs_a_matrix_path(tmp_path):
    with in_case_dir("26_mat_hkl"):
        cmd = command("26_mat_hkl")
        p, s = nbtorch.from_nanobragg_args(cmd)
        with pytest.raises(ValueError, match="matrix_path"):
            nbtorch.to_nanobragg_args(p, s, base=cmd)
        out = nbtorch.to_nanobragg_args(p, s, base=cmd, matrix_path=str(tmp_path / "B.mat"), write_matrix=False)
    assert out[out.index("-mat") + 1] == str(tmp_path / "B.mat") and not (tmp_path / "B.mat").exists()
    assert "-cell" not in out and "-misset" not in out


def test_sensor_without_absorption_is_refused():
    p, s = nbtorch.from_nanobragg_args(BASE + " -detector_thick 100")
    with pytest.raises(ValueError, match="no absorption"):
        nbtorch.to_nanobragg_args(p, s.replace(mu_per_um=0.0))


def test_oblique_custom_vectors_and_a_base_orientation_round_trip_closely():
    """Non-axis vectors are normalised once more and a base orientation becomes XYZ angles: equal up to rounding."""
    flags = (BASE + " -fdet_vector 0 0.6 0.8 -sdet_vector 0 -0.8 0.6 -odet_vector 1 0 0 -beam_vector 1 0 0 "
             "-polar_vector 0 1 1 -twotheta_axis 0 1 1 -twotheta 3 -pivot sample")
    p1, s1 = nbtorch.from_nanobragg_args(flags)
    from nbtorch.rotation import rot_xyz

    U = rot_xyz(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    p1 = p1._replace(crystal=p1.crystal._replace(orientation=U))
    p2, s2 = nbtorch.from_nanobragg_args(nbtorch.to_nanobragg_args(p1, s1))
    assert s2.pivot == "sample" and s2.convention == "CUSTOM"
    torch.testing.assert_close(nbtorch.simulate(p2, s2), nbtorch.simulate(p1, s1), rtol=1e-10, atol=0)
