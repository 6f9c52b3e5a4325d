"""Optuna studies over refinements: global search beyond the local basin, and hyperparameter sweeps.

    from refine import studies
    found = studies.global_search(observed, params, setup, {"orientation": 5.0}, n_trials=40,
                                  free=("orientation", "scale"), storage="sqlite:///search.db")
    print(found.result.summary())             # the best trial's model refined to convergence, with ESDs

    objective = studies.global_search_objective(observed, params, setup, {"orientation": 5.0})
    objective(optuna.trial.FixedTrial({"orientation.x_deg": 1.0, "orientation.y_deg": 0, "orientation.z_deg": 0}))

Local refinement (:func:`refine.fit`) converges only from close starts; a study samples starting models in a box
about the user's start (:data:`SEARCH_UNITS`: orientation ± degrees about the lab axes, cell lengths ± percent,
distance ± mm, beam centre ± pixels), runs a short coarse-to-fine refinement from each (:func:`trial_stages`),
reports the loss after every stage so that pruners stop hopeless trials, and scores every trial by the loss of its
refined model with the fit's target and the real spot model on all usable pixels (the same pixels and model for
every trial, so losses compare).  The user's start is enqueued as trial 0.  :func:`finish_best` refines the best
trial's model to convergence.  :func:`hyperparameter_objective` sweeps minimiser, damping / learning rate, schedule,
target, spot-ROI size and oversample, scored on the data or against a known truth (:func:`hyperparameter_sweep`
runs it as a study).

Studies live in a storage (:func:`open_storage`): an SQLite file (the default, next to the output), a journal file
(many processes on one machine) or a PostgreSQL URL (many machines).  :func:`run_study` runs ``workers`` processes
on it; re-running with the same storage and study name adds trials to the same study.  RDB storages keep
heartbeats, and trials left RUNNING by a process that died on this machine are marked FAIL when a run starts
(:func:`fail_orphaned_trials`), so a killed run loses no finished trial and leaves none RUNNING forever.  A server
storage must connect within ``connect_timeout`` seconds (:data:`CONNECT_TIMEOUT`), and its password is never shown:
errors, log lines and reprs go through :func:`redact` / :func:`redact_text`.

Optuna is an optional dependency (``pip install 'nbtorch[optuna]'``), imported when a function needs it.
Plots: :func:`plot_history`, :func:`plot_importances`, :func:`plot_surface` (:mod:`refine.study_plots`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import socket
import sys
import time
import warnings
import zlib
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from nbtorch.units import DEG_PER_MRAD, percent_to_fraction

from ..model.table import DEFAULT_RANGES, SEARCH_SUFFIX, SEARCH_UNITS  # noqa: F401
from ..pipeline.options import FitOptions
from ..pipeline.result import Result, finish
from ..pipeline.strategy import FitState, Stage, default_stages, prepare, run_stage
from . import plots as study_plots  # noqa: F401
from .plots import plot_history, plot_importances, plot_surface  # noqa: F401  (re-exported)

SAMPLERS = ("tpe", "cmaes", "gp", "random")
PRUNERS = ("median", "hyperband", "none")
#: Storage URL schemes: SQLite file, journal file, PostgreSQL (also with a driver, postgresql+psycopg2://).
STORAGE_FORMS = "sqlite:///FILE.db, journal:FILE.log (or FILE.log), postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"


def require_optuna():
    """The ``optuna`` module; ImportError with the install command when it is absent."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("refine.studies needs optuna: pip install 'nbtorch[optuna]' (or pip install optuna)") \
            from exc
    return optuna


# ---------------------------------------------------------------------------------------------------------------
# the search box


def parse_search(text: str) -> Dict[str, float]:
    """``"orientation:5,cell:3"`` → {"orientation": 5.0, "cell": 3.0} (half-widths in the group's unit,
    :data:`SEARCH_UNITS`; a single scalar such as ``orientation.z`` or ``beam_center.x`` may be named).

    Raises ValueError naming an empty list, an entry without ':', an unknown group, or a range that is not a
    positive number."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items):
        raise ValueError(f"--search is empty: give GROUP:RANGE[,GROUP:RANGE...] with groups "
                         f"{', '.join(SEARCH_UNITS)}")
    out: Dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--search entry {item!r} is malformed: expected GROUP:RANGE, e.g. orientation:5")
        check_search_name(name)
        try:
            half = float(value)
        except ValueError:
            raise ValueError(f"--search range {value.strip()!r} of {name} is not a number") from None
        if not (math.isfinite(half) and half > 0):
            raise ValueError(f"--search range of {name} must be a number > 0 ({SEARCH_UNITS[name.split('.')[0]]}); "
                             f"got {value.strip()!r}")
        out[name] = half
    return out


def check_search_name(name: str) -> None:
    """ValueError unless ``name`` is a searchable group (:data:`SEARCH_UNITS`) or one of its scalars."""
    from ..model.table import SPECS

    group = name.split(".")[0]
    if group not in SEARCH_UNITS or ("." in name and (name not in SPECS or name.startswith("cell.") and
                                                      SPECS[name].unit != "Å")):
        raise ValueError(f"--search group {name!r} is unknown: searchable groups are "
                         f"{', '.join(f'{g} ({u})' for g, u in SEARCH_UNITS.items())}, or one of their scalars "
                         "(orientation.z, cell.a, beam_center.x ...)")


class Dimension(NamedTuple):
    """One sampled scalar: ``name`` (the trial parameter, e.g. 'orientation.x_deg'), ``index`` (its position in x),
    ``half`` (half-width in the group's unit), ``to_x`` (increment units per unit: mrad per degree, Å per percent,
    1 per mm, mm per pixel)."""

    name: str
    index: int
    half: float
    to_x: float


def search_dimensions(par, search: Mapping[str, float]) -> List[Dimension]:
    """The sampled scalars of a search box ``search`` ({group or scalar: half-width}, units :data:`SEARCH_UNITS`)
    for the parameterisation ``par``: every free scalar of each named group (cell: the free lengths).  ValueError
    names a group that is not free."""
    dims: Dict[int, Dimension] = {}
    for name, half in search.items():
        check_search_name(name)
        group = name.split(".")[0]
        idx = [i for i in par.index(name) if not (group == "cell" and par.scalars[i].unit != "Å")]
        if not idx:
            raise ValueError(f"--search {name}: not refined here; add it to the free groups (--refine) to search it")
        for i in idx:
            s = par.scalars[i]
            to_x = {"orientation": 1.0 / DEG_PER_MRAD, "cell": percent_to_fraction(s.ref), "distance": 1.0,
                    "beam_center": par.setup.pixel_size}[group]
            dims[i] = Dimension(s.name + SEARCH_SUFFIX[group], i, float(half), float(to_x))
    return [dims[i] for i in sorted(dims)]


def trial_stages(iterations: int = 4) -> List[Stage]:
    """A short coarse-to-fine schedule for one trial: the default stages with ``iterations`` minimiser iterations
    each; the last, non-preliminary, stage is the real model with the fit's target."""
    return default_stages(iterations, iterations, iterations)


# ---------------------------------------------------------------------------------------------------------------
# objectives


def _tensors(tree) -> List[torch.Tensor]:
    """The tensors of a NamedTuple pytree (Params), in field order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, tuple):
        return [t for item in tree for t in _tensors(item)]
    return []


class GlobalSearchObjective:
    """``objective(trial) -> loss`` of a global search (build with :func:`global_search_objective`).

    Attributes: ``base`` (the prepared :class:`~refine.strategy.FitState` at the user's start), ``dimensions``
    (:class:`Dimension` list), ``stages`` (run by every trial).  A trial suggests one value per dimension (uniform
    within ± its half-width), starts from the corresponding increments, runs the stages and reports each stage's
    ``loss_all`` (fit target, real model, all usable pixels) as step k, raising ``optuna.TrialPruned`` when the
    pruner says so; it returns the final loss and stores the refined increments as the user attribute ``x``.
    """

    def __init__(self, base: FitState, dimensions: Sequence[Dimension], stages: Sequence[Stage]):
        self.base, self.dimensions, self.stages = base, list(dimensions), list(stages)

    def fingerprint(self) -> str:
        """A digest of what trials of this objective depend on (observed pixels, starting model, Setup, free
        scalars, sampled dimensions and stages): a study's trials compare only under one fingerprint."""
        pb = self.base.problem
        h = hashlib.sha1()
        for t in (pb.observed, *_tensors(pb.par.ref)):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        h.update(repr((pb.par.setup, pb.par.names, self.dimensions, self.stages, pb.target.name)).encode())
        return h.hexdigest()[:16]

    def start_params(self) -> Dict[str, float]:
        """Trial parameters of the user's start (every value 0)."""
        return {d.name: 0.0 for d in self.dimensions}

    def start_x(self, values: Mapping[str, float]) -> torch.Tensor:
        """Starting increments x [n] of trial parameters ``values`` ({dimension name: value in its unit})."""
        x = self.base.x.clone()
        for d in self.dimensions:
            x[d.index] = x[d.index] + float(values[d.name]) * d.to_x
        return x

    def run(self, x0: torch.Tensor, report: Optional[Callable[[float, int], bool]] = None) -> FitState:
        """Run the stages from increments ``x0``; ``report(loss_all, step)`` after each stage that ran (True:
        stop).  Returns the last state."""
        pb = self.base.problem
        state = dataclasses.replace(self.base, x=x0, start_loss=pb.objective.loss(x0))
        for step, stage in enumerate(self.stages):
            state = run_stage(state, stage)
            loss = state.stages[-1].get("loss_all")
            if report is not None and loss is not None and report(float(loss), step):
                break
        return state

    def __call__(self, trial) -> float:
        optuna = require_optuna()
        values = {d.name: trial.suggest_float(d.name, -d.half, d.half) for d in self.dimensions}
        trial.set_user_attr("worker", worker_id())

        def report(loss: float, step: int) -> bool:
            trial.report(loss if math.isfinite(loss) else sys.float_info.max, step)
            if step < len(self.stages) - 1 and trial.should_prune():  # after the last stage the trial is done
                raise optuna.TrialPruned(f"pruned after stage {self.stages[step].name} (loss {loss:.6g})")
            return False

        state = self.run(self.start_x(values), report)
        loss = state.stages[-1].get("loss_all") if state.stages else None  # the last stage's, at state.x
        loss = state.problem.objective.loss(state.x) if loss is None else float(loss)
        trial.set_user_attr("x", [float(v) for v in state.x])
        if not math.isfinite(loss):
            raise FloatingPointError(f"trial {trial.number}: the refined model's loss is not finite")
        return float(loss)


def _options(options: Optional[FitOptions], overrides: dict) -> FitOptions:
    """``options`` (default FitOptions()) with ``overrides``; ``free`` None is left as it is."""
    if overrides.get("free") is None:
        overrides.pop("free", None)
    return (options or FitOptions()).replace(**overrides) if overrides else (options or FitOptions())


def option_fields(options: FitOptions) -> dict:
    """The fields of ``options`` as keyword arguments that pickle (bounds and priors as plain dicts), so that a
    factory partial can travel to worker processes."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    for name in ("bounds", "priors"):
        if out[name] is not None:
            out[name] = dict(out[name])
    return out


def global_search_objective(observed, params, setup, search: Mapping[str, float], *,
                            options: Optional[FitOptions] = None, stages: Optional[Sequence[Stage]] = None,
                            iterations: int = 4, **overrides) -> GlobalSearchObjective:
    """Objective factory of a global search about a starting model.

    Args:
        observed: image [slow, fast] (photons; tensor, array, ObservedImage or path), as for :func:`refine.fit`.
        params, setup: the user's starting model; x are increments about it.
        search: {group or scalar: half-width}: orientation degrees, cell percent (lengths), distance mm, beam_center
            pixels (:func:`parse_search` reads the command line's form).  Every searched group must be free.
        options, overrides: the fit's :class:`~refine.options.FitOptions` (``free`` etc.; keyword overrides win).
        stages: each trial's schedule (default :func:`trial_stages` with ``iterations`` per stage).

    Returns:
        :class:`GlobalSearchObjective`, ``objective(trial) -> loss`` (fit target on all usable pixels).
    """
    opts = _options(options, dict(overrides))
    base = prepare(observed, params, setup, opts)
    dims = search_dimensions(base.problem.par, search)
    return GlobalSearchObjective(base, dims, list(stages) if stages is not None else trial_stages(iterations))


def best_x(study, objective: GlobalSearchObjective) -> Tuple[int, torch.Tensor]:
    """(trial number, refined increments x [n]) of the study's best COMPLETE trial."""
    trial = study.best_trial
    x = torch.as_tensor(trial.user_attrs["x"], dtype=objective.base.x.dtype, device=objective.base.x.device)
    return trial.number, x


def finish_best(study, objective: GlobalSearchObjective, stages: Optional[Sequence[Stage]] = None) -> Result:
    """The best trial's refined model refined to convergence (default: one final stage with the fit's minimiser,
    target and ``max_iter``) → :class:`refine.Result` with ESDs."""
    _, x = best_x(study, objective)
    state = dataclasses.replace(objective.base, x=x, start_loss=objective.base.problem.objective.loss(x))
    for stage in (stages or [Stage("fine", preliminary=False)]):
        state = run_stage(state, stage)
    return finish(state)


# ---------------------------------------------------------------------------------------------------------------
# storage, samplers, pruners, workers


def worker_id() -> str:
    """'host:pid' of this process (recorded on every trial it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


#: Seconds a server storage (PostgreSQL, MySQL) may take to connect before opening it fails (the drivers wait at
#: least 2 s: libpq's minimum).
CONNECT_TIMEOUT = 10.0
#: Where a URL's query string starts: '?' followed by NAME= (a '?' inside a password is not followed by NAME=).
_QUERY_START = re.compile(r"\?(?=[A-Za-z_][A-Za-z0-9_]*=)")
#: A password given as a query parameter (libpq's ``?password=...``).
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def _credentials(url: str, guess: bool = True) -> Optional[Tuple[str, str, Optional[str], str]]:
    """(``scheme://``, user, password or None, ``host...``) of a server URL, or None when it names no user.

    The password ends at the LAST '@' before the query string, so it may hold '@', ':', '/' and '?' unencoded
    (an '@' in the database name must be written %40); a URL whose part after ``://`` starts with '/'
    (sqlite:///FILE, postgresql:///DB?host=...) has no user part.  With ``guess`` (for hiding a password), an
    '@' only inside what looks like the query string also ends a user part."""
    head, sep, rest = str(url).partition("://")
    if not sep or rest.startswith("/"):
        return None
    query = _QUERY_START.search(rest)
    at = rest.rfind("@", 0, query.start() if query else len(rest))
    if at < 0 and guess:
        at = rest.rfind("@")  # only after a '?': a password holding '?NAME=' (hidden: better too much than too little)
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    return head + sep, user, (password if colon else None), rest[at + 1:]


def redact(url: str) -> str:
    """``url`` with its password replaced by *** (the user part's, and a ``password=`` query parameter's);
    a password may contain '@', ':', '/' (see :func:`_credentials`)."""
    text = str(url)
    parts = _credentials(text)
    if parts is not None and parts[2]:
        head, user, _, tail = parts
        text = f"{head}{user}:***@{tail}"
    return _QUERY_PASSWORD.sub(r"\1***", text)


def _secrets(url: str) -> List[Tuple[str, str]]:
    """(text that reveals ``url``'s password, its replacement): the URL as given and normalised (→ :func:`redact`'s
    form), and the password as written, percent-decoded and percent-encoded (→ ***); longest first."""
    from urllib.parse import quote, unquote

    url = str(url)
    forms = {url}
    try:
        forms.add(normalise_url(url))
    except ValueError:
        pass
    words = set()
    for form in forms:
        parts = _credentials(form)
        passwords = [parts[2]] if parts is not None and parts[2] else []
        passwords += [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(form)]
        for pw in filter(None, passwords):
            words.update({pw, unquote(pw), quote(unquote(pw), safe="")})
    found = [(f, redact(f)) for f in forms if f != redact(f)]
    found += [(w, "***") for w in words if len(w) >= 3]  # hiding a 1-2 character one would blank out ordinary text
    return sorted(found, key=lambda pair: len(pair[0]), reverse=True)


def redact_text(text: str, *urls: Optional[str]) -> str:
    """``text`` (an error message, a log line, a traceback) with the password of each storage URL in ``urls``
    hidden: the URL itself (as given or normalised) becomes :func:`redact`'s form, the password on its own (as
    written, percent-decoded or percent-encoded, 3 characters or more) becomes ***."""
    out = str(text)
    for url in filter(None, urls):
        for secret, shown in _secrets(url):
            out = out.replace(secret, shown)
    return out


#: Storage URLs opened in this process: log records of Optuna are redacted against them (:class:`_RedactLogs`).
_OPENED: List[str] = []


class _RedactLogs(logging.Filter):
    """A logging filter hiding the passwords of the storages opened in this process (message and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102 - logging API
        if _OPENED:
            record.msg, record.args = redact_text(record.getMessage(), *_OPENED), ()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text, *_OPENED)
        return True


def _redact_logs_of(url: str) -> None:
    """Remember ``url`` and make sure the handlers of Optuna's logger hide its password."""
    if url not in _OPENED:
        _OPENED.append(url)
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _RedactLogs) for f in handler.filters):
            handler.addFilter(_RedactLogs())


def check_connect_timeout(seconds) -> float:
    """``seconds`` as a float; ValueError naming --storage-timeout unless it is a finite number > 0."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(seconds, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"--storage-timeout must be a number of seconds > 0 (default {CONNECT_TIMEOUT:g}); "
                         f"got {seconds!r}")
    return value


def storage_kind(url: str) -> str:
    """'sqlite', 'journal' or 'rdb' for a storage URL; ValueError (naming it and the accepted forms) otherwise."""
    u = str(url).strip()
    if u.startswith("sqlite:///") and len(u) > len("sqlite:///"):
        return "sqlite"
    if u.startswith("journal:") and len(u) > len("journal:"):
        return "journal"
    scheme = u.split("://", 1)[0] if "://" in u else ""
    if scheme.split("+")[0] in ("postgresql", "postgres", "mysql") and len(u) > len(scheme) + 3:
        return "rdb"
    if "://" not in u and u.endswith((".log", ".journal")):
        return "journal"
    raise ValueError(f"--storage {redact(u)!r} is not a storage URL: use {STORAGE_FORMS}")


def _postgres_driver() -> str:
    """The installed PostgreSQL driver for SQLAlchemy: 'psycopg' (3, preferred) or 'psycopg2' ('' when neither)."""
    import importlib.util

    for name in ("psycopg", "psycopg2"):
        if importlib.util.find_spec(name) is not None:
            return name
    return ""


def normalise_url(url: str) -> str:
    """Canonical form: FILE.log → journal:FILE.log; postgres:// and postgresql:// → postgresql+DRIVER:// with the
    installed driver (psycopg 3 or psycopg2; SQLAlchemy's own default differs between its versions); an '@' in a
    server URL's password is percent-encoded (the password ends at the last '@' before the host)."""
    u = str(url).strip()
    kind = storage_kind(u)
    if kind == "journal" and not u.startswith("journal:"):
        return "journal:" + u
    parts = _credentials(u, guess=False) if kind == "rdb" else None
    if parts is not None and parts[2] and "@" in parts[2]:  # SQLAlchemy would end the password at its first '@'
        head, user, password, tail = parts
        u = f"{head}{user}:{password.replace('@', '%40')}@{tail}"
    for scheme in ("postgres://", "postgresql://"):
        if u.startswith(scheme):
            driver = _postgres_driver()
            return f"postgresql{'+' + driver if driver else ''}://" + u[len(scheme):]
    return u


def open_storage(url: str, heartbeat_interval: Optional[int] = 10, grace_period: Optional[int] = None,
                 connect_timeout: float = CONNECT_TIMEOUT):
    """An Optuna storage for ``url`` (:data:`STORAGE_FORMS`): RDBStorage for SQLite and PostgreSQL (with heartbeats
    every ``heartbeat_interval`` s; a trial silent for ``grace_period`` s, default 2 intervals, is marked FAIL),
    JournalStorage on a journal file.  A server (PostgreSQL, MySQL) must answer within ``connect_timeout`` seconds
    (:data:`CONNECT_TIMEOUT`; every connection, rounded up to whole seconds).  ValueError naming the URL (password
    hidden, also in the driver's words) when it is malformed, cannot be opened or does not answer in time."""
    optuna = require_optuna()
    timeout = check_connect_timeout(connect_timeout)
    url = normalise_url(url)
    kind = storage_kind(url)
    _redact_logs_of(url)
    t0 = time.monotonic()
    try:
        if kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            path = url[len("journal:"):]
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        engine = {"connect_args": {"timeout": 60}} if kind == "sqlite" else {
            "pool_pre_ping": True, "connect_args": {"connect_timeout": max(1, math.ceil(timeout))}}
        if kind == "sqlite":
            os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])), exist_ok=True)
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period)
    except ValueError as exc:
        raise ValueError(redact_text(f"--storage {redact(url)!r}: {exc}", url)) from None
    except Exception as exc:  # sqlalchemy's errors: no driver, server unreachable or silent, bad database
        raise ValueError(redact_text(_open_error(url, exc, time.monotonic() - t0, timeout), url)) from None


def _open_error(url: str, exc: BaseException, elapsed: float, timeout: float) -> str:
    """The one-line message of a storage that could not be opened (not yet redacted)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's exception
    if storage_kind(url) == "rdb" and ("timeout" in type(cause).__name__.lower() or
                                       re.search(r"time(d)? ?out", text, re.IGNORECASE) or elapsed >= timeout):
        return (f"--storage {redact(url)!r}: the server did not answer within {timeout:g} s (--storage-timeout); "
                "check the host, the port and that a database server listens there")
    return f"--storage {redact(url)!r} cannot be opened: {first}"


def make_sampler(name: str = "tpe", seed: Optional[int] = 0):
    """Optuna sampler by name (:data:`SAMPLERS`): TPE (default), CMA-ES, GP or random, seeded with ``seed``."""
    optuna = require_optuna()
    if name not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(name: str = "median", n_steps: int = 5, startup: int = 5):
    """Optuna pruner by name (:data:`PRUNERS`): median (after ``startup`` trials), Hyperband over ``n_steps``
    reported steps, or none."""
    optuna = require_optuna()
    if name not in PRUNERS:
        raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}; got {name!r}")
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, int(n_steps)))
    return optuna.pruners.NopPruner()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study) -> List[int]:
    """Mark FAIL every RUNNING trial started by a process of this machine that no longer exists (recorded as the
    user attribute ``worker`` = 'host:pid'); returns their numbers.  Heartbeats (RDB storages) cover other
    machines."""
    optuna = require_optuna()
    host, out = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        w_host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if w_host == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
                out.append(t.number)
            except RuntimeError:  # finished meanwhile
                pass
    return out


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """Where a study lives and how it samples: ``storage`` (URL, :data:`STORAGE_FORMS`; None: in memory, one
    process), ``study_name``, ``sampler`` (:data:`SAMPLERS`), ``pruner`` (:data:`PRUNERS`), ``seed`` (worker k
    of a new study seeds its sampler with seed + k; see :func:`worker_seed`), ``n_steps`` (reported steps per
    trial, for Hyperband), ``pruner_startup`` (trials the median pruner waits for), ``heartbeat_interval`` and
    ``grace_period`` (seconds, RDB storages), ``connect_timeout`` (seconds a server storage may take to connect,
    :data:`CONNECT_TIMEOUT`).  Its repr hides the storage's password."""

    storage: Optional[str] = None
    study_name: str = "nbtorch-sweep"
    sampler: str = "tpe"
    pruner: str = "median"
    seed: Optional[int] = 0
    n_steps: int = 5
    pruner_startup: int = 5
    heartbeat_interval: Optional[int] = 10
    grace_period: Optional[int] = None
    connect_timeout: float = CONNECT_TIMEOUT

    def __post_init__(self):
        if self.storage is not None:
            object.__setattr__(self, "storage", normalise_url(self.storage))
        object.__setattr__(self, "connect_timeout", check_connect_timeout(self.connect_timeout))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner must be one of {', '.join(PRUNERS)}; got {self.pruner!r}")
        if not str(self.study_name).strip():
            raise ValueError("--study-name must not be empty")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return redact_text(f"StudySpec({fields})", self.storage)


def load_study(spec: StudySpec, worker: int = 0, n_existing: Optional[int] = None):
    """Create or load (``load_if_exists``) the study ``spec`` describes, minimising, with worker ``worker``'s
    seeded sampler (:func:`worker_seed`; ``n_existing``: the trial count the seed depends on, default the study's
    trials now, waiting ones excluded)."""
    optuna = require_optuna()
    storage = None if spec.storage is None else open_storage(spec.storage, spec.heartbeat_interval,
                                                             spec.grace_period, spec.connect_timeout)
    study = optuna.create_study(storage=storage, study_name=spec.study_name, direction="minimize",
                                load_if_exists=True)
    if n_existing is None:
        n_existing = count_started(study)
    seed = None if spec.seed is None else worker_seed(spec.seed, worker, n_existing)
    return optuna.create_study(storage=storage, study_name=spec.study_name, direction="minimize",
                               sampler=make_sampler(spec.sampler, seed),
                               pruner=make_pruner(spec.pruner, spec.n_steps, spec.pruner_startup),
                               load_if_exists=True)


def worker_seed(seed: int, worker: int, n_existing: int) -> int:
    """The sampler seed of worker ``worker`` joining a study that has ``n_existing`` trials: ``seed`` + worker on a
    new study (reproducible), otherwise also mixed with this machine's name and the trial count, so that commands
    joining a study (from other machines, or later) do not repeat each other's random draws."""
    if n_existing == 0:
        return int(seed) + int(worker)
    return zlib.crc32(f"{seed}:{worker}:{n_existing}:{socket.gethostname()}".encode())


def count_started(study) -> int:
    """Trials of the study in every state but WAITING (enqueued, not yet run)."""
    optuna = require_optuna()
    return sum(t.state != optuna.trial.TrialState.WAITING for t in study.get_trials(deepcopy=False))


def best_or_none(study):
    """The best COMPLETE trial, or None when there is none."""
    try:
        return study.best_trial
    except ValueError:
        return None


class TrialProgress:
    """Optuna callback printing one line per finished trial: number, state, loss (the last reported one for a
    pruned trial), best so far and its trial."""

    def __init__(self, stream=None):
        self.stream = stream

    def __call__(self, study, trial) -> None:
        value = trial.value
        if value is None and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        best = best_or_none(study)
        text = f"trial {trial.number:4d} {trial.state.name:8s} loss {_fmt(value)}"
        if best is not None:
            text += f"  best {_fmt(best.value)} (trial {best.number})"
        print(text, file=self.stream or sys.stderr, flush=True)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.10g}"


#: Exceptions a trial may raise without stopping the study (the trial is marked FAIL).
TRIAL_ERRORS = (ValueError, RuntimeError, FloatingPointError, ArithmeticError)


def optimize(study, objective, n_trials: int, progress: bool = True) -> None:
    """``study.optimize`` for ``n_trials`` trials; a trial raising one of :data:`TRIAL_ERRORS` is marked FAIL and
    the study goes on; one progress line per trial on stderr unless ``progress`` is False."""
    study.optimize(objective, n_trials=int(n_trials), catch=TRIAL_ERRORS,
                   callbacks=[TrialProgress()] if progress else None)


def _worker(make_objective, n_trials: int, spec: StudySpec, index: int, progress: bool, threads: int,
            n_existing: int) -> None:
    """Body of a worker process: load the study, build the objective, run ``n_trials`` trials.  An error is one
    line on stderr (the storage's password hidden) and exit status 1."""
    try:
        torch.set_num_threads(max(1, int(threads)))
        require_optuna().logging.set_verbosity(require_optuna().logging.WARNING)
        study = load_study(spec, worker=index, n_existing=n_existing)
        optimize(study, make_objective(), n_trials, progress)
    except Exception as exc:  # noqa: BLE001 - reported by the parent as a failed worker
        text = str(exc).strip()
        line = text.splitlines()[0] if text else type(exc).__name__
        print(redact_text(f"worker {index} ({worker_id()}): {line}", spec.storage), file=sys.stderr, flush=True)
        sys.exit(1)


def split_trials(n_trials: int, workers: int) -> List[int]:
    """Trials per worker: ``n_trials`` shared as evenly as possible (the first ones get one more)."""
    return [n_trials // workers + (1 if k < n_trials % workers else 0) for k in range(workers)]


def ensure_study_attrs(study, attrs: Mapping[str, str]) -> None:
    """Record ``attrs`` on a new study; on an existing one, ValueError naming the first that differs (trials of
    different problems do not compare)."""
    have = study.user_attrs
    for key, value in attrs.items():
        if key in have and have[key] != value:
            raise ValueError(f"--study-name {study.study_name!r} already holds trials of another problem ({key} "
                             f"{have[key]} here, {value} now: a different image, start, search or free set); "
                             "use another --study-name")
        if key not in have:
            study.set_user_attr(key, value)


def run_study(make_objective: Callable[[], Callable], n_trials: int, spec: StudySpec, workers: int = 1,
              enqueue: Optional[Mapping[str, float]] = None, progress: bool = True, threads: Optional[int] = None,
              objective=None, attrs: Optional[Mapping[str, str]] = None):
    """Run ``n_trials`` more trials of the study ``spec`` in ``workers`` processes sharing its storage.

    ``make_objective()`` builds the objective (in each worker process; picklable, e.g. a functools.partial of a
    factory, when ``workers`` > 1); ``objective``, when given, is used in this process instead of building one.
    ``enqueue``: trial parameters run first unless a trial with them already exists (the user's start); ``attrs``:
    study attributes that must match an existing study (:func:`ensure_study_attrs`); with ``workers`` > 1 a waiting
    (enqueued) trial runs in this process before the workers start, so that it runs once.  Trials
    left RUNNING by dead processes of this machine are marked FAIL first (:func:`fail_orphaned_trials`).  Returns
    the study.  ValueError for bad counts, or ``workers`` > 1 without a storage URL; RuntimeError when a worker
    process fails.
    """
    if not (isinstance(n_trials, int) and n_trials >= 1):
        raise ValueError(f"--n-trials must be an integer >= 1; got {n_trials!r}")
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"--workers must be an integer >= 1; got {workers!r}")
    if workers > 1 and spec.storage is None:
        raise ValueError("--workers > 1 needs a storage URL that processes share (sqlite, journal, postgresql)")
    study = load_study(spec)
    ensure_study_attrs(study, attrs or {})
    fail_orphaned_trials(study)
    n_existing = count_started(study)
    if enqueue is not None:
        study.enqueue_trial(dict(enqueue), skip_if_exists=True)
    if workers == 1:
        optimize(study, objective if objective is not None else make_objective(), n_trials, progress)
        return study
    optuna = require_optuna()
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        # the enqueued start runs here first: optuna's pop of a waiting trial is not atomic on SQLite, and two worker
        # processes could both run it (the second then fails with "Cannot tell a COMPLETE trial")
        optimize(study, objective if objective is not None else make_objective(), 1, progress)
        n_trials -= 1
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    procs = [ctx.Process(target=_worker, args=(make_objective, n, spec, k, progress, threads, n_existing), daemon=False)
             for k, n in enumerate(split_trials(n_trials, workers)) if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(procs)} worker processes failed (exit status {bad[0]})")
    return study


class SearchOutcome(NamedTuple):
    """What :func:`global_search` found: ``study``, ``trial`` (best trial number), ``result`` (its model refined to
    convergence, :class:`refine.Result`), ``objective`` (:class:`GlobalSearchObjective`)."""

    study: object
    trial: int
    result: Result
    objective: GlobalSearchObjective


def global_search(observed, params, setup, search: Mapping[str, float], n_trials: int = 50, *,
                  spec: Optional[StudySpec] = None, workers: int = 1, options: Optional[FitOptions] = None,
                  iterations: int = 4, progress: bool = False, threads: Optional[int] = None,
                  **overrides) -> SearchOutcome:
    """Search starting models in a box about ``params`` and refine the best (see the module docstring).

    ``search`` as for :func:`global_search_objective` (degrees, percent, mm, pixels); ``spec`` the storage, study
    name, sampler and pruner (:class:`StudySpec`, default in memory, TPE seeded 0, median pruner); ``workers``
    processes; ``iterations`` per stage of each trial; ``options``/``overrides`` the fit's options (``free`` ...).
    The user's start is trial 0 (enqueued).  Returns :class:`SearchOutcome`.
    """
    import functools

    opts = _options(options, dict(overrides))
    stages = trial_stages(iterations)
    objective = global_search_objective(observed, params, setup, search, options=opts, stages=stages)
    spec = dataclasses.replace(spec or StudySpec(), n_steps=len(stages))
    make = functools.partial(global_search_objective, observed, params, setup, dict(search), stages=stages,
                             **option_fields(opts))
    study = run_study(make, n_trials, spec, workers=workers, enqueue=objective.start_params(), progress=progress,
                      threads=threads, objective=objective, attrs={"problem": objective.fingerprint()})
    if best_or_none(study) is None:
        raise RuntimeError("no trial of the study completed: nothing to refine (see the FAIL/PRUNED trials)")
    number, _ = best_x(study, objective)
    return SearchOutcome(study, number, finish_best(study, objective), objective)


# ---------------------------------------------------------------------------------------------------------------
# hyperparameter sweeps

#: The default hyperparameter space: a list is a categorical choice, a pair of ints an integer range, a pair of
#: floats a log-uniform range.  ``damping`` (the initial LM μ) is suggested only for LM, ``lr`` only for Adam,
#: ``coarse_iter`` only with the coarse-to-fine schedule; ``spot_roi`` 0 fits every usable pixel, k > 0 only pixels
#: within k px of spots (plus a background sample); ``oversample`` sub-pixels per axis.
HYPER_SPACE = {
    "method": ["lm", "lbfgs", "adam"],
    "damping": (1e-5, 1.0),
    "lr": (1e-3, 0.5),
    "schedule": ["coarse_to_fine", "final_only"],
    "coarse_iter": (2, 12),
    "target": ["poisson", "gaussian", "anscombe"],
    "spot_roi": (0, 6),
    "oversample": (1, 3),
}


def check_space(space: Mapping[str, object]) -> Dict[str, object]:
    """``space`` checked against :data:`HYPER_SPACE`'s names and forms; ValueError names an unknown parameter or a
    bad range."""
    out = {}
    for name, spec in space.items():
        if name not in HYPER_SPACE:
            raise ValueError(f"hyperparameter {name!r} is unknown; known: {', '.join(HYPER_SPACE)}")
        if isinstance(spec, tuple):
            if len(spec) != 2 or not spec[0] < spec[1]:
                raise ValueError(f"hyperparameter {name}: a range must be (low, high) with low < high; got {spec}")
        elif not (isinstance(spec, list) and spec):
            raise ValueError(f"hyperparameter {name}: give a non-empty list of choices or a (low, high) range")
        out[name] = spec
    return out


def _suggest(trial, name: str, spec):
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if all(isinstance(v, int) for v in spec):
        return trial.suggest_int(name, spec[0], spec[1])
    return trial.suggest_float(name, float(spec[0]), float(spec[1]), log=True)


def suggest_hyperparameters(trial, space: Mapping[str, object]) -> Dict[str, object]:
    """One trial's hyperparameters from ``space`` (conditional ones only where they apply: ``damping`` for LM,
    ``lr`` for Adam, ``coarse_iter`` with the coarse-to-fine schedule)."""
    hp: Dict[str, object] = {}
    for name, spec in space.items():
        if name == "lr" and hp.get("method", "adam") != "adam":
            continue
        if name == "damping" and hp.get("method", "lm") != "lm":
            continue
        if name == "coarse_iter" and hp.get("schedule", "coarse_to_fine") != "coarse_to_fine":
            continue
        hp[name] = _suggest(trial, name, spec)
    return hp


class HyperparameterObjective:
    """``objective(trial) -> score`` of a hyperparameter sweep (build with :func:`hyperparameter_objective`).

    Each trial fits with its hyperparameters (:func:`suggest_hyperparameters`) and is scored on a common reference
    (``reference``: the base options' problem, real model, base target, all usable pixels): with a known ``truth``
    the RMS error of the fitted free scalars in typical errors (x units: mrad, mm, Å …, divided by each scalar's
    typical error), otherwise the loss of the fitted model on the reference.  The fit's summary values are stored
    as user attributes."""

    def __init__(self, observed, params, setup, options: FitOptions, space: Mapping[str, object], truth=None,
                 truth_background=None):
        self.observed, self.params, self.setup, self.options = observed, params, setup, options
        self.space = check_space(space)
        self.reference = prepare(observed, params, setup, options)
        par = self.reference.problem.par
        self.truth_x = None
        if truth is not None:
            plane = None if truth_background is None else torch.as_tensor(truth_background, dtype=par.dtype)
            self.truth_x = par.pack(truth, plane)

    def configure(self, hp: Mapping[str, object]):
        """(FitOptions, Setup) of hyperparameters ``hp``."""
        changes = {k: hp[k] for k in ("method", "target", "lr", "damping", "coarse_iter") if k in hp}
        if "schedule" in hp:
            changes["coarse_to_fine"] = hp["schedule"] == "coarse_to_fine"
        if "spot_roi" in hp:
            changes.update(spots_only=int(hp["spot_roi"]) > 0, spot_dilate=max(0, int(hp["spot_roi"])))
        setup = self.setup.replace(oversample=int(hp["oversample"])) if "oversample" in hp else self.setup
        return self.options.replace(callback=None, **changes), setup

    def score(self, result: Result) -> float:
        """The common score of a fitted result (lower is better)."""
        pb = self.reference.problem
        plane = torch.as_tensor(result.parameters["background"], dtype=pb.par.dtype)
        x = pb.par.pack(result.params, plane)
        if self.truth_x is None:
            return float(pb.objective.loss(x))
        err = (x - self.truth_x) / pb.par.typical()
        return float(torch.sqrt(torch.mean(err ** 2))) if len(err) else 0.0

    def __call__(self, trial) -> float:
        from ..pipeline.fit import fit

        hp = suggest_hyperparameters(trial, self.space)
        trial.set_user_attr("worker", worker_id())
        options, setup = self.configure(hp)
        params = self.params
        result = fit(self.observed, params, setup, options=options)
        value = self.score(result)
        trial.set_user_attr("converged", bool(result.converged))
        trial.set_user_attr("iterations", int(result.iterations))
        trial.set_user_attr("seconds", float(result.seconds))
        trial.set_user_attr("loss_all", float(result.loss_all))
        if not math.isfinite(value):
            raise FloatingPointError(f"trial {trial.number}: the score is not finite")
        return value


def hyperparameter_objective(observed, params, setup, space: Optional[Mapping[str, object]] = None, *,
                             truth=None, truth_background=None, options: Optional[FitOptions] = None,
                             **overrides) -> HyperparameterObjective:
    """Objective factory of a hyperparameter sweep.

    Args:
        observed, params, setup: image and starting model, as for :func:`refine.fit`.
        space: {name: choices | (low, high)} (default :data:`HYPER_SPACE`; names from it).
        truth: the true ``Params`` of synthetic data (and ``truth_background``, its plane c0, c_fast, c_slow in
            photons/pixel): the score is the RMS error in typical errors; None: the loss on the data.
        options, overrides: the base :class:`~refine.options.FitOptions` (free groups ...).

    Returns:
        :class:`HyperparameterObjective`.
    """
    opts = _options(options, dict(overrides))
    return HyperparameterObjective(observed, params, setup, opts, HYPER_SPACE if space is None else space, truth,
                                   truth_background)


def hyperparameter_sweep(observed, params, setup, n_trials: int, space: Optional[Mapping[str, object]] = None, *,
                         truth=None, truth_background=None, spec: Optional[StudySpec] = None, workers: int = 1,
                         progress: bool = False, threads: Optional[int] = None, options: Optional[FitOptions] = None,
                         **overrides):
    """Run a hyperparameter sweep (:func:`hyperparameter_objective`) as a study: ``n_trials`` fits in ``workers``
    processes on ``spec``'s storage (default in memory, TPE seeded 0; no pruning, as the fits report no
    intermediate values).  Returns the study; ``study.best_params`` are the best hyperparameters."""
    import functools

    opts = _options(options, dict(overrides))
    space = HYPER_SPACE if space is None else dict(space)
    objective = hyperparameter_objective(observed, params, setup, space, truth=truth,
                                         truth_background=truth_background, options=opts)
    make = functools.partial(hyperparameter_objective, observed, params, setup, space, truth=truth,
                             truth_background=truth_background, **option_fields(opts))
    spec = dataclasses.replace(spec or StudySpec(study_name="nbtorch-hyperparameters"), pruner="none")
    return run_study(make, n_trials, spec, workers=workers, progress=progress, threads=threads, objective=objective)
