"""Independent per-image refinement at scale, on Dask.

    from refine.imagelist import parse_image_list
    from refine.scaleout import refine_images
    summary = refine_images(parse_image_list("stills.lst"), ["orientation", "scale"], "fits.jsonl", workers=8)

Each image of a LIST is one Dask task running :func:`refine.fit`: on a local cluster of ``workers`` processes (on
127.0.0.1, over mutual TLS with credentials made for the run and held by this process only), or on an existing
scheduler (``scheduler="tls://host:8786"``, ``security=`` from :func:`scheduler_security`; ``dask scheduler`` /
``dask worker``, or dask-jobqueue on Slurm).  Every finished image appends one JSON line (:data:`RESULT_KEYS`) to
the results file at once; a rerun skips the images already there (a line cut short by a kill is dropped first), so
a killed run is resumed by running it again; a failed image records its ``error`` and the others go on.  A shot of
an ``--expt-list`` (:func:`refine.imagelist.parse_expt_list`) also writes its refined experiment list into
``expt_dir`` and its line gains :data:`EXPT_KEYS`.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import json
import logging
import os
import sys
import time
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .imagelist import (ImageEntry, entry_detector, entry_image, entry_spots, entry_start, refined_expt_dir,
                        result_key, write_refined_expt)
from .pipeline.fit import fit
from .targets.detector import readout_option

#: Keys of a result line, in order, plus ``error`` when the image failed (the others then null, ``ok`` false):
#: ``seconds`` the task's time, ``warnings`` the header's disagreements with the flags, the rest from
#: :meth:`refine.Result.to_dict`.
RESULT_KEYS = ("path", "converged", "ok", "chi2_nu", "poor_fit", "parameters", "esd", "loss", "seconds",
               "nanobragg_args", "warnings")
#: The keys a shot of an --expt-list adds: ``expt`` (:meth:`refine.imagelist.ImageEntry.expt_report`: the input
#: ``.expt``, the experiment K, its identifier, the line's REFL and the refined list written) and ``out_expt`` (that
#: refined list, null when the shot failed).
EXPT_KEYS = ("expt", "out_expt")


def available_cores() -> int:
    """CPU cores this process may use (affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _host(address: str) -> str:
    """The host part of a Dask address (``tcp://10.0.0.5:40123`` → ``10.0.0.5``)."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _one_line(exc: BaseException) -> str:
    """``Type: the message's first line`` (the repr when it has none)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else repr(exc)}"


def _record(entry: ImageEntry, t0: float, **values) -> dict:
    """A result line of ``entry``: every key of :data:`RESULT_KEYS` (and of :data:`EXPT_KEYS` for a shot of an
    --expt-list; null unless given; ``converged`` and ``ok`` false)."""
    expt = {"expt": entry.expt_report(None), "out_expt": None} if entry.expt else {}
    return {**dict.fromkeys(RESULT_KEYS), "path": entry.path, "converged": False, "ok": False,
            "seconds": time.perf_counter() - t0, **expt, **values}


def _task_threads(threads: Optional[int], host_workers: Optional[Dict[str, int]]) -> int:
    """``threads``, else this machine's cores / (Dask workers on this host × the worker's threads)."""
    if threads:
        return int(threads)
    try:
        from distributed import get_worker

        worker = get_worker()
        per = max(1, int(worker.state.nthreads)) * max(1, (host_workers or {}).get(_host(worker.address), 1))
    except (ImportError, ValueError, AttributeError):
        per = 1
    return max(1, available_cores() // per)


def refine_one(entry: ImageEntry, free: Sequence[str], options: Dict[str, object], threads: Optional[int] = None,
               dtype: str = "float64", matrix_dir: Optional[str] = None,
               host_workers: Optional[Dict[str, int]] = None, adc: Optional[float] = None,
               gain: Optional[float] = None, gain_map: Optional[str] = None, expt_dir: Optional[str] = None) -> dict:
    """Refine one LIST entry with :func:`refine.fit` (a Dask task; never raises): the result line as a dict.

    ``options``: keyword arguments of :func:`refine.fit` (plain values); ``threads``: torch threads (None: see
    :func:`_task_threads`, ``host_workers`` {host: Dask workers on it}); ``matrix_dir``: where refined MOSFLM
    matrices of ``-mat`` models go (``<line>.mat``); ``adc``/``gain``: photons = (value − adc) / gain (None: the
    header's, else 0 and 1); ``gain_map``: a per-pixel gain file instead (:func:`refine.imagelist.entry_image`);
    ``expt_dir``: where a shot of an --expt-list writes its refined experiment list
    (:func:`refine.imagelist.write_refined_expt`; default the LIST's folder); a shot with a REFL is a spot-ROI fit
    of its rows (:func:`refine.imagelist.entry_spots`).  A failure gives the line with ``error`` (type and message,
    one line)."""
    t0 = time.perf_counter()
    try:
        torch.set_num_threads(_task_threads(threads, host_workers))
        params, setup, geometry = entry_start(entry, torch.float64 if dtype == "float64" else torch.float32)
        with warnings.catch_warnings(record=True) as caught:  # header values against the flags: into the line
            warnings.simplefilter("always")
            obs = entry_image(entry, setup, options.get("overload"), adc=adc, gain=gain, params=params,
                              geometry=geometry, gain_map=gain_map)
        matrix = None if setup.nanobragg_cell or entry.expt else \
            os.path.join(matrix_dir or entry.base_dir, f"{entry.line:06d}.mat")
        if matrix is not None:
            os.makedirs(os.path.dirname(matrix), exist_ok=True)
        own = readout_option(entry_detector(entry, setup), options.get("target"), options.get("readout_noise_adu"))
        res = fit(obs, params, setup, free=list(free), nanobragg_args=entry.flags, matrix_path=matrix,
                  spots=entry_spots(entry), **dict(options, **own))
        expt = {}
        if entry.expt:
            out = write_refined_expt(entry, res, expt_dir or entry.base_dir)
            res = dataclasses.replace(res, expt=entry.expt_report(out))
            expt = {"expt": res.expt, "out_expt": out}
        d = res.to_dict()
        if matrix is not None and d["nanobragg_args"] is not None:
            res.to_nanobragg_args(matrix_path=matrix, write_matrix=True)
        return _record(entry, t0, **{k: d[k] for k in RESULT_KEYS if k in d and k != "seconds"},
                       warnings=[str(w.message) for w in caught], **expt)
    except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
        return _record(entry, t0, error=_one_line(exc))


def _parse_results(results: str):
    """``(records, cut_bytes)`` of a results file (JSON lines, blank lines allowed, the last one maybe without its
    newline); ``cut_bytes``: the size of a last line cut short by a kill (a record's start, not valid JSON), or 0.
    ValueError (one line naming the file and the line) for anything else — a results file is never guessed at;
    OSError when it cannot be read."""
    if not os.path.exists(results):
        return [], 0
    if not os.path.isfile(results):
        raise ValueError(f"{results}: not a regular file (a results file is read back to resume)")
    with open(results, "rb") as fh:
        data = fh.read()
    records, pos = [], 0
    lines = data.split(b"\n")
    for k, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rec = json.loads(line.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError included
                if k == len(lines) and line.startswith(b'{"path"'):  # how json.dumps of a _record starts
                    return records, len(data) - pos
                rec = None
            if not (isinstance(rec, dict) and isinstance(rec.get("path"), str)):
                raise ValueError(f"{results}: line {k} is not a JSON object with a \"path\": not a results file "
                                 "(JSON lines, one object per image, as a run writes them); give a new file name")
            records.append(rec)
        pos += len(line) + 1
    return records, 0


def done_keys(results: str) -> set:
    """The :func:`refine.imagelist.result_key` of every line already in a results file (ValueError when it is not
    one).  A last line cut short by a kill is dropped with a warning, so that its image is refined again."""
    records, cut = _parse_results(results)
    if cut:
        warnings.warn(f"{results}: dropped its last line, cut short by a killed run ({cut} bytes); that image is "
                      "refined again")
        with open(results, "r+b") as fh:
            fh.truncate(os.path.getsize(results) - cut)
    return {result_key(rec) for rec in records}


def done_paths(results: str) -> set:
    """The image paths already in a results file (:func:`done_keys`' first members)."""
    return {key[0] for key in done_keys(results)}


def read_results(results: str) -> List[dict]:
    """Every line of a results file as a dict (a last line cut short by a kill skipped; none when the file does not
    exist); ValueError when it is not a results file."""
    return _parse_results(results)[0]


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
        filled = int(30 * self.done / max(self.total, 1))
        rate = 60.0 * self.new / max(time.perf_counter() - self.t0, 1e-9)
        return (f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} done  failed {self.failed}  "
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


def scheduler_security(address: str, ca_file: Optional[str] = None, cert: Optional[str] = None,
                       key: Optional[str] = None):
    """(Security or None, warning) for a client of an existing scheduler at ``address``.

    A ``tls://`` address needs this client's PEM files: ``ca_file`` (the CA that signed the scheduler's and workers'
    certificates), ``cert`` and ``key`` (None when it is in ``cert``); without them, dask's configuration
    (``distributed.comm.tls.ca-file``, ``.client.cert`` / ``.key``, e.g. from ``DASK_DISTRIBUTED__COMM__TLS__*``
    variables; Security None).  Any other address is neither encrypted nor authenticated: the warning says so.
    ValueError (one line naming the argument) for credentials without a ``tls://`` address, a ``tls://`` address
    without credentials, or a file that cannot be read."""
    import dask.config
    from distributed.security import Security

    given = {name: path for name, path in (("ca_file", ca_file), ("cert", cert), ("key", key)) if path}
    scheme = address.split("://", 1)[0] if "://" in address else dask.config.get("distributed.comm.default-scheme")
    if scheme != "tls":
        if given:
            raise ValueError(f"{', '.join(f'{k}={v!r}' for k, v in given.items())} need a tls:// scheduler "
                             f"address; got scheduler={address!r}")
        return None, (f"--scheduler {address}: the connection is neither encrypted nor authenticated (anyone who "
                      "can reach the scheduler can run code as its workers' user); use a tls:// scheduler with "
                      "certificates (docs/refine.md, 'Securing a cluster')")
    for name, path in given.items():
        if not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ValueError(f"{name}={path!r}: no such readable file")
    if ca_file and cert:
        return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key, require_encryption=True), ""
    if given or not (dask.config.get("distributed.comm.tls.ca-file", None)
                     and dask.config.get("distributed.comm.tls.client.cert", None)):
        config = "" if given else "; or dask's configuration distributed.comm.tls.ca-file and .client.cert/key"
        raise ValueError(f"{' and '.join(n for n in ('ca_file', 'cert') if n not in given)} must be given for "
                         f"scheduler={address!r}: a tls:// scheduler needs this client's credentials (the key too "
                         f"unless it is in the certificate file{config})")
    return None, ""


def collect_failed_clients() -> None:
    """Collect now the garbage a Dask client leaves when its connection fails (it sits in a reference cycle with the
    exception's frames): its ``__del__`` closes its event loop under a lock that distributed shares between clients,
    and run by the garbage collector inside the next client's start it waits on that lock forever (seen as a hung
    run)."""
    gc.collect()


def make_client(workers: Optional[int] = None, scheduler: Optional[str] = None, security=None,
                timeout: float = 30.0):
    """(Dask client, local cluster or None, torch threads per task or None): a client of ``scheduler`` (with
    ``security``, else dask's configuration; connecting for at most ``timeout`` s), or of a new local cluster of
    ``workers`` processes (default: one per core), one task at a time each, on 127.0.0.1 over mutual TLS with
    credentials made in memory for this run (ImportError without ``cryptography``).  Its workers' Dask log lines are
    kept to CRITICAL (failures reach the results; a ``limit`` shutdown would print heartbeat tracebacks)."""
    from distributed import Client, LocalCluster
    from distributed.security import Security

    if scheduler:
        try:
            return Client(scheduler, security=security, timeout=timeout), None, None
        except (OSError, TimeoutError) as exc:  # unreachable, or TLS refused (credentials of another CA)
            message = _one_line(exc)
        collect_failed_clients()
        raise OSError(f"--scheduler {scheduler}: cannot connect ({message})") from None
    try:
        security = Security.temporary()
    except ImportError:
        raise ImportError("a local Dask cluster runs with TLS credentials made for the run: pip install cryptography "
                          "(in the dask extra: pip install -e '.[dask]')") from None
    n = max(1, int(workers or available_cores()))
    # the scheduler's HTTP server on a free local port: its default, 8787, may be another cluster's (a warning)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                           host="127.0.0.1", protocol="tls://", security=security, silence_logs=logging.CRITICAL)
    return Client(cluster), cluster, max(1, available_cores() // n)


@dataclasses.dataclass
class RunSummary:
    """What :func:`refine_images` did: ``total`` images listed, ``skipped`` (already in the results), ``fitted``,
    ``failed`` and ``poor`` (poor fits) this run, ``seconds``, ``workers`` and ``threads`` (per worker)."""

    total: int
    skipped: int
    fitted: int = 0
    failed: int = 0
    seconds: float = 0.0
    workers: int = 0
    threads: int = 0
    poor: int = 0


def refine_images(entries: Iterable[ImageEntry], free: Sequence[str], results: str, *, workers: Optional[int] = None,
                  scheduler: Optional[str] = None, options: Optional[Dict[str, object]] = None,
                  threads: Optional[int] = None, dtype: str = "float64", limit: Optional[int] = None,
                  progress: bool = True, stream=None, security=None, adc: Optional[float] = None,
                  gain: Optional[float] = None, gain_map: Optional[str] = None,
                  expt_dir: Optional[str] = None) -> RunSummary:
    """Refine every entry not yet in ``results`` (JSON lines) independently on Dask; see the module docstring.

    ``entries``: the LIST (:func:`refine.imagelist.parse_image_list`); ``free``: groups refined per image;
    ``workers``: local worker processes (default: one per core); ``scheduler``: an existing Dask scheduler instead
    (``tls://host:8786`` with ``security`` from :func:`scheduler_security`, else dask's configuration; or an
    unprotected ``tcp://``); ``options``: keyword arguments of :func:`refine.fit` (plain, picklable values);
    ``threads``: torch threads per task (default: cores / workers); ``limit``: stop after this many new results;
    ``progress``: the progress line on ``stream`` (default stderr); ``adc``, ``gain``, ``gain_map``: as
    :func:`refine_one`; ``expt_dir``: where the shots of an --expt-list write their refined experiment lists
    (default: next to ``results``, its stem + ``_refined``; made when missing)."""
    t0 = time.perf_counter()
    entries = list(entries)
    open(results, "ab").close()  # fails now, not after the first fit, when the file cannot be written
    done = done_keys(results)
    todo = [e for e in entries if e.key() not in done]
    summary = RunSummary(total=len(entries), skipped=len(entries) - len(todo))
    bar = ProgressBar(len(entries), summary.skipped, stream, progress)
    if not todo:
        return summary
    from distributed import as_completed

    log = logging.getLogger("distributed")  # this process's client and scheduler, quiet while connections close
    level = log.level
    log.setLevel(max(logging.CRITICAL, level))
    try:
        client, cluster, local_threads = make_client(workers, scheduler, security)
        try:
            threads = threads or local_threads
            addresses = list(client.scheduler_info()["workers"])
            host_workers = dict(collections.Counter(_host(a) for a in addresses))
            summary.workers, summary.threads = len(addresses), threads or 0
            stem = os.path.splitext(os.path.abspath(results))[0]
            expt_dir = os.path.abspath(expt_dir or refined_expt_dir(results))
            futures = {client.submit(refine_one, e, list(free), dict(options or {}), threads, dtype,
                                     stem + "_matrices", host_workers, adc, gain, gain_map, expt_dir, pure=False,
                                     key=f"refine-{e.line}-{e.experiment}-{os.path.basename(e.path)}-"
                                         f"{time.time_ns()}"): e
                       for e in todo}
            for fut in as_completed(futures):  # each line appended as it arrives
                try:
                    rec = fut.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
                    rec = _record(futures[fut], time.perf_counter(), error=_one_line(exc))
                append_line(results, rec)
                failed = rec.get("error") is not None
                summary.fitted, summary.failed = summary.fitted + (not failed), summary.failed + failed
                summary.poor += bool(rec.get("poor_fit"))
                bar.update(failed)
                if limit is not None and summary.fitted + summary.failed >= limit:
                    client.cancel(list(futures))  # the rest stay to a rerun
                    break
        finally:
            bar.close()
            client.close()
            if cluster is not None:
                cluster.close()
    finally:
        log.setLevel(level)
    summary.seconds = time.perf_counter() - t0
    return summary
