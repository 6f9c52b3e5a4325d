"""CrystFEL geometry files (nbtorch.io.crystfel): where pixels land, hierarchies, errors, round trips."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nbtorch.io import crystfel
from nbtorch.io.crystfel import (
    GeometryFileError,
    bad_pixels,
    geometry_mask,
    moved_geometry,
    panel_normal,
    panel_with_lab_frame,
    panels_to_slab,
    pixel_centers,
    read_geom,
    slab_shape,
    slab_to_panels,
    write_geom,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "crystfel"
TWO = DATA / "two_panels.geom"
QUAD = DATA / "quad_rigid.geom"

HEAD = "clen = 0.1 m\nres = 10000\n"


def _panel_text(name, min_ss, max_ss, fs="x", ss="y", cx=0.0, cy=0.0, extra=""):
    return (f"{name}/min_fs = 0\n{name}/max_fs = 9\n{name}/min_ss = {min_ss}\n{name}/max_ss = {max_ss}\n"
            f"{name}/fs = {fs}\n{name}/ss = {ss}\n{name}/corner_x = {cx}\n{name}/corner_y = {cy}\n{extra}")


def _write(tmp_path, text, name="det.geom"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _vec(v):
    return torch.tensor(v, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# where pixels land


def test_two_panel_file_puts_known_pixels_where_crystfel_says():
    g = read_geom(TWO)
    top, bottom = g.panels
    assert (top.name, bottom.name) == ("top", "bottom")
    assert (top.n_fast, top.n_slow, bottom.n_fast, bottom.n_slow) == (100, 50, 100, 50)
    assert top.pixel_size == pytest.approx(0.1, rel=1e-15)
    # corner + (fs + ½)·fs + (ss + ½)·ss in pixels; z = clen + coffset (hand-computed, see the file's comment)
    centres = pixel_centers(top)
    assert centres.shape == (50, 100, 3) and centres.dtype == torch.float64
    torch.testing.assert_close(centres[7, 3], _vec([(-50 + 3.5) * 0.1, (10 + 7.5) * 0.1, 126.0]), rtol=1e-12,
                               atol=1e-12)
    # bottom: fs = −y, ss = (−0.8, 0, 0.6), own coffset −2 mm; pixel (fs 10, ss 4) of the panel
    torch.testing.assert_close(pixel_centers(bottom)[4, 10],
                               _vec([(20 - 4.5 * 0.8) * 0.1, (-5 - 10.5) * 0.1, 123.0 + 4.5 * 0.6 * 0.1]),
                               rtol=1e-12, atol=1e-12)
    assert bottom.corner == pytest.approx((2.0, -0.5, 123.0), rel=1e-14)
    assert bottom.ss_step == pytest.approx((-0.08, 0.0, 0.06), rel=1e-14)
    assert top.adu_per_photon == bottom.adu_per_photon == 2.0
    assert g.photon_energy_eV == 9500.0 and g.wavelength == pytest.approx(12398.42 / 9500, rel=1e-14)
    assert [(b.name, b.panel, b.fs, b.ss, b.x, b.y) for b in g.bad_regions] == [
        ("bad_gap", "bottom", (0, 3), (60, 61), None, None), ("bad_beamstop", None, None, None, (-2.5, 2.5), (-8, -6))]
    assert [(x.name, x.members) for x in g.groups] == [("all", ("top", "bottom"))]  # implied root


def test_normal_points_away_from_the_sample_for_left_handed_panels():
    top, bottom = read_geom(TWO).panels
    torch.testing.assert_close(panel_normal(top), _vec([0.0, 0.0, 1.0]))
    n = panel_normal(bottom)
    torch.testing.assert_close(n, _vec([0.6, 0.0, 0.8]), rtol=1e-14, atol=1e-14)
    assert torch.dot(torch.linalg.cross(_vec(bottom.fs), _vec(bottom.ss)), n) < 0  # left-handed: fs × ss = −n
    jungfrau = crystfel.Panel("m0", fs=(0.000342, -0.999931, 0.0), ss=(-0.998976, -0.00005, 0.0), corner_x=2147.0,
                              corner_y=1131.0, res=13333.3, clen_m=0.0953, clen="95.3 mm", min_fs=0, max_fs=1029,
                              min_ss=0, max_ss=513)
    assert panel_normal(jungfrau)[2] > 0.999999


@pytest.mark.parametrize("text, expected", [
    ("x", (1.0, 0.0, 0.0)),
    ("-y", (0.0, -1.0, 0.0)),
    ("+z", (0.0, 0.0, 1.0)),
    ("+0.0012x +0.99999y -0.002z", (0.0012, 0.99999, -0.002)),
    ("-0.9999995232x-0.0010058292y", (-0.9999995232, -0.0010058292, 0.0)),
    ("1e-3x + 1y", (1e-3, 1.0, 0.0)),
])
def test_fs_ss_vectors_and_their_shorthands(tmp_path, text, expected):
    other = "z" if expected[2] == 0.0 else "x"  # a (nearly) orthogonal ss
    p = read_geom(_write(tmp_path, HEAD + _panel_text("p", 0, 9, fs=text, ss=other))).panels[0]
    assert p.fs == expected


@pytest.mark.parametrize("text", ["2", "x y", "0.5x0.5y", "xq", "1ex", "x/2"])
def test_malformed_vectors_name_line_and_key(tmp_path, text):
    path = _write(tmp_path, HEAD + _panel_text("p", 0, 9, fs=text))
    with pytest.raises(GeometryFileError, match=rf"^{re.escape(str(path))}, line 7: p/fs: expected a vector"):
        read_geom(path)


def test_globals_apply_to_panels_mentioned_later_and_panel_keys_win(tmp_path):
    text = (HEAD + "coffset = 0.001\n" + _panel_text("a", 0, 9) + "res = 5000\ncoffset = 0.002\n"
            + _panel_text("b", 10, 19) + _panel_text("c", 20, 29, extra="c/res = 2500\n") + "a/coffset = -0.003\n")
    a, b, c = read_geom(_write(tmp_path, text)).panels
    assert (a.res, b.res, c.res) == (10000.0, 5000.0, 2500.0)
    assert (a.coffset, b.coffset, c.coffset) == (-0.003, 0.002, 0.002)
    with pytest.raises(GeometryFileError, match=r"line 32: res: a default after the last panel"):
        read_geom(_write(tmp_path, text + "res = 1\n"))


def test_clen_from_a_data_file_location_needs_its_value():
    with pytest.raises(GeometryFileError, match=rf"^{re.escape(str(QUAD))}, line 3: clen: .*/instrument/detector/"
                                                r"distance_mm.*clen=VALUE in mm"):
        read_geom(QUAD, photon_energy_eV=12000.0)
    with pytest.raises(GeometryFileError, match=r"line 5: photon_energy: .*/instrument/beam/energy_eV"):
        read_geom(QUAD, clen=100.0)
    g = read_geom(QUAD, clen=100.0, photon_energy_eV=12000.0)
    assert {p.clen_m for p in g.panels} == {0.1} and g.photon_energy_eV == 12000.0
    assert g.panels[0].corner[2] == pytest.approx(600.0, rel=1e-15)  # 100 mm + coffset 0.5 m
    assert g.panels[0].clen == "/instrument/detector/distance_mm"


@pytest.mark.parametrize("clen, metres", [("0.1", 0.1), ("95.3 mm", 0.0953), ("0.2 m", 0.2)])
def test_literal_clen_units_and_the_argument_is_ignored(tmp_path, clen, metres):
    p = read_geom(_write(tmp_path, f"clen = {clen}\nres = 10000\n" + _panel_text("p", 0, 9)), clen=1.0).panels[0]
    assert p.clen_m == pytest.approx(metres, rel=1e-15)


def test_real_file_habits_parse(tmp_path):
    """CRLF line ends, comments after values, trailing blanks, ranges written as 513.0, no_index = false."""
    text = ("clen = 95.3 mm   ; camera length\r\nres = 13333.3  \r\n\tp/min_fs = 0.0\r\np/max_fs = 1029.0\r\n"
            "p/min_ss = 0.0\r\np/max_ss = 513.0 ; 514 rows\r\np/fs = 0.0003420x -0.9999310y\r\n"
            "p/ss = -0.9989760x -0.0000500y\r\np/corner_x = 2147.07110898\r\np/corner_y = 1131.30172146\r\n"
            "p/no_index = false\r\n")
    p = read_geom(_write(tmp_path, text)).panels[0]
    assert (p.n_fast, p.n_slow, p.min_fs, p.max_ss, p.no_index) == (1030, 514, 0, 513, False)
    assert p.clen_m == pytest.approx(0.0953, rel=1e-15) and p.res == 13333.3
    assert p.fs == (0.000342, -0.999931, 0.0)


def test_wavelength_units(tmp_path):
    for text, angstrom in (("1.2 A", 1.2), ("1.5e-10 m", 1.5)):
        g = read_geom(_write(tmp_path, f"wavelength = {text}\n" + HEAD + _panel_text("p", 0, 9)))
        assert g.wavelength == pytest.approx(angstrom, rel=1e-14) and g.beam == ("wavelength", text)


def test_masks_no_index_and_dims():
    g = read_geom(QUAD, clen=100.0, photon_energy_eV=12000.0)
    a0, _, b0, _ = g.panels
    assert a0.masks == (crystfel.Mask(0, "/entry/data/mask", None, 1, 0xFE),)
    assert a0.dims == ("%", "ss", "fs") and a0.data == "/entry/data/data"
    assert (a0.no_index, b0.no_index) == (False, True)
    assert (a0.adu_per_eV, a0.adu_per_photon) == (0.0005, None)


def test_bad_pixels_from_no_index_and_bad_regions():
    g = read_geom(TWO)
    top, bottom = bad_pixels(g, "top"), bad_pixels(g, "bottom")
    assert top.shape == (50, 100) and top.dtype == torch.bool
    # bad_gap: fs 0..3, ss 60..61 of the slab = panel rows 10..11 of 'bottom'
    expected = torch.zeros(50, 100, dtype=torch.bool)
    expected[10:12, 0:4] = True
    # bad_beamstop: -2.5 < x < 2.5, -8 < y < -6 strictly, in pixels at the pixel corner (x = 20 − 0.8·ss,
    # y = −5 − fs on 'bottom'): ss 22..28 (x from 2.4 down to -2.4) and fs 2 only (y = −7)
    expected[22:29, 2] = True
    assert torch.equal(bottom, expected) and expected.sum() == 8 + 7
    # on 'top' (x = −50 + fs, y = 10 + ss) the beamstop box holds no pixel corner: y >= 10
    assert not top.any()
    quad = read_geom(QUAD, clen=100.0, photon_energy_eV=12000.0)
    assert bad_pixels(quad, "b0").all() and not bad_pixels(quad, "b1").any()


# ----------------------------------------------------------------------------------------------------------------
# bad files: one line naming file, line and key


def _two(extra_a="", extra_b="", head=HEAD, b_ss=(10, 19), b_fs="x", b_ss_vec="y"):
    return head + _panel_text("a", 0, 9, extra=extra_a) + _panel_text("b", *b_ss, fs=b_fs, ss=b_ss_vec,
                                                                      extra=extra_b)


@pytest.mark.parametrize("text, line, key, problem", [
    (_two(extra_b="b/colour = red\n"), 19, "b/colour", "unknown panel key (allowed: fs, ss, corner_x"),
    ("frobnicate = 1\n" + _two(), 1, "frobnicate", "unknown global key (allowed: clen, photon_energy"),
    ("bad_x/min_q = 1\n" + _two(), 1, "bad_x/min_q", "unknown bad-region key"),
    (HEAD + _panel_text("a", 0, 9).replace("a/corner_y = 0.0\n", ""), 3, "a/corner_y", "panel 'a' has no corner_y"),
    (_two(b_ss=(9, 19)), 14, "b/min_fs", "overlaps panel 'a'"),
    (_two(b_ss=(19, 10)), 14, "b/max_ss", "need 0 <= min_ss <= max_ss"),
    (_two(b_ss_vec="+0.1x +1.0y"), 16, "b/ss", "fs and ss are not orthogonal"),
    (_two(b_ss_vec="+0.0y"), 16, "b/ss", "a zero-length vector"),
    (_two() + "group_all = a,c\n", 19, "group_all", "unknown member 'c'"),
    (_two() + "group_g = a\ngroup_all = g,a,b\n", 20, "group_all", "'a' is already in group 'g'"),
    (_two() + "rigid_group_r = a,z\n", 19, "rigid_group_r", "unknown panel 'z'"),
    ("clen = /det/z\nres = 10000\n" + _panel_text("a", 0, 9), 1, "clen", "read from the data file (/det/z)"),
    ("photon_energy = 9 MeV\n" + _two(), 1, "photon_energy", "unit eV or keV"),
    ("res = 10000\n" + _panel_text("a", 0, 9), 2, "clen", "no camera length"),
    (_two(extra_a="a/min_fs = 1.5\n"), 11, "a/min_fs", "expected an integer"),
    (_two(extra_a="a/res = -3\n"), 11, "a/res", "must be > 0"),
    (_two(extra_a="a/dim0 = fs\na/dim1 = ss\n"), 12, "a/dim", "one 'ss' before one 'fs'"),
    (_two() + "bad_r/min_fs = 0\nbad_r/max_fs = 3\nbad_r/min_ss = 0\nbad_r/max_x = 3\n", 22, "bad_r/min_fs",
     "not a mixture"),
    (_two() + "bad_r/min_fs = 0\nbad_r/max_fs = 3\nbad_r/min_ss = 0\nbad_r/max_ss = 3\n", 22, "bad_r/panel",
     "needs the panel"),
    (_two() + "bad_r/min_fs = 0\nbad_r/max_fs = 30\nbad_r/min_ss = 0\nbad_r/max_ss = 3\nbad_r/panel = a\n", 23,
     "bad_r/max_fs", "not inside panel 'a'"),
    (_two(extra_a="a/mask_file = m.h5\n"), 11, "a/mask0_data", "no mask location"),
    (_two(extra_a="a/no_index = maybe\n"), 11, "a/no_index", "expected true, false or an integer"),
    ("electron_voltage = 200 kV\n" + _two(), 1, "electron_voltage", "not simulated"),
])
def test_bad_files_get_one_line_naming_file_line_and_key(tmp_path, text, line, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(GeometryFileError) as info:
        read_geom(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}, line {line}: {key}: "), message
    assert problem in message


def test_rigid_groups_that_do_not_nest_are_an_error(tmp_path):
    text = _two() + _panel_text("c", 20, 29) + "rigid_group_r = a,b\nrigid_group_s = b,c\n"
    with pytest.raises(GeometryFileError, match=r"line 28: rigid_group_s: shares panels with rigid_group_r"):
        read_geom(_write(tmp_path, text))


# ----------------------------------------------------------------------------------------------------------------
# hierarchies


def _eight_panels(groups: str) -> str:
    return HEAD + "".join(_panel_text(f"q{q}a{a}", 10 * (4 * q + a), 10 * (4 * q + a) + 9)
                          for q in range(2) for a in range(4)) + groups


def test_rigid_groups_nest_into_a_hierarchy(tmp_path):
    g = read_geom(QUAD, clen=100.0, photon_energy_eV=12000.0)
    assert [(x.name, x.members) for x in g.groups] == [("left", ("a0", "a1")), ("right", ("b0", "b1")),
                                                       ("all", ("left", "right"))]
    assert g.rigid_group_collections == (("halves", ("left", "right")),)
    # a CSPAD-like file: quadrants and pairs of ASICs as two collections; one ASIC in no pair
    text = _eight_panels("".join(f"rigid_group_a{k} = q{k // 2}a{2 * (k % 2)},q{k // 2}a{2 * (k % 2) + 1}\n"
                                 for k in range(3))
                         + "rigid_group_q0 = q0a0,q0a1,q0a2,q0a3\nrigid_group_q1 = q1a0,q1a1,q1a2,q1a3\n"
                         + "rigid_group_collection_asics = a0,a1,a2\nrigid_group_collection_quadrants = q0,q1\n")
    g = read_geom(_write(tmp_path, text))
    assert g.group("all").members == ("q0", "q1")
    assert g.group("q0").members == ("a0", "a1") and g.group("q1").members == ("a2", "q1a2", "q1a3")
    assert g.group("a2").members == ("q1a0", "q1a1")
    assert g.groups_at_level(1) == ("q0", "q1") and g.groups_at_level(2) == ("a0", "a1", "a2")
    assert g.panels_in("q1") == ("q1a0", "q1a1", "q1a2", "q1a3")
    assert [x.name for x in g.groups][-1] == "all"  # children before parents


def test_group_lines_build_the_hierarchy_and_imply_all(tmp_path):
    text = _eight_panels("group_m0 = q0a0,q0a1,q0a2,q0a3\ngroup_m1 = q1a0,q1a1,q1a2,q1a3\ngroup_all = m0,m1\n"
                         "rigid_group_ignored = q0a0\n")
    g = read_geom(_write(tmp_path, text))
    assert [(x.name, x.members) for x in g.groups] == [
        ("m0", ("q0a0", "q0a1", "q0a2", "q0a3")), ("m1", ("q1a0", "q1a1", "q1a2", "q1a3")), ("all", ("m0", "m1"))]
    assert g.rigid_groups == (("ignored", ("q0a0",)),)  # kept, but group_ lines make the hierarchy
    g = read_geom(_write(tmp_path, _eight_panels("group_m0 = q0a0,q0a1,q0a2,q0a3\n")))
    assert g.group("all").members == ("m0", "q1a0", "q1a1", "q1a2", "q1a3")
    assert g.panels_in("all") == tuple(p.name for p in g.panels)


# ----------------------------------------------------------------------------------------------------------------
# writing


def _jungfrau_like_text(modules=8, asics=(2, 4), size=256) -> str:
    """8 modules of 2 × 4 ASICs of 256² pixels, each module rotated a little, stacked along ss of one slab."""
    lines = ["clen = 0.12 m", "photon_energy = 9.5 keV", "res = 13333.3", "adu_per_photon = 1", "dim0 = %",
             "dim1 = ss", "dim2 = fs", "data = /data/data"]
    groups = []
    for m in range(modules):
        angle = math.radians(90 * (m % 4) + 0.1 * m)
        fs, ss = (math.cos(angle), math.sin(angle)), (-math.sin(angle), math.cos(angle))
        names = []
        for a in range(asics[0] * asics[1]):
            row, col = divmod(a, asics[1])
            name = f"m{m}a{a}"
            names.append(name)
            cx = 40.0 * m + col * (size + 2) * fs[0] + row * (size + 2) * ss[0]
            cy = -30.0 * m + col * (size + 2) * fs[1] + row * (size + 2) * ss[1]
            lines += [f"{name}/min_fs = {col * size}", f"{name}/max_fs = {col * size + size - 1}",
                      f"{name}/min_ss = {(m * asics[0] + row) * size}",
                      f"{name}/max_ss = {(m * asics[0] + row) * size + size - 1}",
                      f"{name}/fs = {fs[0]:+.7f}x {fs[1]:+.7f}y", f"{name}/ss = {ss[0]:+.7f}x {ss[1]:+.7f}y +0.0001z",
                      f"{name}/corner_x = {cx!r}", f"{name}/corner_y = {cy!r}", f"{name}/coffset = {-1e-5 * m!r}"]
        groups.append(f"group_m{m} = {','.join(names)}")
    return "\n".join(lines + groups + [f"group_all = {','.join(f'm{m}' for m in range(modules))}"]) + "\n"


def test_jungfrau_like_layout_parses_in_well_under_a_second(tmp_path):
    path = _write(tmp_path, _jungfrau_like_text())
    start = time.perf_counter()
    g = read_geom(path)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed
    assert len(g.panels) == 64 and g.groups_at_level(1) == tuple(f"m{m}" for m in range(8))
    assert all(len(g.group(f"m{m}").members) == 8 for m in range(8))
    assert g.photon_energy_eV == 9500.0
    assert pixel_centers(g.panels[-1]).shape == (256, 256, 3)


#: Panels that differ in layout, clen (older per-panel form), masks, ADU units, and keys kept without use.
MIXED = ("peak_list = /entry/peaks\nbandwidth = 0.001\nres = 10000\nmax_adu = 60000\nmask2_data = /m\n"
         "mask2_file = masks.h5\nmask2_badbits = 0x4\n"
         + _panel_text("a", 0, 9, extra="a/clen = 0.1\na/adu_per_eV = 0.001\na/flag_lessthan = -10\n")
         + "dim0 = %\ndim1 = ss\ndim2 = fs\nclen = 95.5 mm\n"
         + _panel_text("b", 0, 9, fs="+0.7071067811865476x +0.7071067811865475y", ss="-0.7071067811865475x "
                       "+0.7071067811865476y", cx=0.1 + 0.2, cy=-1 / 3, extra="b/mask_good = 0x1\nb/mask = /d\n"))


@pytest.mark.parametrize("source", ["two", "quad", "jungfrau", "mixed"])
def test_read_write_read_round_trips_exactly(tmp_path, source):
    kwargs = {"clen": 100.0, "photon_energy_eV": 12000.0} if source == "quad" else {}
    texts = {"jungfrau": _jungfrau_like_text(), "mixed": MIXED}
    path = {"two": TWO, "quad": QUAD}.get(source) or _write(tmp_path, texts[source])
    first = read_geom(path, **kwargs)
    write_geom(tmp_path / "out.geom", first)
    second = read_geom(tmp_path / "out.geom", **kwargs)
    assert second == first
    write_geom(tmp_path / "again.geom", second)
    assert (tmp_path / "again.geom").read_text() == (tmp_path / "out.geom").read_text()


def test_moved_panels_round_trip_at_full_precision(tmp_path, monkeypatch):
    g = read_geom(TWO)
    top = g.panels[0]
    moved = panel_with_lab_frame(top, (-4.9876543210123, 1.0000000000003, 126.00123456789),
                                 (0.0999999, 0.000123456789, -0.0000314159), (-0.000123456789, 0.0999999, 0.00002718))
    torch.testing.assert_close(_vec(moved.corner), _vec([-4.9876543210123, 1.0000000000003, 126.00123456789]),
                               rtol=1e-14, atol=0)
    assert moved.fs_step == pytest.approx((0.0999999, 0.000123456789, -0.0000314159), rel=1e-14)
    refined = crystfel.Geometry(panels=(moved, g.panels[1]), groups=g.groups, bad_regions=g.bad_regions,
                                photon_energy_eV=g.photon_energy_eV, beam=g.beam)
    calls = []
    monkeypatch.setattr(crystfel, "atomic_write", lambda path, data: calls.append(path) or Path(path).write_bytes(data))
    write_geom(tmp_path / "refined.geom", refined)
    assert calls == [tmp_path / "refined.geom"]  # the safe-output rule
    assert read_geom(tmp_path / "refined.geom") == refined


# ----------------------------------------------------------------------------------------------------------------
# data layout, masks and moved panels


def test_slab_round_trip_and_layout():
    geom = read_geom(DATA / "two_panels.geom")
    assert slab_shape(geom) == (100, 100)
    slab = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    panels = slab_to_panels(slab, geom)
    assert panels.shape == (2, 50, 100)
    assert panels[1, 0, 0] == slab[50, 0] and panels[0, 49, 99] == slab[49, 99]
    np.testing.assert_array_equal(panels_to_slab(panels, geom), slab)
    with pytest.raises(ValueError, match=r"the image is \[100, 99\] but the geometry's panels index"):
        slab_to_panels(slab[:, :99], geom)


def test_geometry_mask_marks_bad_regions():
    geom = read_geom(DATA / "two_panels.geom")
    mask = geometry_mask(geom)
    assert mask.shape == (2, 50, 100) and mask.dtype == np.uint8
    assert mask[1, 10:12, 0:4].sum() == 0 and mask[1, 10:12, 4].all()  # bad_gap: ss 60-61 of 'bottom' (min_ss 50)
    np.testing.assert_array_equal(mask == 0, np.stack([bad_pixels(geom, p.name).numpy() for p in geom.panels]))


def test_moved_geometry_writes_new_vectors(tmp_path):
    geom = read_geom(DATA / "two_panels.geom")
    corners = np.array([p.corner for p in geom.panels]) + [[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]]
    fs = np.array([p.fs_step for p in geom.panels])
    ss = np.array([p.ss_step for p in geom.panels])
    moved = moved_geometry(geom, corners, fs, ss)
    write_geom(tmp_path / "moved.geom", moved)
    back = read_geom(tmp_path / "moved.geom")
    np.testing.assert_allclose([p.corner for p in back.panels], corners, rtol=1e-12, atol=1e-12)
    assert [p.name for p in back.panels] == [p.name for p in geom.panels] and back.groups == geom.groups
