"""Where a study lives and how it samples: storage URLs (:data:`STORAGE_FORMS`; passwords never shown:
:func:`redact`, :func:`redact_text`), :func:`open_storage` within a connect time-out, samplers and pruners by name,
:class:`StudySpec` and :func:`load_study`.  Optuna is imported when a function needs it."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import math
import os
import re
import socket
import time
import warnings
import zlib
from typing import Optional, Set, Tuple
from urllib.parse import quote, unquote

from ..pipeline.options import check_choice

#: Storage URL schemes: SQLite file, journal file, PostgreSQL (also with a driver, postgresql+psycopg2://).
STORAGE_FORMS = "sqlite:///FILE.db, journal:FILE.log (or FILE.log), postgresql://USER[:PASSWORD]@HOST[:PORT]/DB"
#: Seconds a server storage (PostgreSQL, MySQL) may take to connect (libpq waits at least 2 s).
CONNECT_TIMEOUT = 10.0
#: Samplers by name: (optuna, seed) → sampler.
_SAMPLERS = {
    "tpe": lambda optuna, seed: optuna.samplers.TPESampler(seed=seed),
    "cmaes": lambda optuna, seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "gp": lambda optuna, seed: optuna.samplers.GPSampler(seed=seed),
    "random": lambda optuna, seed: optuna.samplers.RandomSampler(seed=seed),
}
#: Pruners by name: (optuna, reported steps per trial, trials the median pruner waits for) → pruner.
_PRUNERS = {
    "median": lambda optuna, n_steps, startup: optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0),
    "hyperband": lambda optuna, n_steps, startup: optuna.pruners.HyperbandPruner(min_resource=1,
                                                                                 max_resource=max(1, int(n_steps))),
    "none": lambda optuna, n_steps, startup: optuna.pruners.NopPruner(),
}
SAMPLERS = tuple(_SAMPLERS)
PRUNERS = tuple(_PRUNERS)
#: Where a URL's query string starts: '?' followed by NAME= (a '?' inside a password is not followed by NAME=).
_QUERY_START = re.compile(r"\?(?=[A-Za-z_][A-Za-z0-9_]*=)")
#: A password given as a query parameter (libpq's ``?password=...``), the password in group 2.
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.IGNORECASE)
#: Storage URLs opened in this process: Optuna's log records are redacted against them (:func:`_redact_record`).
_OPENED: Set[str] = set()


def require_optuna():
    """The ``optuna`` module; ImportError with the install command when it is absent."""
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("refine.studies needs optuna: pip install 'nbtorch[optuna]' (or pip install optuna)") \
            from exc
    return optuna


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _credentials(url: str, guess: bool = True) -> Optional[Tuple[str, str, Optional[str], str]]:
    """(``scheme://``, user, password or None, ``host...``) of a server URL, or None when it names no user.  The
    password ends at the LAST '@' before the query string (it may hold '@', ':', '/', '?'; an '@' in the database
    name is written %40).  With ``guess`` (for hiding a password), an '@' only after the query string's start also
    ends a user part (a password holding '?NAME=': better hide too much than too little)."""
    head, sep, rest = str(url).partition("://")
    if not sep or rest.startswith("/"):
        return None
    query = _QUERY_START.search(rest)
    at = rest.rfind("@", 0, query.start() if query else len(rest))
    if at < 0 and guess:
        at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    return head + sep, user, (password if colon else None), rest[at + 1:]


def redact(url: str) -> str:
    """``url`` with its password (the user part's, and a ``password=`` query parameter's) replaced by ***."""
    text = str(url)
    parts = _credentials(text)
    if parts is not None and parts[2]:
        text = f"{parts[0]}{parts[1]}:***@{parts[3]}"
    return _QUERY_PASSWORD.sub(r"\1***", text)


def redact_text(text: str, *urls: Optional[str]) -> str:
    """``text`` with the password of each storage URL in ``urls`` hidden: the URL (as given or normalised) in
    :func:`redact`'s form, the password alone (as written, percent-decoded or -encoded, ≥ 3 characters) as ***."""
    shown = {}
    for url in filter(None, urls):
        forms = {str(url)}
        with contextlib.suppress(ValueError):
            forms.add(normalise_url(url))
        for form in forms:
            shown[form] = redact(form)
            passwords = [m.group(2) for m in _QUERY_PASSWORD.finditer(form)]
            passwords.append((_credentials(form) or (None,) * 3)[2])
            for pw in filter(None, passwords):
                for word in (pw, unquote(pw), quote(unquote(pw), safe="")):
                    if len(word) >= 3:  # hiding a 1-2 character one would blank out ordinary text
                        shown[word] = "***"
    out = str(text)
    for secret in sorted(shown, key=len, reverse=True):
        out = out.replace(secret, shown[secret])
    return out


def _redact_record(record: logging.LogRecord) -> bool:
    """Logging filter (on Optuna's handlers) hiding the passwords of the storages opened here, traceback included."""
    if _OPENED:
        record.msg, record.args = redact_text(record.getMessage(), *_OPENED), ()
        if record.exc_info or record.exc_text:
            trace = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = redact_text(trace, *_OPENED)
    return True


def storage_kind(url: str) -> str:
    """'sqlite', 'journal' or 'rdb' for a storage URL; ValueError (naming it and the accepted forms) otherwise."""
    u = str(url).strip()
    scheme = u.split("://", 1)[0] if "://" in u else ""
    if u.startswith("sqlite:///") and len(u) > len("sqlite:///"):
        return "sqlite"
    if (u.startswith("journal:") and len(u) > len("journal:")) or ("://" not in u and u.endswith((".log", ".journal"))):
        return "journal"
    if scheme.split("+")[0] in ("postgresql", "postgres", "mysql") and len(u) > len(scheme) + 3:
        return "rdb"
    raise ValueError(f"storage {redact(u)!r} is not a storage URL: use {STORAGE_FORMS}")


def normalise_url(url: str) -> str:
    """Canonical form: FILE.log → journal:FILE.log; postgres(ql):// → postgresql+DRIVER:// with the installed
    driver (psycopg 3, else psycopg2: SQLAlchemy's default varies); an '@' in a password percent-encoded."""
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
            driver = next((d for d in ("psycopg", "psycopg2") if importlib.util.find_spec(d) is not None), "")
            return f"postgresql{'+' + driver if driver else ''}://" + u[len(scheme):]
    return u


def check_connect_timeout(seconds) -> float:
    """``seconds`` as a float; ValueError naming ``connect_timeout`` unless it is a finite number > 0."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(seconds, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"connect_timeout must be a number of seconds > 0 (default {CONNECT_TIMEOUT:g}); "
                         f"got {seconds!r}")
    return value


def open_storage(url: str, heartbeat_interval: Optional[int] = 10, grace_period: Optional[int] = None,
                 connect_timeout: float = CONNECT_TIMEOUT):
    """An Optuna storage for ``url`` (:data:`STORAGE_FORMS`): RDBStorage for SQLite and PostgreSQL with heartbeats
    every ``heartbeat_interval`` s (a trial silent for ``grace_period`` s, default 2 intervals, is stale), else
    JournalStorage.  A server must answer each connection within ``connect_timeout`` s (rounded up).  ValueError
    naming ``storage`` and the URL (password hidden) when it is malformed, cannot be opened or does not answer."""
    optuna = require_optuna()
    timeout = check_connect_timeout(connect_timeout)
    url = normalise_url(url)
    kind = storage_kind(url)
    _OPENED.add(url)
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_redact_record)  # once: a handler does not add a filter it holds
    t0 = time.monotonic()
    try:
        path = url[len("sqlite:///" if kind == "sqlite" else "journal:"):]
        if kind != "rdb":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if kind == "journal":
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        engine = {"connect_args": {"timeout": 60}} if kind == "sqlite" else {
            "pool_pre_ping": True, "connect_args": {"connect_timeout": max(1, math.ceil(timeout))}}
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period)
    except ValueError as exc:
        raise ValueError(redact_text(f"storage {redact(url)!r}: {exc}", url)) from None
    except Exception as exc:  # sqlalchemy's errors: no driver, server unreachable or silent, bad database
        text, cause = str(exc), getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's exception
        silent = kind == "rdb" and ("timeout" in type(cause).__name__.lower() or time.monotonic() - t0 >= timeout
                                    or re.search(r"time(d)? ?out", text, re.IGNORECASE))
        why = (f": the server did not answer within {timeout:g} s (connect_timeout); check the host, the port and "
               "that a database server listens there") if silent else f" cannot be opened: {first_line(exc)}"
        raise ValueError(redact_text(f"storage {redact(url)!r}{why}", url)) from None


def make_sampler(name: str = "tpe", seed: Optional[int] = 0):
    """Optuna sampler by name (:data:`SAMPLERS`): TPE (default), CMA-ES, GP or random, seeded with ``seed``."""
    check_choice("sampler", name, SAMPLERS)
    return _SAMPLERS[name](require_optuna(), seed)


def make_pruner(name: str = "median", n_steps: int = 5, startup: int = 5):
    """Optuna pruner by name: median (after ``startup`` trials), Hyperband (``n_steps`` reported steps), none."""
    check_choice("pruner", name, PRUNERS)
    return _PRUNERS[name](require_optuna(), n_steps, startup)


@dataclasses.dataclass(frozen=True)
class StudySpec:
    """Where a study lives and how it samples: ``storage`` (URL; None: in memory), ``study_name``, ``sampler``,
    ``pruner``, ``seed`` (see :func:`load_study`), ``n_steps`` (reported steps per trial, for Hyperband),
    ``pruner_startup`` (trials the median pruner waits for), ``heartbeat_interval``, ``grace_period`` and
    ``connect_timeout`` (seconds, see :func:`open_storage`).  Its repr hides the storage's password."""

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
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("pruner", self.pruner, PRUNERS)
        if not str(self.study_name).strip():
            raise ValueError("study_name must not be empty")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return redact_text(f"StudySpec({fields})", self.storage)


def load_study(spec: StudySpec, worker: int = 0, n_existing: Optional[int] = None):
    """Create or load the (minimising) study ``spec`` describes, worker ``worker``'s sampler seeded ``spec.seed`` +
    worker when new; joining a study with ``n_existing`` trials (default: now, waiting ones excluded) the seed mixes
    in this machine's name and that count, so that joining commands do not repeat each other's draws."""
    optuna = require_optuna()
    storage = None if spec.storage is None else open_storage(spec.storage, spec.heartbeat_interval,
                                                             spec.grace_period, spec.connect_timeout)
    create = functools.partial(optuna.create_study, storage=storage, study_name=spec.study_name,
                               direction="minimize", load_if_exists=True)
    if n_existing is None:
        n_existing = count_started(create())
    seed = spec.seed
    if seed is not None:
        seed = (int(seed) + int(worker) if n_existing == 0
                else zlib.crc32(f"{seed}:{worker}:{n_existing}:{socket.gethostname()}".encode()))
    return create(sampler=make_sampler(spec.sampler, seed),
                  pruner=make_pruner(spec.pruner, spec.n_steps, spec.pruner_startup))


def count_started(study) -> int:
    """Trials of the study in every state but WAITING (enqueued, not yet run)."""
    waiting = require_optuna().trial.TrialState.WAITING
    return sum(t.state != waiting for t in study.get_trials(deepcopy=False))
