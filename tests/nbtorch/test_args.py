"""nanoBragg flag parsing: auto rules (phi, divergence, dispersion, oversample), header initialisation, aliases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nbtorch
from nbtorch.io import write_smv
from nbtorch.io.images import HeaderWarning

BASE = "-default_F 100 -cell 50 50 50 90 90 90 -N 3 -detpixels 32 -pixel 0.5 -distance 80 -oversample 1"


def setup_of(extra):
    return nbtorch.from_nanobragg_args(BASE + " " + extra)


@pytest.mark.parametrize("flags, steps, step, osc", [
    ("", 1, 0.0, 0.0),
    ("-osc 2", 2, 1.0, 2.0),
    ("-phistep 0.5", 2, 0.5, 0.5),
    ("-osc 2 -phistep 0.5", 4, 0.5, 2.0),
    ("-phisteps 4", 4, 0.25, 1.0),
    ("-osc 3 -phisteps 6", 6, 0.5, 3.0),
    ("-phisteps 5 -phistep 0.3", 2, 0.3, 0.3),
    ("-phisteps 0", 1, 0.0, 0.0),
])
def test_phi_auto_rules(flags, steps, step, osc):
    _, s = setup_of(flags)
    assert s.phisteps == steps
    if steps > 1:  # with one sample the step is irrelevant
        assert s.phistep == pytest.approx(step)


def test_divergence_and_dispersion_auto_rules():
    _, s = setup_of("-divergence 2")  # range alone -> 2 points per axis, round clip keeps all 4 corners? (C test)
    assert s.n_sources == 4
    _, s = setup_of("-hdivrange 2 -vdivrange 1 -divsteps 3")
    assert s.n_sources == 5  # 3x3 round -> 5
    _, s = setup_of("-hdivrange 2 -vdivrange 1 -divsteps 3 -square_div")
    assert s.n_sources == 9
    _, s = setup_of("-dispersion 1")
    assert [f for _, f in s.sources] == pytest.approx([0.995, 1.005])
    _, s = setup_of("-dispsteps 5")  # without -dispersion: no effect (spec Q9)
    assert s.n_sources == 1
    _, s = setup_of("-hdivsteps 3")  # count without range: 1 rad range (spec Q9)
    hx = sorted({round(math.atan2(d[2], d[0]), 9) for d, _ in s.sources} | {round(math.atan2(d[1], d[0]), 9) for d, _ in s.sources})
    assert max(abs(x) for x in hx) == pytest.approx(0.5, abs=1e-9)


def test_oversample_auto_rule():
    _, s = nbtorch.from_nanobragg_args("-default_F 100 -cell 100 100 100 90 90 90 -N 10 -detpixels 64")
    assert s.oversample == 3  # 3*1000 / (1 Å * 100 mm / 0.1 mm) = 3
    _, s = nbtorch.from_nanobragg_args("-default_F 100 -cell 100 100 100 90 90 90 -N 1 -detpixels 64")
    assert s.oversample == 1


def test_aliases_and_last_flag_wins():
    p1, s1 = setup_of("-wavelength 1.3 -mosaic_dom 4 -mosaic 0.2 -floatimage x.bin")
    assert p1.beam.wavelength.item() == 1.3 and s1.n_domains == 4
    _, s = setup_of("-round_xtal -square_xtal")
    assert s.shape == "square"
    _, s = setup_of("-square_xtal -gauss_xtal")
    assert s.shape == "gauss"


def test_energy_and_flux():
    p, _ = setup_of("-energy 12398.42")
    assert p.beam.wavelength.item() == pytest.approx(1.0)
    p, _ = setup_of("-flux 1e12 -exposure 2 -beamsize 0.1")
    assert p.beam.fluence.item() == pytest.approx(1e12 * 2 / 1e-8)


def test_img_and_mask_headers_initialise_the_detector(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hdr = {"PIXEL_SIZE": 0.2, "DISTANCE": 150, "WAVELENGTH": 1.5, "BEAM_CENTER_X": 3.1, "BEAM_CENTER_Y": 4.3}
    write_smv("ref.img", np.ones((20, 30), np.uint16), hdr)
    args = "-default_F 100 -cell 50 50 50 90 90 90 -N 3 -img ref.img"
    p, s = nbtorch.from_nanobragg_args(args)
    assert (s.fpixels, s.spixels, s.pixel_size) == (30, 20, 0.2)
    assert p.detector.distance.item() == 150 and p.beam.wavelength.item() == 1.5
    np.testing.assert_allclose(p.detector.beam_center.numpy(), [3.1, 4.3])
    # command-line flags win over the header (with a warning naming both values)
    with pytest.warns(HeaderWarning) as record:
        p, s = nbtorch.from_nanobragg_args(args + " -distance 90 -pixel 0.1")
    lines = sorted(str(w.message) for w in record)
    assert len(lines) == 2 and "distance 150 mm" in lines[0] and "-distance 90" in lines[0]
    assert "pixel size 0.2 mm" in lines[1] and "-pixel 0.1" in lines[1]
    assert p.detector.distance.item() == 90 and s.pixel_size == 0.1
    # a -mask header's BEAM_CENTER_Y is stored flipped (detsize_s − value), as the C program reads it
    mask = np.ones((20, 30), np.uint16)
    mask[5, 7] = 0
    write_smv("mask.img", mask, hdr)
    p, s = nbtorch.from_nanobragg_args("-default_F 100 -cell 50 50 50 90 90 90 -N 3 -mask mask.img")
    np.testing.assert_allclose(p.detector.beam_center.numpy(), [3.1, 20 * 0.2 - 4.3])
    img = nbtorch.simulate(p, s)
    assert img[5, 7] == 0 and (img > 0).sum() == 20 * 30 - 1


def test_mask_of_wrong_size_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_smv("mask.img", np.ones((5, 5), np.uint16), {"PIXEL_SIZE": 0.1})
    with pytest.raises(ValueError, match="-mask"), pytest.warns(HeaderWarning, match="-pixel 0.5"):
        nbtorch.from_nanobragg_args(BASE + " -mask mask.img")


def test_xtalsize_sets_N_and_clips_to_beam():
    p, _ = setup_of("-xtalsize 0.0004 -beamsize 0.1")  # 4000 Å / 50 Å = 80 cells
    np.testing.assert_allclose(p.crystal.ncells.numpy(), [80, 80, 80])
    p, _ = setup_of("-xtal_width 0.2 -beamsize 0.0001")  # clipped to 1000 Å -> 20 cells along b
    assert p.crystal.ncells[1].item() == 20


def test_mat_file_gives_exact_cell_and_orientation(tmp_path):
    from nbtorch.io import write_mosflm_matrix
    from nbtorch.lattice import reciprocal_matrix
    from nbtorch.rotation import rot_xyz

    cell = torch.tensor([61.2, 73.4, 85.1, 82.0, 97.0, 104.0], dtype=torch.float64)
    U = rot_xyz(torch.deg2rad(torch.tensor([10.0, -20.0, 33.0], dtype=torch.float64)))
    A = (U @ reciprocal_matrix(cell)) * 1.3
    write_mosflm_matrix(tmp_path / "A.mat", A.numpy())
    p, s = nbtorch.from_nanobragg_args(f"-mat {tmp_path / 'A.mat'} -lambda 1.3 -default_F 10 -detpixels 8")
    # the file holds 8 decimals
    torch.testing.assert_close(p.crystal.cell, cell, rtol=2e-6, atol=1e-4)
    torch.testing.assert_close(p.crystal.orientation, U, rtol=0, atol=2e-6)
    assert not s.nanobragg_cell
