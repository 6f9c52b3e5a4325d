"""Issue 10 (hardening) for refine: the ADC round trip, poor fits, checks before any work, exit statuses, signals,
silent acceptance refused, and refinement memory on a 2048² detector."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.cli import main as nbtorch_main
from refine.cli.fit import main as refine_main

TRUTH = ("-cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -distance 60 -pixel 0.2 -detpixels 48 "
         "-lambda 1 -oversample 1").split()
SMALL = "-cell 40 50 60 90 90 90 -N 2 -default_F 100 -distance 60 -pixel 0.2 -detpixels 16 -lambda 1".split()
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A noise image written by nbtorch with the default ADC offset (40): counts = Poisson photons + 40."""
    d = tmp_path_factory.mktemp("adc")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        rc = nbtorch_main(TRUTH + ["-noisefile", "obs.img", "-seed", "5", "-nopgm", "-noprogress", "-floatfile",
                                   "f.bin", "-intfile", "i.img"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    return d


def test_adc_round_trip(noisy, tmp_path, capsys):
    """simulate with noise and the default ADC → refine from the header's ADC_OFFSET → truth within ESDs, exit 0."""
    out = tmp_path / "fit.json"
    rc = refine_main([str(noisy / "obs.img"), "--refine", "cell,scale", "--no-coarse", "--quiet", "--json", str(out)]
                     + TRUTH)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    d = json.loads(out.read_text())
    assert d["ok"] and d["poor_fit"] is None and 0.7 < d["chi2_reduced"] < 1.4
    for name, truth in (("cell.a", 40.0), ("cell.b", 50.0), ("cell.c", 60.0), ("scale", 1.0)):
        assert abs(d["values"][name] - truth) < 4 * d["value_esd"][name], (name, d["values"][name])
    assert "(value - 40) / 1" in cap.out


def test_counts_read_as_photons_is_a_poor_fit(noisy, tmp_path, capsys):
    """--gain 0.25 reads every photon as four: the fit converges with χ²/ν ≈ 4, reported as a poor fit (summary,
    JSON) with exit status 4.  (--adc 0 on this image gives χ²/ν in the thousands, the issue's case.)"""
    out = tmp_path / "fit.json"
    rc = refine_main([str(noisy / "obs.img"), "--gain", "0.25", "--refine", "cell,scale", "--no-coarse", "--quiet",
                      "--json", str(out)] + TRUTH)
    cap = capsys.readouterr()
    assert rc == 4, cap.out
    d = json.loads(out.read_text())
    assert d["converged"] and not d["ok"] and 3 < d["chi2_reduced"] < 6
    assert "counts, not photons" in d["poor_fit"] and "POOR FIT" in cap.out


def test_read_image_applies_header_and_explicit_offset_and_gain(noisy):
    from nbtorch.io.images import read_image

    raw = read_image(noisy / "obs.img", adc=0, gain=1)
    o = read_image(noisy / "obs.img")
    assert (o.adc_offset, o.gain) == (40.0, 1.0)
    np.testing.assert_array_equal(o.data, raw.data - 40)
    i = read_image(noisy / "i.img")  # the int image: (value − 40)/scale ≈ the float image
    f = np.fromfile(noisy / "f.bin", "<f4").reshape(48, 48)
    assert i.gain > 1 and np.abs(i.data - f).max() <= 0.5 / i.gain + 1e-6 * f.max()
    g = read_image(noisy / "obs.img", adc=40, gain=2)
    np.testing.assert_array_equal(g.data, (raw.data - 40) / 2)
    with pytest.raises(ValueError, match="gain"):
        read_image(noisy / "obs.img", gain=0)


@pytest.mark.parametrize("args, message", [
    (["--json", "nodir/fit.json"], "--json nodir/fit.json: the directory"),
    (["--image", "nodir/m.bin"], "--image nodir/m.bin: the directory"),
    (["--plot", "nodir/p.png"], "--plot nodir/p.png: the directory"),
    (["--matrix-out", "nodir/m.mat"], "--matrix-out nodir/m.mat: the directory"),
    (["--matrix-out", "m.mat"], "--matrix-out m.mat: the starting model has a -cell"),
    (["--plot", "fit.json"], "--plot fit.json: a figure is written as"),
    (["--json", "a.json", "--image", "a.json"], "--image a.json: the same file as the output --json a.json"),
    (["--json", "."], "is a directory"),
    (["--threads", "-2"], "--threads must be an integer >= 1"),
    (["--refine", ",,,"], "no group given"),
    (["--refine", "bogus"], "unknown parameter group"),
    (["--max-iter", "-1"], "--max-iter must be an integer >= 0"),
    (["--lr", "nan"], "lr"),
    (["--method", "newton"], "invalid choice"),
    (["--background", "1", "2"], "expected 3 arguments"),
    (["--gain", "0"], "gain"),
])
def test_user_errors_exit_2_with_one_line_before_any_work(noisy, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(refine.pipeline.strategy, "prepare", lambda *a, **k: pytest.fail("a fit started"))
    rc = refine_main([str(noisy / "obs.img")] + args + SMALL)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_observed_left_out_or_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert refine_main(SMALL) == 2  # the -cell value 40 is not taken for OBSERVED
    assert "OBSERVED is missing" in capsys.readouterr().err
    assert refine_main(["nofile.img"] + SMALL) == 2
    assert capsys.readouterr().err == "nbtorch-refine: error: OBSERVED nofile.img: no such file\n"


def test_fit_arguments_refused_or_honoured():
    p, s = nbtorch.from_nanobragg_args(SMALL)
    img = nbtorch.simulate(p, s)
    r = refine.fit(img, p, s, free=["distance"], max_iter=0)  # no iterations at all, preliminary stages included
    assert r.iterations == 0 and [st["stage"] for st in r.stages] == ["fine"]
    assert refine.fit(img, p, s, free=None, max_iter=0).names == refine.fit(img, p, s, max_iter=0).names
    with pytest.raises(ValueError, match="chunk_pixels must be an integer >= 1"):
        refine.fit(img, p, s, chunk_pixels=0)
    with pytest.raises(ValueError, match="zero .* in every usable pixel"):
        refine.fit(torch.zeros_like(img), p, s, max_iter=1)
    with pytest.raises(ValueError, match="one device"):
        refine.fit(img, p._replace(crystal=p.crystal._replace(cell=p.crystal.cell.to("meta"))), s, max_iter=0)


def test_sigterm_during_refinement_exits_143_and_leaves_no_files(noisy, tmp_path):
    """SIGTERM (like Ctrl-C) ends the run with one line and status 128 + 15, no traceback, no temporary files."""
    cmd = [os.path.join(BIN, "nbtorch-refine"), str(noisy / "obs.img"), "--refine",
           "cell,orientation,distance,beam_center,scale", "--json", "fit.json", "--image", "m.bin"] + TRUTH
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    head = proc.stderr.readline()  # the progress header comes with the first iteration
    for _ in range(3):
        head += proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, head + err
    assert "Traceback" not in err and err.strip().endswith("nbtorch-refine: interrupted")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_start_up_exits_130_without_traceback(tmp_path):
    """SIGINT while the program imports torch, or just after: one line, status 130."""
    for delay in (0.6, 1.2):  # (in the first ~0.1 s Python itself is starting: its own traceback cannot be helped)
        proc = subprocess.Popen([os.path.join(BIN, "nbtorch-refine"), "obs.img"] + SMALL, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if "no such file" in err:  # finished (no such OBSERVED) before the signal: exit 2, or killed by it while
            assert proc.returncode in (2, -signal.SIGINT) and "Traceback" not in err, err  # Python shuts down
            continue
        assert proc.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted"), err


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, numpy as np, torch, nbtorch, refine
    from nbtorch.simulate import simulate_pixels
    p, s = nbtorch.from_nanobragg_args("-cell 40 50 60 90 90 90 -misset 10 20 30 -N 6 -default_F 100 -lambda 1 "
                                       "-distance 200 -pixel 0.1 -detpixels 2048 -oversample 1", dtype=torch.float64)
    n = s.spixels * s.fpixels
    idx = np.sort(np.random.default_rng(0).choice(n, size=4096, replace=False))
    obs, mask = np.zeros(n), np.zeros(n, bool)
    with torch.no_grad():
        obs[idx] = simulate_pixels(p, s, torch.as_tensor(idx)).numpy() + 1.0
    mask[idx] = True
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = refine.fit(obs.reshape(s.spixels, s.fpixels), p, s, free=["distance", "scale"], coarse_to_fine=False,
                   max_iter=2, mask=mask.reshape(s.spixels, s.fpixels), chunk_pixels=1024)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(before / 1024, after / 1024, r.n_pixels)
""")


def test_refinement_memory_on_a_2048_detector_is_set_by_the_chunks():
    """A 2048² (4 Mpixel) fit of 4096 pixels in chunks of 1024 with two free parameters: peak RSS ≤ 1.5 GB and the
    fit itself adds ≤ 256 MB (a full-detector mask per chunk, or a full image per chunk and parameter, would not)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    before, after, n = (float(v) for v in out.stdout.split())
    assert n == 4096
    assert after <= 1536 and after - before <= 256, (before, after)


def test_demo_user_errors_exit_2_with_one_line(tmp_path, capsys):
    from refine.cli.demo import main as demo_main

    (tmp_path / "file").write_text("")
    assert demo_main(["--out", str(tmp_path / "file" / "sub")]) == 2
    assert demo_main(["--seed", "abc"]) == 2
    assert demo_main(["--seed", "99999999999999999999"]) == 2  # was torch's "Overflow when unpacking long long"
    assert demo_main(["--seed", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "0 … 9223372036854775807" in err[2]
    assert len(err) == 4 and all(ln.startswith("nbtorch-demo: error: ") for ln in err), err


def test_float32_fit_of_distance_and_scale():
    """Under torch.func.jacfwd a 0-dim float32 tensor times a Python float gets a float64 tangent (torch 2.13):
    refine's increments and Jacobians keep the fit's dtype."""
    p, s = nbtorch.from_nanobragg_args(SMALL, dtype=torch.float32)
    img = nbtorch.simulate(p, s)
    start = p._replace(detector=p.detector._replace(distance=p.detector.distance + 0.3))
    r = refine.fit(img, start, s, free=["distance", "scale"], coarse_to_fine=False, max_iter=5)
    assert r.x.dtype == torch.float32 and abs(r.values["distance"] - 60.0) < 0.05
