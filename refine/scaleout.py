"""Independent per-image refinement at scale, on Dask.

    from refine.imagelist import parse_image_list
    from refine.scaleout import refine_images
    summary = refine_images(parse_image_list("stills.lst"), ["orientation", "scale"], "fits.jsonl", workers=8)

Each image of a LIST is refined on its own with :func:`refine.fit` (the per-shot mode) as one Dask task: on a local
cluster of ``workers`` processes by default (on 127.0.0.1, over TLS with credentials made for the run and held by
this process only: no other process or user can submit tasks to it), or on an existing scheduler
(``scheduler="tls://host:8786"`` with ``security=``, see :func:`scheduler_security`: a cluster started with
``dask scheduler`` / ``dask worker``, or with dask-jobqueue on Slurm).  Workers run one fit at a time
with ``cores // workers`` torch threads each (on an existing cluster: the worker machine's cores divided by its Dask
workers × their threads), so workers × threads equals the cores available.

Every finished image appends one JSON line to the results file the moment it ends (one complete line per write,
flushed): ``path``, ``converged``, ``ok``, ``chi2_nu``, ``poor_fit``, ``parameters``, ``esd``, ``loss``, ``seconds``,
``nanobragg_args``, and ``error`` when it failed (then the other values are null and ``ok`` false); ``chi2_nu``,
``poor_fit`` and ``ok`` as in a single-image fit (:class:`refine.Result`: Pearson χ²/ν; why the fit is poor, or null;
converged and not poor).  A rerun with the same results file skips the images already
there (a line cut short by a kill is dropped first), so a killed run is resumed by running it again; an image that
fails records its error and the others go on (delete its line to retry it).  A progress line on stderr shows images
done, failed and the rate.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

from .imagelist import ImageEntry

#: Keys of a result line, in order (``error`` only on failures).  ``chi2_nu``, ``poor_fit`` and ``ok`` are those of
#: the single-image fit (:class:`refine.Result`: ``chi2_reduced``, ``poor_fit`` as the reason or null, ``ok``).
RESULT_KEYS = ("path", "converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd", "loss", "seconds",
               "nanobragg_args", "warnings")


def available_cores() -> int:
    """CPU cores this process may use (affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _host(address: str) -> str:
    """The host part of a Dask address (``tcp://10.0.0.5:40123`` → ``10.0.0.5``)."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _task_threads(threads: Optional[int], host_workers: Optional[Dict[str, int]] = None) -> int:
    """Torch threads for a task: ``threads``, else this machine's cores divided by (Dask workers on this host ×
    the worker's threads), so that workers × threads equals the cores."""
    if threads:
        return int(threads)
    try:
        from distributed import get_worker

        worker = get_worker()
        per = max(1, int(worker.state.nthreads)) * max(1, (host_workers or {}).get(_host(worker.address), 1))
    except (ImportError, ValueError, AttributeError):
        per = 1
    return max(1, available_cores() // per)


def _record(path: str, t0: float, **values) -> dict:
    """A result line: every key of :data:`RESULT_KEYS` (null unless given; ``converged`` and ``ok`` false)."""
    rec = {k: None for k in RESULT_KEYS}
    rec.update(path=path, converged=False, ok=False, seconds=time.perf_counter() - t0)
    rec.update(values)
    return rec


def refine_one(entry: ImageEntry, free: Sequence[str], options: Dict[str, object], threads: Optional[int] = None,
               dtype: str = "float64", matrix_dir: Optional[str] = None,
               host_workers: Optional[Dict[str, int]] = None, adc: Optional[float] = None,
               gain: Optional[float] = None) -> dict:
    """Refine one LIST entry with :func:`refine.fit` (a Dask task; never raises): the result line as a dict.

    ``options``: keyword arguments of :func:`refine.fit` (plain values: target, max_iter, coarse_to_fine, …);
    ``threads``: torch threads (None: see :func:`_task_threads`, with ``host_workers`` {host: Dask workers on it});
    ``matrix_dir``: where refined MOSFLM matrices of
    ``-mat`` models go (``<line>.mat``); ``adc``/``gain``: the image's ADC offset and gain (photons = (value − adc)
    / gain; None: the header's, else 0 and 1).  A failure gives the line with ``error`` set (one line: type and
    message)."""
    import torch

    from .pipeline.fit import fit
    from .imagelist import entry_image, entry_model

    t0 = time.perf_counter()
    try:
        torch.set_num_threads(_task_threads(threads, host_workers))
        params, setup = entry_model(entry, torch.float64 if dtype == "float64" else torch.float32)
        with warnings.catch_warnings(record=True) as caught:  # header values against the flags: into the line
            warnings.simplefilter("always")
            obs = entry_image(entry, setup, options.get("overload"), adc=adc, gain=gain, params=params)
        matrix = None
        if not setup.nanobragg_cell:
            matrix = os.path.join(matrix_dir or entry.base_dir, f"{entry.line:06d}.mat")
            os.makedirs(os.path.dirname(matrix), exist_ok=True)
        res = fit(obs, params, setup, free=list(free), nanobragg_args=entry.flags, matrix_path=matrix, **options)
        d = res.to_dict()
        if matrix is not None and d["nanobragg_args"] is not None:
            res.to_nanobragg_args(matrix_path=matrix, write_matrix=True)
        return _record(entry.path, t0, converged=bool(res.converged), ok=res.ok, chi2_nu=d["chi2_nu"],
                       poor_fit=d["poor_fit"], parameters=d["parameters"], esd=d["esd"], loss=d["loss"],
                       nanobragg_args=d["nanobragg_args"], warnings=[str(w.message) for w in caught])
    except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return _record(entry.path, t0, error=f"{type(exc).__name__}: {msg}")


# ---------------------------------------------------------------------------------------------------------------
# the results file


#: How every line of a results file starts (json.dumps of a :func:`_record`): a last line that starts so but is not
#: valid JSON was cut short by a kill; anything else that is not a JSON object with a "path" is not a results file.
_RECORD_START = b'{"path"'


def _parse_results(results: str):
    """``(records, valid_bytes)`` of a results file (JSON lines: one object with a ``"path"`` per line; blank lines
    allowed; the last line may lack its newline).  ``valid_bytes`` excludes a last line cut short by a kill
    (it starts like a record but is not valid JSON).  ValueError (one line naming the file and the line) for
    anything else — a results file is never guessed at; OSError when it cannot be read."""
    if not os.path.exists(results):
        return [], 0
    if not os.path.isfile(results):
        raise ValueError(f"{results}: not a regular file (a results file is read back to resume)")
    with open(results, "rb") as fh:
        data = fh.read()
    records, pos = [], 0
    lines = data.split(b"\n")
    for k, line in enumerate(lines, start=1):
        last = k == len(lines)
        if line.strip():
            try:
                rec = json.loads(line.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError included
                if last and line.startswith(_RECORD_START):
                    return records, pos
                rec = None
            if not (isinstance(rec, dict) and isinstance(rec.get("path"), str)):
                raise ValueError(f"{results}: line {k} is not a JSON object with a \"path\": not a results file "
                                 "(JSON lines, one object per image, as a run writes them); give a new file name")
            records.append(rec)
        pos += len(line) + (not last)
    return records, pos


def done_paths(results: str) -> set:
    """Paths already in a results file (see :func:`_parse_results`: ValueError when it is not one).  A last line cut
    short by a kill is dropped with a warning, so that its image is refined again; every valid line is kept (one
    without its newline gets it at the next :func:`append_line`)."""
    records, valid = _parse_results(results)
    size = os.path.getsize(results) if os.path.exists(results) else 0
    if valid < size:
        warnings.warn(f"{results}: dropped its last line, cut short by a killed run ({size - valid} bytes); that "
                      "image is refined again")
        with open(results, "r+b") as fh:
            fh.truncate(valid)
    return {rec["path"] for rec in records}


def append_line(results: str, record: dict) -> None:
    """Append one complete JSON line to ``results`` in a single write, flushed and synced (after a newline when the
    file's last line lacks one)."""
    data = (json.dumps(record, allow_nan=True) + "\n").encode()
    fd = os.open(results, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class ProgressBar:
    """``[#####.....] done/total  failed F  R images/min`` on a stream (redrawn in place on a terminal, one line per
    image otherwise)."""

    def __init__(self, total: int, already: int = 0, stream=None, enabled: bool = True):
        self.total, self.done, self.failed, self.new = total, already, 0, 0
        self.stream, self.enabled, self.t0 = (sys.stderr if stream is None else stream), enabled, time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def text(self) -> str:
        """The progress line."""
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = 60.0 * self.new / max(time.perf_counter() - self.t0, 1e-9)
        return (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done  failed {self.failed}  "
                f"{rate:.1f} images/min")

    def update(self, failed: bool) -> None:
        """Count one finished image and redraw."""
        self.done, self.new, self.failed = self.done + 1, self.new + 1, self.failed + int(failed)
        if self.enabled:
            print(("\r" if self.tty else "") + self.text(), end="" if self.tty else "\n", file=self.stream,
                  flush=True)

    def close(self) -> None:
        """End the line on a terminal."""
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class RunSummary:
    """What :func:`refine_images` did: ``total`` images listed, ``skipped`` (already in the results), ``fitted``
    and ``failed`` this run, ``seconds``, ``workers`` and ``threads`` (per worker)."""

    total: int
    skipped: int
    fitted: int = 0
    failed: int = 0
    seconds: float = 0.0
    workers: int = 0
    threads: int = 0
    poor: int = 0  #: fitted this run with a poor fit (χ²/ν far from 1, see :data:`refine.result.POOR_FIT_CHI2`)


# ---------------------------------------------------------------------------------------------------------------
# the cluster


def local_security():
    """Credentials of a local cluster: a self-signed key and certificate made in memory for this run
    (:meth:`distributed.security.Security.temporary`), required by the scheduler, the workers and the client (mutual
    TLS), so that only this process can connect and submit tasks.  ImportError naming the package when
    ``cryptography`` is missing."""
    from distributed.security import Security

    try:
        return Security.temporary()
    except ImportError:
        raise ImportError("a local Dask cluster runs with TLS credentials made for the run: pip install cryptography "
                          "(in the dask extra: pip install -e '.[dask]')") from None


def scheduler_security(address: str, ca_file: Optional[str] = None, cert: Optional[str] = None,
                       key: Optional[str] = None):
    """(Security or None, warning) for a client of an existing scheduler at ``address``.

    A ``tls://`` address needs this client's credentials (PEM files): ``ca_file`` (the certificate authority that
    signed the scheduler's and workers' certificates), ``cert`` (this client's certificate) and ``key`` (its key; None
    when it is in ``cert``); without them, dask's configuration (``distributed.comm.tls.ca-file``,
    ``distributed.comm.tls.client.cert`` / ``.key``, e.g. the environment variables
    ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE``, ``DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT``,
    ``DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY``) is used (Security None).  Any other address (``tcp://``) is
    neither encrypted nor authenticated: the warning says so ('' for ``tls://``).  ValueError (one line naming the
    option) for credentials without a ``tls://`` address, a ``tls://`` address without credentials, or a file that
    cannot be read."""
    import dask.config

    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    scheme = address.split("://", 1)[0] if "://" in address else dask.config.get("distributed.comm.default-scheme")
    if scheme != "tls":
        if any(given.values()):
            raise ValueError(f"{', '.join(k for k, v in given.items() if v)} need a tls:// scheduler address; got "
                             f"--scheduler {address}")
        return None, (f"--scheduler {address}: the connection is neither encrypted nor authenticated (anyone who "
                      "can reach the scheduler can run code as its workers' user); use a tls:// scheduler with "
                      "certificates (docs/refine.md, 'Securing a cluster')")
    for option, path in given.items():
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ValueError(f"{option} {path}: no such readable file")
    if ca_file or cert or key:
        if not (ca_file and cert):
            raise ValueError("a tls:// scheduler needs --tls-ca-file and --tls-cert (and --tls-key unless the key "
                             "is in the certificate file)")
        from distributed.security import Security

        return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key, require_encryption=True), ""
    if not (dask.config.get("distributed.comm.tls.ca-file", None)
            and dask.config.get("distributed.comm.tls.client.cert", None)):
        raise ValueError(f"--scheduler {address}: a tls:// scheduler needs this client's credentials: --tls-ca-file, "
                         "--tls-cert and --tls-key (or dask's configuration distributed.comm.tls.ca-file and "
                         "distributed.comm.tls.client.cert/key)")
    return None, ""


def make_client(workers: Optional[int] = None, scheduler: Optional[str] = None, security=None,
                timeout: float = 30.0):
    """(Dask client, local cluster or None, torch threads per task or None): a client of the ``scheduler`` address
    (with ``security``, else dask's configuration; connecting for at most ``timeout`` s), or of a new local cluster
    of ``workers`` processes (default: one per core) with one task at a time each, on 127.0.0.1 over TLS with
    :func:`local_security` (only this process holds the credentials).  Distributed's own log lines are kept to
    CRITICAL on the workers (failures reach the results as error lines; shutting down after ``--limit`` while
    workers are busy would otherwise print their heartbeat tracebacks)."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, security=security, timeout=timeout), None, None
        except (OSError, TimeoutError) as exc:  # unreachable, or TLS refused (credentials of another CA)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OSError(f"--scheduler {scheduler}: cannot connect ({first})") from None
    cores = available_cores()
    n = max(1, int(workers or cores))
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           host="127.0.0.1", protocol="tls://", security=local_security(),
                           silence_logs=logging.CRITICAL)
    return Client(cluster), cluster, max(1, cores // n)


@contextlib.contextmanager
def quiet_dask_logs(level: int = logging.CRITICAL):
    """Keep the ``distributed`` loggers of this process at ``level`` or above inside the block (a client's or an
    in-process scheduler's messages while connections close), then restore them."""
    log = logging.getLogger("distributed")
    old = log.level
    log.setLevel(max(level, old))
    try:
        yield
    finally:
        log.setLevel(old)


def _collect(client, futures, results: str, bar: ProgressBar, summary: RunSummary, limit: Optional[int]):
    """Append each finished image's line as it arrives; stop after ``limit`` new lines (when given)."""
    from distributed import as_completed

    for fut in as_completed(futures):
        entry = futures[fut]
        try:
            rec = fut.result()
        except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
            rec = _record(entry.path, time.perf_counter(), error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        append_line(results, rec)
        failed = rec.get("error") is not None
        summary.fitted += int(not failed)
        summary.failed += int(failed)
        summary.poor += int(bool(rec.get("poor_fit")))
        bar.update(failed)
        if limit is not None and summary.fitted + summary.failed >= limit:
            for f in futures:
                f.cancel()
            return


def refine_images(entries: Iterable[ImageEntry], free: Sequence[str], results: str, *, workers: Optional[int] = None,
                  scheduler: Optional[str] = None, options: Optional[Dict[str, object]] = None,
                  threads: Optional[int] = None, dtype: str = "float64", limit: Optional[int] = None,
                  progress: bool = True, stream=None, security=None, adc: Optional[float] = None,
                  gain: Optional[float] = None) -> RunSummary:
    """Refine every entry not yet in ``results`` (JSON lines) independently on Dask; see the module docstring.

    Args:
        entries: the LIST (:func:`refine.imagelist.parse_image_list`).
        free: groups to refine per image (as :func:`refine.fit`).
        results: the JSON-lines file (appended to; images already in it are skipped).
        workers: local worker processes (default: one per core); ignored with ``scheduler``.
        scheduler: address of an existing Dask scheduler (``tls://host:8786``, or an unprotected ``tcp://``).
        options: keyword arguments of :func:`refine.fit` (plain, picklable values).
        threads: torch threads per task (default: cores / workers).
        limit: stop after this many new results (the rest stay to a rerun).
        progress: show the progress line on ``stream`` (default stderr).
        security: credentials for ``scheduler`` (a :class:`distributed.security.Security`, e.g. from
            :func:`scheduler_security`; None: dask's configuration).  A local cluster makes its own
            (:func:`local_security`).
        adc, gain: every image's ADC offset and gain (photons = (value − adc) / gain; None: each image's header,
            else 0 and 1).

    Returns:
        :class:`RunSummary`.
    """
    t0 = time.perf_counter()
    entries = list(entries)
    with open(results, "ab"):  # fails now, not after the first fit, when the file cannot be written
        pass
    done = done_paths(results)
    todo = [e for e in entries if e.path not in done]
    summary = RunSummary(total=len(entries), skipped=len(entries) - len(todo))
    bar = ProgressBar(len(entries), summary.skipped, stream, progress)
    if not todo:
        return summary
    with quiet_dask_logs():
        client, cluster, local_threads = make_client(workers, scheduler, security)
        try:
            threads = threads or local_threads
            addresses = list(client.scheduler_info()["workers"])
            host_workers = dict(collections.Counter(_host(a) for a in addresses))
            summary.workers, summary.threads = len(addresses), threads or 0
            matrix_dir = os.path.splitext(os.path.abspath(results))[0] + "_matrices"
            futures = {client.submit(refine_one, e, list(free), dict(options or {}), threads, dtype, matrix_dir,
                                     host_workers, adc, gain, pure=False,
                                     key=f"refine-{e.line}-{os.path.basename(e.path)}-{time.time_ns()}"): e
                       for e in todo}
            _collect(client, futures, results, bar, summary, limit)
        finally:
            bar.close()
            client.close()
            if cluster is not None:
                cluster.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def read_results(results: str) -> List[dict]:
    """Every line of a results file, as dicts (for analysis; a last line cut short by a kill is skipped); none when
    the file does not exist.  ValueError when it is not a results file (:func:`_parse_results`)."""
    return _parse_results(results)[0]
