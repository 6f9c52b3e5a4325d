"""Many images: joint refinement (refine.fit_many, Schur complement, vmap batches) and independent refinement on Dask
(nbtorch-refine --images LIST --independent), with LIST errors that name the line.

Small stills (32×32 and 48×48 pixels, no mosaic) and few iterations keep the file to about a minute on 2 cores."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.io.images import write_raw_float
from refine.cli.fit import main
from refine.minimise.solve import BlockNormal, schur_covariance, schur_solve
from refine.model.layout import make_layout
from refine.targets import Objective

from .refine_cases import misorientation_deg, observe, rotate_crystal, with_beam, with_detector

#: A 32×32 still of 0.3 mm pixels: ~150 pixels above 100 photons.
TINY = ("-default_F 100 -cell 40 50 60 90 90 90 -N 6 -lambda 1 -distance 60 -pixel 0.3 -detpixels 32 "
        "-oversample 1 -fluence 1e30")
#: A 48×48 still of 0.25 mm pixels with a tilted detector.
SMALL = ("-default_F 100 -cell 40 50 60 90 90 90 -N 6 -lambda 1 -distance 60 -pixel 0.25 -detpixels 48 "
         "-oversample 1 -fluence 1e30 -detector_roty 0.3 -detector_rotz -0.2")
SHARED = ["distance", "beam_center", "detector_rotation.y", "detector_rotation.z"]
PER_IMAGE = ["orientation", "scale"]
CONTRACT = {"converged", "ok", "chi2_nu", "poor_fit", "loss", "seconds", "shared", "shared_esd", "images"}
IMAGE_CONTRACT = {"path", "converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd", "nanobragg_args"}
LINE_CONTRACT = {"path", "converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd", "loss", "seconds",
                 "nanobragg_args", "warnings"}


def _misset(k: int) -> str:
    return f"{10 + 23 * k} {20 - 11 * k} {30 + 7 * k}"


def _write_list(folder, n: int, base: str = TINY, extra=("", ) * 99, corrupt_at=None) -> str:
    """n noisy stills of ``base`` at different orientations as raw float files and a LIST whose starting models are
    0.05° off in misset x and 30 % off in fluence; a corrupt SMV file inserted at position ``corrupt_at``."""
    lines = []
    for k in range(n):
        p, s = nbtorch.from_nanobragg_args(f"{base} {extra[k]} -misset {_misset(k)}")
        write_raw_float(str(folder / f"img{k}.bin"), observe(p, s, seed=k).numpy().astype(np.float32))
        m = [float(v) for v in _misset(k).split()]
        lines.append(f"img{k}.bin {extra[k]} -misset {m[0] + 0.05} {m[1]} {m[2]} -fluence 1.3e30")
    if corrupt_at is not None:
        (folder / "corrupt.img").write_bytes(b"not an image")
        lines.insert(corrupt_at, "corrupt.img -misset 1 2 3")
    path = folder / "list.txt"
    path.write_text("# path, then the flags of that image's starting model\n" + "\n".join(lines) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------------ Schur complement


def _random_blocks(gen, ns=3, sizes=(2, 4, 3, 1)) -> BlockNormal:
    n = ns + sum(sizes)
    J = torch.randn(3 * n, n, generator=gen, dtype=torch.float64)
    k, mask = ns, torch.zeros(n, n, dtype=torch.bool)
    mask[:ns, :] = mask[:, :ns] = True
    for m in sizes:
        mask[k:k + m, k:k + m] = True
        k += m
    H = (J.T @ J + n * torch.eye(n, dtype=torch.float64)) * mask  # block-arrowhead, positive definite
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    B, C, gp, k = [], [], [], ns
    for m in sizes:
        B.append(H[:ns, k:k + m])
        C.append(H[k:k + m, k:k + m])
        gp.append(g[k:k + m])
        k += m
    return BlockNormal(H[:ns, :ns], g[:ns], B, C, gp)


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_schur_solve_equals_dense_solve(mu):
    blk = _random_blocks(torch.Generator().manual_seed(3))
    H, g = blk.dense()
    Hd = H + mu * torch.diag(torch.diagonal(H))
    ds, dp = schur_solve(blk, mu)
    dense = torch.linalg.solve(Hd, -g)
    assert torch.allclose(torch.cat([ds] + dp), dense, rtol=1e-10, atol=1e-12)
    cov_s, cross, own = schur_covariance(blk)
    inv = torch.linalg.inv(H)
    assert torch.allclose(cov_s, inv[:3, :3], rtol=1e-9, atol=1e-14)
    assert torch.allclose(cross[1], inv[:3, 5:9], rtol=1e-9, atol=1e-14)
    assert torch.allclose(own[2], inv[9:12, 9:12], rtol=1e-9, atol=1e-14)


def test_real_normal_equations_schur_dense_and_vmap_agree():
    """Two tiny stills: the block normal equations batched under vmap equal those image by image, and the Schur
    step equals the dense solve of the assembled matrix."""
    pars, obs = [], []
    for k in range(2):
        p, s = nbtorch.from_nanobragg_args(f"{TINY} -misset {_misset(k)}")
        pars.append(refine.parameterise(p, s, ["distance", "beam_center"] + PER_IMAGE))
        obs.append(observe(p, s, seed=k))
    lay = make_layout(pars, ["distance", "beam_center"])
    idx = [np.arange(32 * 32)] * 2
    target = refine.make_target("poisson")
    X = torch.linspace(-0.05, 0.05, lay.n, dtype=torch.float64)
    batched = Objective(pars, obs, idx, target, layout=lay, batch=True)
    looped = Objective(pars, obs, idx, target, layout=lay, batch=False)
    assert (len(batched.groups), len(looped.groups)) == (1, 2)
    L1, b1, _ = batched.normal(X)
    L2, b2, _ = looped.normal(X)
    H1, g1 = b1.dense()
    H2, g2 = b2.dense()
    assert L1 == pytest.approx(L2, rel=1e-12)
    assert torch.allclose(H1, H2, rtol=1e-9) and torch.allclose(g1, g2, rtol=1e-9, atol=1e-9)
    ds, dp = schur_solve(b1, 1e-3)
    dense = torch.linalg.solve(H1 + 1e-3 * torch.diag(torch.diagonal(H1)), -g1)
    assert torch.allclose(torch.cat([ds] + dp), dense, rtol=1e-7, atol=1e-12)


# ------------------------------------------------------------------------------------------------ joint refinement


def _joint_case(n=5):
    obs, starts, setups, truths = [], [], [], []
    for k in range(n):
        p, s = nbtorch.from_nanobragg_args(f"{SMALL} -misset {_misset(k)}")
        truths.append(p)
        setups.append(s)
        obs.append(observe(p, s, seed=k))
        q = rotate_crystal(p, (0.3 * k + 0.1, -0.5, 0.8), 0.15)
        q = with_detector(q, distance=q.detector.distance + 0.6,
                          beam_center=q.detector.beam_center + torch.tensor([1.2, -1.0], dtype=torch.float64) * 0.25,
                          rotation=q.detector.rotation + torch.tensor([0, -0.2, 0.15], dtype=torch.float64))
        starts.append(with_beam(q, fluence=q.beam.fluence * 1.5))
    return obs, starts, setups, truths


@pytest.fixture(scope="module")
def joint():
    obs, starts, setups, truths = _joint_case()
    res = refine.fit_many(obs, starts, setups, shared=SHARED, per_image=PER_IMAGE, coarse_iter=3, robust_iter=3,
                          nanobragg_args=[f"{SMALL} -misset {_misset(k)}" for k in range(5)])
    return res, obs, setups, truths


def test_joint_recovers_shared_geometry(joint):
    res, _, setups, truths = joint
    t = truths[0].detector
    assert res.converged, res.message
    assert abs(res.shared["distance"] - float(t.distance)) < 0.15
    for j, ax in enumerate("xy"):
        assert abs(res.shared[f"beam_center.{ax}"] - float(t.beam_center[j])) / setups[0].pixel_size < 0.15
    for ax, j in (("y", 1), ("z", 2)):
        assert abs(res.shared[f"detector_rotation.{ax}"] - float(t.rotation[j])) < 0.05
    for img, truth in zip(res.images, truths):
        assert misorientation_deg(img.params, truth) < 0.02
        assert img.values["scale"] == pytest.approx(1 / 1.5, rel=0.01)
        assert all(math.isfinite(v) and v > 0 for v in img.esd.values())
        assert img.correlation.shape == (9, 9)


def test_joint_shared_esds_beat_every_single_image(joint):
    """Shared ESDs are at least 1.8 × smaller than the best single-image ESD (√5 ≈ 2.2 expected); the single-image
    ESDs are those a single-image fit reports."""
    res, obs, setups, _ = joint
    single = res.single_image_esd()
    for name in res.shared_names:
        best = min(s[name] for s in single)
        assert res.shared_esd[name] * 1.8 < best, (name, res.shared_esd[name], best)
    img = res.images[0]
    alone = refine.fit(obs[0], img.params, setups[0], free=SHARED + PER_IMAGE, coarse_to_fine=False, max_iter=3)
    for name in res.shared_names:
        assert alone.esd[name] == pytest.approx(single[0][name], rel=0.05)


def test_joint_result_contract_and_flags(joint, tmp_path):
    res = joint[0]
    d = json.loads(res.to_json(str(tmp_path / "joint.json")))
    assert set(d) == CONTRACT and set(d["shared"]) == set(SHARED[:1] + ["beam_center.x", "beam_center.y"] +
                                                          SHARED[2:])
    assert set(d["shared_esd"]) == set(d["shared"]) and len(d["images"]) == 5
    assert d["ok"] and d["poor_fit"] is None and 0.7 < d["chi2_nu"] < 1.4  # Poisson photons: χ²/ν near 1
    for img in d["images"]:
        assert set(img) == IMAGE_CONTRACT
        p, _ = nbtorch.from_nanobragg_args(img["nanobragg_args"])
        assert float(p.detector.distance) == pytest.approx(d["shared"]["distance"], abs=1e-6)


def test_one_image_through_fit_many_is_refine_fit():
    """The single-image fit is the joint fit with N = 1: the same stages give the same values, ESDs and loss."""
    p, s = nbtorch.from_nanobragg_args(f"{TINY} -misset {_misset(0)}")
    obs = observe(p, s, seed=3)
    start = with_detector(p, distance=p.detector.distance + 0.4)
    free = ["distance", "beam_center", "orientation"]
    one = refine.fit(obs, start, s, free=free, coarse_to_fine=False, max_iter=6)
    many = refine.fit_many([obs], [start], s, per_image=free, coarse_to_fine=False, max_iter=6)
    img = many.images[0]
    assert img.names == one.names and img.converged == one.converged and many.shared_names == []
    for name in one.names:
        assert img.values[name] == pytest.approx(one.values[name], rel=1e-10, abs=1e-12)
        assert img.esd[name] == pytest.approx(one.esd[name], rel=1e-8)
    assert many.loss == pytest.approx(one.loss, rel=1e-12) and img.chi2_nu == pytest.approx(one.chi2_nu, rel=1e-12)


def test_joint_fit_takes_priors_and_every_method():
    """What the single fit takes, the joint fit takes: a tight prior on the shared distance holds it at the prior's
    mean; L-BFGS refines the same problem."""
    obs, starts, setups, truths = _joint_case(2)
    true_d = float(truths[0].detector.distance)
    kw = dict(shared=["distance"], per_image=["scale"], coarse_to_fine=False, max_iter=8)
    held = refine.fit_many(obs, starts, setups, priors={"distance": (true_d + 0.3, 1e-6)}, **kw)
    assert held.shared["distance"] == pytest.approx(true_d + 0.3, abs=1e-3)
    free = refine.fit_many(obs, starts, setups, method="lbfgs", **kw)
    assert abs(free.shared["distance"] - true_d) < abs(float(starts[0].detector.distance) - true_d)
    assert all(h["stage"] == "fine" for h in free.history)


# ------------------------------------------------------------------------------------------------ the command line


def test_joint_cli_with_two_detector_sizes(tmp_path, capsys):
    """Images of different detector sizes in one joint fit: simulated in separate groups, one shared distance."""
    base = TINY.replace("-detpixels 32", "")
    lst = _write_list(tmp_path, 2, base=base, extra=("-detpixels 32", "-detpixels 36"))
    out = tmp_path / "joint.json"
    rc = main(["--images", lst, "--shared", "distance", "--per-image", "orientation,scale", "--json", str(out),
               "--no-coarse", "--max-iter", "4", "--quiet"] + base.split() + ["-distance", "60.2"])
    cap = capsys.readouterr()
    assert rc in (0, 3), cap.err
    d = json.loads(out.read_text())
    assert set(d) == CONTRACT and abs(d["shared"]["distance"] - 60.0) < 0.1
    assert [img["path"] for img in d["images"]] == [str(tmp_path / "img0.bin"), str(tmp_path / "img1.bin")]


@pytest.mark.parametrize("line, problem", [
    ("missing.bin -misset 1 2 3", "no such image file"),
    ("img1.bin -misset 1 2", "bad flags"),
    ("img1.bin -cell 40 50 60 90 90 90 -nosuchflag 3", "bad flags"),
    ("img0.bin -misset 1 2 3", "img0.bin is already listed on line 2"),
])
def test_list_errors_name_the_line(tmp_path, capsys, line, problem):
    _write_list(tmp_path, 2)
    lst = tmp_path / "bad.txt"
    lst.write_text(f"# comment\nimg0.bin -misset 1 2 3\n\n{line}\n")
    for mode in (["--shared", "distance", "--per-image", "scale"], ["--independent", "--refine", "scale",
                                                                   "--results", str(tmp_path / "r.jsonl")]):
        rc = main(["--images", str(lst)] + mode + TINY.split())
        err = capsys.readouterr().err
        assert rc == 2 and f"line 4: {problem}" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.jsonl").exists()


def test_usage_errors(tmp_path, capsys):
    lst = _write_list(tmp_path, 1)
    assert main(["--images", lst, "--independent", "--refine", "scale"] + TINY.split()) == 2
    assert "--results" in capsys.readouterr().err
    assert main(["--images", lst, "--shared", "nonsense", "--per-image", "scale"] + TINY.split()) == 2
    assert "unknown parameter group" in capsys.readouterr().err
    with pytest.raises(ValueError, match="both shared and per image"):
        refine.fit_many([np.zeros((32, 32))], [None], [None], shared=["scale"], per_image=["scale"])


# ------------------------------------------------------------------------------------------------ Dask


def _lines(path):
    """The complete JSON lines of a results file (one being written may be seen half-way)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        text = fh.read()
    out = []
    for x in text[: text.rfind("\n") + 1].splitlines():
        try:
            out.append(json.loads(x))
        except ValueError:
            pass
    return out


def test_independent_on_dask_killed_and_rerun(tmp_path):
    """6 LIST lines (one a corrupt file) on a local cluster of 2 workers: the run is killed after 2 result lines,
    the rerun completes it: exactly 6 lines, none duplicated, 5 fits and 1 error."""
    lst = _write_list(tmp_path, 5, corrupt_at=2)
    results = str(tmp_path / "fits.jsonl")
    cmd = [sys.executable, "-m", "refine.cli.fit", "--images", lst, "--independent", "--refine", "orientation,scale",
           "--workers", "2", "--threads", "1", "--results", results, "--no-coarse", "--max-iter", "4"] + TINY.split()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    err = tmp_path / "first.err"
    with open(err, "w") as fh:  # a file, not a pipe nobody reads
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while len(_lines(results)) < 2 and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the driver and its worker processes
            first.wait()
    killed_with = len(_lines(results))
    assert killed_with >= 2, err.read_text()[-2000:]
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 3, second.stderr[-2000:]  # one image failed (in either run)
    lines = _lines(results)
    paths = [rec["path"] for rec in lines]
    assert len(lines) == 6 and len(set(paths)) == 6
    assert open(results).read().count("\n") == 6  # nothing else in the file: no partial or unparsable line
    assert f"{killed_with} already done" in second.stderr or killed_with == 6
    errors = [rec for rec in lines if rec.get("error")]
    assert len(errors) == 1 and errors[0]["path"].endswith("corrupt.img") and "line 4" in errors[0]["error"]
    fits = [rec for rec in lines if not rec.get("error")]
    assert len(fits) == 5 and all(set(rec) == LINE_CONTRACT for rec in fits)
    assert all(rec["parameters"]["scale"] == pytest.approx(1 / 1.3, rel=0.02) for rec in fits)
    assert all(math.isfinite(rec["loss"]) and rec["nanobragg_args"] for rec in fits)
    assert all(rec["poor_fit"] is None and 0.6 < rec["chi2_nu"] < 1.6 for rec in fits)


def test_results_file_resume_helpers(tmp_path):
    """A line cut short by a kill is dropped before the next append; a task that fails returns its error line."""
    from refine.imagelist import parse_image_list
    from refine.scaleout import ProgressBar, append_line, done_paths, read_results, refine_one

    path = tmp_path / "r.jsonl"
    path.write_text('{"path": "a", "converged": true}\n{"path": "b", "conv')
    with pytest.warns(UserWarning, match="cut short by a killed run"):
        assert done_paths(str(path)) == {"a"}
    assert path.read_text() == '{"path": "a", "converged": true}\n'
    append_line(str(path), {"path": "c", "converged": False})
    assert [r["path"] for r in read_results(str(path))] == ["a", "c"]
    lst = _write_list(tmp_path, 1, corrupt_at=1)
    rec = refine_one(parse_image_list(lst, TINY.split())[1], ["scale"], {}, threads=1)
    assert set(rec) == LINE_CONTRACT | {"error"} and rec["converged"] is False and rec["parameters"] is None
    assert rec["error"].startswith("ValueError:") and "line 3" in rec["error"] and "\n" not in rec["error"]
    bar = ProgressBar(10, already=4, enabled=False)
    bar.update(failed=True)
    assert "5/10 done  failed 1" in bar.text()
