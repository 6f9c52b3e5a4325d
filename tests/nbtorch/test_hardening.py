"""Issue 10 (hardening): singular geometry, non-finite images never written, silent acceptance refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nbtorch

SMALL = "-cell 40 50 60 90 90 90 -N 2 -default_F 100 -distance 60 -pixel 0.2 -detpixels 12 -lambda 1 -oversample 1"


def _along_e(tmp_path, K: float, tilt: float = 0.0):
    src = tmp_path / "src.txt"
    src.write_text(f"{tilt} 0 -10 1 1e-10\n")  # MOSFLM: E vector (0, 0, 1); this source lies along it
    return nbtorch.from_nanobragg_args(f"{SMALL} -polar {K} -sourcefile {src}")


def test_source_along_the_polarization_axis_is_finite_and_unpolarized(tmp_path):
    """nanoBragg divides by |E × s0| = 0 (NaN image); nbtorch drops the K term there (the plane average)."""
    p0, s0 = _along_e(tmp_path, 0.0)
    p1, s1 = _along_e(tmp_path, 1.0)
    img0, img1 = nbtorch.simulate(p0, s0), nbtorch.simulate(p1, s1)
    assert bool(torch.isfinite(img0).all()) and float(img0.sum()) > 0
    torch.testing.assert_close(img0, img1, rtol=1e-12, atol=0)
    # K = 0 has no K term anyway: continuous with a source a hair off the axis
    pt, st = _along_e(tmp_path, 0.0, tilt=1e-7)
    torch.testing.assert_close(img0, nbtorch.simulate(pt, st), rtol=1e-6, atol=0)


def test_source_along_the_polarization_axis_has_finite_gradients(tmp_path):
    p, s = _along_e(tmp_path, 0.5)

    def total(dist, K):
        q = p._replace(detector=p.detector._replace(distance=dist), beam=p.beam._replace(polarization=K))
        return nbtorch.simulate(q, s, fused=False).sum()

    g = torch.func.grad(total, argnums=(0, 1))(p.detector.distance, p.beam.polarization)
    assert all(bool(torch.isfinite(t)) for t in g)


@pytest.mark.parametrize("writer", ["raw", "smv", "pgm", "nxmx"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e39])
def test_writers_refuse_non_finite_images(tmp_path, writer, bad):
    """Every image writer refuses NaN/inf (and float32 overflow): a one-line ValueError, nothing written."""
    from nbtorch.io.images import write_pgm, write_raw_float
    from nbtorch.io.smv import write_smv

    img = np.ones((4, 5), dtype=np.float64)
    img[1, 2] = bad
    out = tmp_path / "out"
    if writer == "raw":
        call = lambda: write_raw_float(out, img)  # noqa: E731
    elif writer == "smv":
        call = lambda: write_smv(out, img.astype(np.float32) if bad != 1e39 else img * np.inf)  # noqa: E731
    elif writer == "pgm":
        call = lambda: write_pgm(out, img if bad != 1e39 else img * np.inf, 1.0)  # noqa: E731
    else:
        pytest.importorskip("h5py")
        from nbtorch.io.nexus import write_nxmx

        p, s = nbtorch.from_nanobragg_args(SMALL.replace("-detpixels 12", "-detpixels_f 5 -detpixels_s 4"))
        call = lambda: write_nxmx(out, img if bad != 1e39 else img * np.inf, p, s)  # noqa: E731
    with pytest.raises(ValueError, match="not written") as exc:
        call()
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


def _cli(argv, tmp_path, monkeypatch, capsys):
    from nbtorch.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("content", ["", "# only comments\n\n# here\n"])
def test_hkl_without_reflections_needs_default_F(tmp_path, monkeypatch, capsys, content):
    (tmp_path / "e.hkl").write_text(content)
    flags = SMALL.replace("-default_F 100", "-hkl e.hkl").split()
    rc, err = _cli(flags + ["-floatfile", "f.bin"], tmp_path, monkeypatch, capsys)
    assert rc == 2 and "-hkl e.hkl: no reflections" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.hkl"]
    rc, err = _cli(flags + ["-default_F", "10", "-floatfile", "f.bin", "-nopgm", "-nonoise"], tmp_path, monkeypatch,
                   capsys)
    assert rc == 0, err  # every reflection at -default_F


def test_refused_values(tmp_path, monkeypatch, capsys):
    rc, err = _cli(SMALL.split() + ["-pivot", "middle"], tmp_path, monkeypatch, capsys)
    assert rc == 2 and "-pivot" in err
    p, s = nbtorch.from_nanobragg_args(SMALL)
    with pytest.raises(ValueError, match="thicksteps must be 1 when Setup.thickness_um is 0"):
        s.replace(thicksteps=3)
    with pytest.raises(ValueError, match="setup must be an nbtorch.Setup"):
        nbtorch.simulate(p, None)
    with pytest.raises(ValueError, match="one device"):
        nbtorch.simulate(p._replace(beam=p.beam._replace(wavelength=p.beam.wavelength.to("meta"))), s)


def test_source_along_e_on_the_command_line_writes_finite_images(tmp_path, monkeypatch, capsys):
    (tmp_path / "src.txt").write_text("0 0 -10 1 1e-10\n")
    rc, err = _cli(SMALL.split() + ["-sourcefile", "src.txt", "-floatfile", "f.bin", "-noisefile", "n.img"], tmp_path,
                   monkeypatch, capsys)
    assert rc == 0, err
    img = np.fromfile(tmp_path / "f.bin", "<f4")
    assert np.isfinite(img).all() and img.sum() > 0


def test_interpolation_with_a_table_thinner_than_its_stencil(tmp_path):
    """A 3-index-wide -hkl table with (automatic) tricubic interpolation: every sample falls back to the nearest F
    instead of reading outside the table."""
    (tmp_path / "t.hkl").write_text("0 0 1 100\n1 2 3 50\n-1 0 2 70.5\n")
    p, s = nbtorch.from_nanobragg_args(SMALL.replace("-default_F 100", f"-hkl {tmp_path / 't.hkl'}"))
    assert s.interpolate
    img = nbtorch.simulate(p, s)
    assert bool(torch.isfinite(img).all())


_CELL_XFAIL = pytest.mark.xfail(
    reason="torch 2.13 gives a 0-dim float32 tensor × Python float a float64 tangent under jacfwd; the cell's "
           "trigonometry in nbtorch/lattice.py still meets it (the kernel casts tangents; units.deg2rad avoids it)",
    strict=True)


@pytest.mark.parametrize("leaf", [pytest.param("crystal.cell", marks=_CELL_XFAIL), "detector.beam_center",
                                  "beam.fluence"])
def test_float32_forward_mode_jacobians_keep_the_dtype(leaf):
    p, s = nbtorch.from_nanobragg_args(SMALL.replace("-detpixels 12", "-detpixels 4"), dtype=torch.float32)
    idx = torch.arange(16)
    from nbtorch.simulate import simulate_pixels

    J = torch.func.jacfwd(lambda t: simulate_pixels(nbtorch.replace_leaf(p, leaf, t), s, idx))(
        nbtorch.get_leaf(p, leaf))
    assert J.dtype == torch.float32
