"""Issue 18 for many images and clusters: local Dask clusters over TLS (only the starting process can submit), a
secured ``--scheduler``, poor fits flagged in every mode (single, joint, independent, sweep) with ``--adc/--gain``
accepted wherever images are read, the same image through a link refused, a ``--limit`` run that ends quietly, and
the progress of long joint fits.

Tiny 32×32 stills and clusters of at most 2 workers keep the file to a few minutes on 2 cores."""
from __future__ import annotations

import io
import json
import logging
import operator
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import nbtorch
import refine
from nbtorch.io.images import write_raw_float
from refine.cli.fit import main

from .refine_cases import observe
from .test_many import TINY, _misset

distributed = pytest.importorskip("distributed")
pytest.importorskip("cryptography")

#: The Poisson photons of every test image are written multiplied by this: counts with a gain of 10 per photon.
GAIN = 10.0
FIT = ["--no-coarse", "--max-iter", "10"]


def _counts_list(folder, n: int = 2, gain: float = GAIN) -> str:
    """n stills of TINY whose pixels hold ``gain`` × Poisson photons (raw float, no header to say so), and a LIST of
    starting models 0.05° off in misset x and 30 % off in fluence."""
    lines = []
    for k in range(n):
        p, s = nbtorch.from_nanobragg_args(f"{TINY} -misset {_misset(k)}")
        write_raw_float(str(folder / f"c{k}.bin"), (gain * observe(p, s, seed=k)).numpy().astype(np.float32))
        m = [float(v) for v in _misset(k).split()]
        lines.append(f"c{k}.bin -misset {m[0] + 0.05} {m[1]} {m[2]} -fluence 1.3e30")
    path = folder / "counts.lst"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------------ the LIST


@pytest.mark.parametrize("link", ["symlink", "link"])
def test_the_same_image_through_a_link_is_refused(tmp_path, capsys, link):
    """A LIST naming one file twice (through a symbolic or a hard link) is a one-line error naming both lines, exit
    2, in both modes, before any work."""
    lst = _counts_list(tmp_path, 1)
    getattr(os, link)(tmp_path / "c0.bin", tmp_path / "again.bin")
    with open(lst, "a") as fh:
        fh.write("again.bin -misset 10 20 30\n")
    for mode in (["--shared", "distance", "--per-image", "scale"],
                 ["--independent", "--refine", "scale", "--results", str(tmp_path / "r.jsonl")]):
        rc = main(["--images", lst] + mode + TINY.split())
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert "line 2: again.bin is already listed on line 1 as c0.bin (the same file)" in err
    assert not (tmp_path / "r.jsonl").exists()


# ------------------------------------------------------------------------------------------------ poor fits


def test_counts_are_a_poor_fit_in_single_and_joint_mode_and_gain_fixes_it(tmp_path, capsys):
    """Counts = 10 × photons read as photons: χ²/ν ≈ 10, so a poor fit (exit 4, ``poor_fit`` set, ``ok`` false) in the
    single-image and the joint mode, per image and overall; ``--gain 10`` makes both good fits (exit 0)."""
    lst = _counts_list(tmp_path)
    start = open(lst).read().splitlines()[0].split()[1:]
    single = [str(tmp_path / "c0.bin"), "--refine", "orientation,scale", "--quiet"] + FIT + TINY.split() + start
    for extra, status in (([], 4), (["--gain", str(GAIN)], 0)):
        out = tmp_path / "single.json"
        assert main(single + extra + ["--json", str(out)]) == status, capsys.readouterr()
        d = json.loads(out.read_text())
        assert d["ok"] is (status == 0) and bool(d["poor_fit"]) is (status == 4)
        assert d["chi2_nu"] == d["chi2_reduced"]
        out = tmp_path / "joint.json"
        rc = main(["--images", lst, "--shared", "distance", "--per-image", "orientation,scale", "--json", str(out),
                   "--quiet"] + FIT + extra + TINY.split())
        cap = capsys.readouterr()
        assert rc == status, cap
        d = json.loads(out.read_text())
        assert d["converged"] and d["ok"] is (status == 0) and bool(d["poor_fit"]) is (status == 4)
        for img in d["images"]:
            assert img["ok"] is (status == 0) and bool(img["poor_fit"]) is (status == 4)
            assert (5 < img["chi2_nu"] < 20) if status else (0.6 < img["chi2_nu"] < 1.6)
        if status == 4:
            assert "counts, not photons" in d["poor_fit"] and "--adc/--gain" in d["poor_fit"]
            assert "POOR FIT" in cap.out


def test_joint_poor_fit_of_one_image_is_named():
    """Two images in photons and one in counts (4 per photon): the whole fit's χ²/ν (≈ 2) passes, that image's (≈ 4)
    does not, and the joint result names it (``poor_fit`` of the result, ``ok`` false)."""
    obs, starts, setups = [], [], []
    for k in range(3):
        p, s = nbtorch.from_nanobragg_args(f"{TINY} -misset {_misset(k)}")
        obs.append(observe(p, s, seed=k) * (4.0 if k == 2 else 1.0))
        starts.append(p)
        setups.append(s)
    res = refine.fit_many(obs, starts, setups, shared=["distance"], per_image=["scale"], coarse_to_fine=False,
                          max_iter=6, paths=["a.img", "b.img", "counts.img"])
    assert res.converged and not res.ok and 1.3 < res.chi2_nu < 3
    assert [img.ok for img in res.images] == [True, True, False]
    assert all(0.6 < img.chi2_nu < 1.6 for img in res.images[:2]) and 3.2 < res.images[2].chi2_nu < 5
    assert res.poor_fit.startswith("poor fit of 1 of 3 images; image 3 (counts.img): χ²/ν = ")
    assert "counts, not photons" in res.poor_fit and "POOR FIT of 1 of 3 images" in res.summary()
    # each image's ν_i = n_i − own_i − n_s·n_i/N, so that χ²/ν of all = Σ χ²_i / Σ ν_i
    n = 32 * 32
    assert res.chi2_nu == pytest.approx(sum(i.chi2_nu * (n - 1 - 1 / 3) for i in res.images) / (3 * n - 4),
                                        rel=1e-9)


def _independent(tmp_path, lst, results, *extra):
    cmd = [sys.executable, "-m", "refine.cli.fit", "--images", lst, "--independent", "--refine", "orientation,scale",
           "--workers", "2", "--threads", "1", "--results", str(results)] + FIT + list(extra) + TINY.split()
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_counts_are_a_poor_fit_in_independent_mode_and_a_limit_run_ends_quietly(tmp_path):
    """--independent on a local cluster of 2 workers: a ``--limit 1`` run stops with exit 3 and no Dask traceback;
    the rerun completes the results: every line has ``chi2_nu``, ``poor_fit`` (set) and ``ok`` (false), exit 4;
    with ``--gain 10`` (a new results file) every line is ok, exit 0."""
    lst = _counts_list(tmp_path)
    results = tmp_path / "fits.jsonl"
    first = _independent(tmp_path, lst, results, "--limit", "1")
    assert first.returncode == 3, first.stderr[-3000:]
    assert "Traceback" not in first.stderr and "Error" not in first.stderr, first.stderr[-3000:]
    assert len(first.stderr.strip().splitlines()) <= 3, first.stderr  # the progress line(s) and the summary
    second = _independent(tmp_path, lst, results)
    assert second.returncode == 4, second.stderr[-3000:]
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 2 and all(r["converged"] and not r["ok"] and r["chi2_nu"] > 5 for r in lines)
    assert all("counts, not photons" in r["poor_fit"] for r in lines)
    assert "1 already done, 1 refined (1 poor fits)" in second.stderr
    good = _independent(tmp_path, lst, tmp_path / "gain.jsonl", "--gain", str(GAIN), "--quiet")
    assert good.returncode == 0, good.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "gain.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(r["ok"] and r["poor_fit"] is None and 0.6 < r["chi2_nu"] < 1.6 for r in lines)
    assert good.stderr == ""


def test_independent_exit_status_is_judged_on_the_listed_lines(tmp_path):
    """0 every listed image ok; 4 one converged but poor; 3 one missing, failed or not converged (3 wins)."""
    from refine.cli.many import results_status
    from refine.imagelist import parse_image_list

    lst = _counts_list(tmp_path)
    entries = parse_image_list(lst, TINY.split())
    path = tmp_path / "r.jsonl"

    def status(*recs):
        path.write_text("".join(json.dumps(dict(r, path=e.path)) + "\n" for r, e in zip(recs, entries)))
        return results_status(entries, str(path))

    good, poor = {"converged": True, "poor_fit": None}, {"converged": True, "poor_fit": "poor fit: χ²/ν = 9"}
    assert status(good, good) == 0 and status(good, poor) == 4 and status(good) == 3
    assert status(poor, {"converged": False}) == 3 and status(poor, {"error": "x", "converged": False}) == 3


def test_sweep_flags_a_poor_fit_with_exit_4_and_takes_gain(tmp_path, capsys):
    """nbtorch-sweep on counts: POOR FIT, exit 4, ``poor_fit`` in its JSON; ``--gain 10`` (which its message
    suggests) is accepted and gives a good fit, exit 0; a bad --gain is a usage error naming it."""
    pytest.importorskip("optuna")
    from refine.cli import sweep as sweep_cli

    lst = _counts_list(tmp_path, 1)
    start = open(lst).read().split()[1:]
    argv = [str(tmp_path / "c0.bin"), "--search", "orientation:0.1", "--n-trials", "2", "--trial-iter", "1",
            "--refine", "orientation,scale", "--max-iter", "10", "--quiet"]
    for extra, status in (([], 4), (["--gain", str(GAIN)], 0)):
        out = tmp_path / f"sweep{status}.json"
        rc = sweep_cli.main(argv + ["--json", str(out), "--storage", f"sqlite:///{tmp_path}/s{status}.db"] + extra
                            + TINY.split() + start)
        cap = capsys.readouterr()
        assert rc == status, cap.err
        d = json.loads(out.read_text())
        assert d["ok"] is (status == 0) and bool(d["poor_fit"]) is (status == 4)
        assert ("POOR FIT" in cap.out and "--adc/--gain" in d["poor_fit"]) if status else d["chi2_nu"] < 1.6
    assert sweep_cli.main(argv + ["--gain", "0", "--storage", f"sqlite:///{tmp_path}/bad.db"] + TINY.split()
                          + start) == 2
    err = capsys.readouterr().err
    assert "--gain must be a finite number > 0" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------------ progress


def test_joint_fit_progress_counts_images_in_every_pass(tmp_path, capsys, monkeypatch):
    """A joint fit reports its passes over the images (reading, preparing, starting scales, simulating, Jacobians,
    ESDs) as done/total counters, and each iteration; --quiet prints nothing on stderr."""
    from refine.cli import many as cli_many

    monkeypatch.setattr(cli_many, "LOG_INTERVAL", 0.0)  # a log line for every step (a long fit's, every 10 s)
    lst = _counts_list(tmp_path, 3, gain=1.0)
    argv = ["--images", lst, "--shared", "distance", "--per-image", "scale", "--no-coarse", "--max-iter", "2"]
    assert main(argv + TINY.split()) in (0, 3)
    err = capsys.readouterr().err
    for what in ("reading images: 3/3 images", "preparing: 3/3 images", "starting scales: 3/3 images",
                 "fine: Jacobians: 3/3 images", "fine: simulating: 3/3 images"):  # (ESDs: the last normal reused)
        assert what in err, err
    assert "stage" in err and "iter" in err and "\nfine " in err  # the iteration lines are still there
    assert main(argv + ["--quiet"] + TINY.split()) in (0, 3)
    assert capsys.readouterr().err == ""


def test_progress_counter_redraws_one_terminal_line():
    """On a terminal the counter is redrawn in place and erased before an iteration line."""
    from refine.cli.many import Progress as JointProgress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    shown = JointProgress(stream)
    shown.work("fine: Jacobians", 1, 4)
    shown.work("fine: Jacobians", 2, 4)  # within 0.2 s: not redrawn
    shown.work("fine: Jacobians", 4, 4)  # the last always is
    shown({"stage": "fine", "iteration": 1, "loss": 1.0, "step": 0.1, "damping": 1e-3})
    text = stream.getvalue()
    assert text.count("\r") == 3 and "1/4 images" in text and "2/4" not in text and "4/4 images" in text
    assert text.index("\r\x1b[K") < text.index("stage") and text.endswith("\n")


# ------------------------------------------------------------------------------------------------ Dask and TLS


def _refused(address, security=None):
    """True when a client connecting to ``address`` (with ``security``) cannot submit a task (3 s).  The attempt runs
    in a daemon thread given 30 s in all: a client whose refused connection never finishes closing (seen on a loaded
    machine) ran no task either, and must not hang the suite."""
    import threading

    from distributed import Client

    from refine.scaleout import collect_failed_clients

    ran = []

    def attempt():
        try:
            with Client(address, security=security, timeout=3) as c:
                ran.append(c.submit(operator.add, 1, 2).result(timeout=3))
        except Exception:  # noqa: BLE001 - no TLS context, handshake refused, timed out, or distributed's own
            pass           # AssertionError from a client whose connection failed before: no task was run

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    collect_failed_clients()  # now, not inside the next client's start (where its __del__ would deadlock)
    return not ran


def test_a_client_that_cannot_connect_is_collected_at_once():
    """make_client's refused connection leaves no Dask client for the garbage collector to close later (its close,
    run inside the next client's start, waited forever on distributed's loop lock: a hung run)."""
    import gc
    import socket

    from distributed import Client

    from refine.scaleout import make_client

    with socket.socket() as s:  # a local port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gc.collect()
    before = sum(isinstance(o, Client) for o in gc.get_objects())
    gc.disable()
    try:
        with pytest.raises(OSError, match="cannot connect"):
            make_client(scheduler=f"tcp://127.0.0.1:{port}", timeout=2)
        assert sum(isinstance(o, Client) for o in gc.get_objects()) == before
    finally:
        gc.enable()


def test_local_cluster_takes_tasks_only_from_its_own_client(capfd):
    """The local cluster of --workers listens on 127.0.0.1 over TLS with credentials made for the run: its own
    client submits; a client without credentials, one with other self-made credentials and one over plain tcp://
    cannot.  Its workers' Dask log lines (the heartbeat tracebacks of a --limit shutdown) are not printed.  Dask's
    default HTTP port (8787) held by someone else is no concern of it: no warning, its own free local port."""
    import socket
    import warnings

    from distributed.security import Security

    from refine.scaleout import make_client

    with socket.socket() as other, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            other.bind(("127.0.0.1", 8787))
            other.listen()
        except OSError:  # already taken: the same situation
            pass
        client, cluster, _ = make_client(workers=1)
    assert not [w for w in caught if "already in use" in str(w.message)]
    try:
        assert cluster.scheduler.http_server.port != 8787
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:")
        assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
        assert client.submit(operator.add, 1, 2).result(timeout=30) == 3
        assert _refused(address)
        assert _refused(address, Security.temporary())
        assert _refused(address.replace("tls://", "tcp://"))
        client.run(lambda: logging.getLogger("distributed.worker").error("CommClosedError: heartbeat test"))
        assert client.submit(operator.add, 2, 2).result(timeout=30) == 4  # still serving its own client
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)
    assert "heartbeat test" not in capfd.readouterr().err


def _pem_files(folder, security):
    """The CA, certificate and key of a temporary Security written as PEM files (what an administrator hands out)."""
    paths = []
    for name, text in (("ca.pem", security.tls_ca_file), ("client.pem", security.tls_client_cert),
                       ("client.key", security.tls_client_key)):
        (folder / name).write_text(text)
        paths.append(str(folder / name))
    return paths


def test_scheduler_over_tls_with_certificate_files_or_dask_config(tmp_path, monkeypatch):
    """An existing tls:// scheduler: refine_images submits with --tls-* files (scheduler_security) or with dask's
    configuration (DASK_DISTRIBUTED__COMM__TLS__* variables); without credentials the client is refused."""
    import dask.config
    from distributed import LocalCluster
    from distributed.security import Security

    from refine.imagelist import parse_image_list
    from refine.scaleout import make_client, refine_images, scheduler_security

    sec = Security.temporary()
    ca, cert, key = _pem_files(tmp_path, sec)
    lst = _counts_list(tmp_path, 1, gain=1.0)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", host="127.0.0.1",
                      security=sec, dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert _refused(address.replace("tls://", "tcp://")) and _refused(address, Security.temporary())
        with pytest.raises(OSError, match=r"^--scheduler tls://127\.0\.0\.1:\d+: cannot connect \("):
            make_client(scheduler=address, security=Security.temporary(), timeout=3)
        security, warning = scheduler_security(address, ca, cert, key)
        assert warning == ""
        threads = torch.get_num_threads()  # the in-process worker sets this process's torch threads
        try:
            summary = refine_images(parse_image_list(lst, TINY.split()), ["scale"], str(tmp_path / "r.jsonl"),
                                    scheduler=address, security=security, progress=False,
                                    options=dict(coarse_to_fine=False, max_iter=4))
        finally:
            torch.set_num_threads(threads)
        assert (summary.fitted, summary.failed) == (1, 0)
        env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": ca, "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": cert,
               "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": key}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        dask.config.refresh()
        try:
            assert scheduler_security(address) == (None, "")
            assert not _refused(address)  # dask's configuration gives the client its credentials
        finally:
            for k in env:
                monkeypatch.delenv(k)
            dask.config.refresh()


def test_scheduler_security_options_are_checked_before_any_work(tmp_path, capsys):
    """--tls-* need --independent and --scheduler tls://; a tls:// scheduler needs credentials; a missing file is
    named; a tcp:// scheduler is warned about (not encrypted, anyone can submit)."""
    from refine.scaleout import scheduler_security

    lst = _counts_list(tmp_path, 1, gain=1.0)
    pem = tmp_path / "c0.bin"
    base = ["--images", lst, "--independent", "--refine", "scale", "--results", str(tmp_path / "r.jsonl")]
    cases = [
        (base + ["--tls-cert", str(pem)], "are for --scheduler tls://"),
        (["--images", lst, "--shared", "distance", "--tls-ca-file", str(pem)], "need --independent"),
        (base + ["--scheduler", "tls://127.0.0.1:1"], "needs this client's credentials"),
        (base + ["--scheduler", "tcp://127.0.0.1:1", "--tls-ca-file", str(pem), "--tls-cert", str(pem)],
         "need a tls:// scheduler address"),
        (base + ["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", str(tmp_path / "no.pem"), "--tls-cert",
                 str(pem)], "--tls-ca-file"),
        (base + ["--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", str(pem)], "--tls-cert"),
        (base + ["--gain", "-1"], "--gain must be a finite number > 0"),
    ]
    for argv, words in cases:
        assert main(argv + TINY.split()) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "r.jsonl").exists()
    security, warning = scheduler_security("tcp://10.0.0.5:8786")
    assert security is None and "neither encrypted nor authenticated" in warning and "tls://" in warning
