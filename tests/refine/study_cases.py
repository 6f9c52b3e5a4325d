"""Small cases for the Optuna study tests (refine.studies, nbtorch-sweep): a tiny still written as SMV, the flags of
a start 1.5 mm off in distance, and a throwaway PostgreSQL server."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

import numpy as np
import pytest
import torch

import nbtorch

#: 32×32 pixels of 0.4 mm at 60 mm, N = 4: cheap trials (about a second each on a loaded 2-core machine).
TINY = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 4 -lambda 1 -distance 60 -pixel 0.4 "
        "-detpixels 32 -oversample 1 -fluence 1e30")
#: The start: distance 1.5 mm off.
TINY_START = TINY.replace("-distance 60", "-distance 61.5").split()


def write_tiny(directory) -> str:
    """Write a Poisson-noisy observation of TINY as SMV (photons as integers) and return its path."""
    from nbtorch.io.smv import write_smv

    params, setup = nbtorch.from_nanobragg_args(TINY, dtype=torch.float64)
    img = torch.poisson(nbtorch.simulate(params, setup), generator=torch.Generator().manual_seed(3))
    path = os.path.join(str(directory), "tiny.img")
    write_smv(path, img.numpy().astype(np.uint16), {"PIXEL_SIZE": 0.4, "DISTANCE": 60.0, "WAVELENGTH": 1.0})
    return path


def sweep_argv(observed: str, storage: str, n_trials: int, *extra: str):
    """nbtorch-sweep arguments of a cheap distance search on the tiny case."""
    return [observed, "--search", "distance:2", "--n-trials", str(n_trials), "--storage", storage,
            "--trial-iter", "1", "--refine", "distance,scale", *extra, *TINY_START]


# ---------------------------------------------------------------------------------------------------------------
# a throwaway PostgreSQL server


def postgres_bin() -> str:
    """Directory of the PostgreSQL server programs (Debian's /usr/lib/postgresql/N/bin, or initdb on PATH); ''."""
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb and shutil.which("pg_ctl") else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> str:
    """The user to run the server as: ourselves, or (as root, which initdb refuses) 'postgres' or 'nobody'."""
    if os.geteuid() != 0:
        return ""
    import pwd

    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.skip("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL as")


class PostgresServer:
    """initdb + pg_ctl in a temporary directory, listening on 127.0.0.1 at a free port (trust authentication);
    ``url`` of its database 'optuna'.  Stop with :meth:`stop`."""

    def __init__(self):
        self.bindir = postgres_bin()
        if not self.bindir:
            pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not found: apt-get install postgresql")
        self.user = _server_user()
        self.root = tempfile.mkdtemp(prefix="nbtorch-pg-")
        if self.user:
            import pwd

            shutil.chown(self.root, user=pwd.getpwnam(self.user).pw_uid)
        self.data, self.port = os.path.join(self.root, "data"), _free_port()
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        opts = f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-o", opts, "-w", "-t", "60", "-l", os.path.join(self.root, "log"),
                  "start")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "optuna")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/optuna"

    def _run(self, program: str, *args: str) -> None:
        cmd = [os.path.join(self.bindir, program), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if out.returncode:
            raise RuntimeError(f"{program} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Torch on one thread for the module (these problems are tiny: a second thread costs more than it gains, and
    far more on a loaded machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
