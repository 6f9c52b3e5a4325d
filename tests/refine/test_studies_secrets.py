"""Secrets and time-outs of study storages (issue 18, item 6) and nbtorch-sweep's user errors (item 8): a storage
URL's password never reaches an error, a log line, the JSON or the progress; a server that accepts and never
answers fails within --storage-timeout; every user error exits 2 with one line naming the option, and every
program taking --threads refuses -2 that way."""
from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time

import pytest

optuna = pytest.importorskip("optuna")

from refine import studies  # noqa: E402
from refine.cli import sweep as sweep_cli  # noqa: E402
from refine.cli.fit import main as refine_main  # noqa: E402

from .study_cases import TINY_START, sweep_argv, write_tiny  # noqa: E402
from .study_cases import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# redaction


@pytest.mark.parametrize("url, shown, secret", [
    ("postgresql://u:p@ss@127.0.0.1:5432/db", "postgresql://u:***@127.0.0.1:5432/db", "p@ss"),
    ("postgresql://u:p%40ss@host/db", "postgresql://u:***@host/db", "p%40ss"),
    ("postgresql+psycopg://u:a:b/c@host:5/db?sslmode=require", "postgresql+psycopg://u:***@host:5/db?sslmode=require",
     "a:b/c"),
    ("postgresql://u:x@y@z/db?application_name=me@lab", "postgresql://u:***@z/db?application_name=me@lab", "x@y"),
    ("postgresql://u:p?q@host/db", "postgresql://u:***@host/db", "p?q"),
    ("postgres://me@corp:pw12@host/db", "postgres://me@corp:***@host/db", "pw12"),
    ("postgresql:///db?host=/tmp&password=hunter2", "postgresql:///db?host=/tmp&password=***", "hunter2"),
    ("postgresql://u@host/db", "postgresql://u@host/db", None),
    ("postgresql://host/db", "postgresql://host/db", None),
    ("sqlite:////tmp/a:b@c/study.db", "sqlite:////tmp/a:b@c/study.db", None),
])
def test_redact_hides_tricky_passwords(url, shown, secret):
    assert studies.redact(url) == shown
    if secret is not None:
        assert secret not in studies.redact(url)


@pytest.mark.parametrize("url, password", [
    ("postgresql://u:p@ss@127.0.0.1:5432/db", "p@ss"),
    ("postgresql://u:p%40ss@127.0.0.1/db", "p@ss"),
    ("postgresql://u:a:b/c@h:5/db", "a:b/c"),
    ("postgresql://u:@@@h/db", "@@"),
])
def test_normalised_url_gives_sqlalchemy_the_whole_password(url, password):
    """An unencoded '@' in the password is encoded, so the driver gets the password and the real host (not
    'ss@127.0.0.1', which would leak part of the password into the driver's error)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(studies.normalise_url(url))
    assert parsed.password == password and parsed.username == "u" and "@" not in parsed.host


def test_redact_text_hides_every_form_of_the_password():
    url = "postgresql://u:p@ss/w:rd@db.example:5432/optuna"
    text = ("could not connect to postgresql+psycopg://u:p%40ss/w:rd@db.example:5432/optuna; the URL was " + url +
            "; password 'p@ss/w:rd', encoded p%40ss%2Fw%3Ard")
    out = studies.redact_text(text, url)
    assert "p@ss" not in out and "p%40ss" not in out and "w:rd" not in out
    assert "postgresql+psycopg://u:***@db.example:5432/optuna" in out and "postgresql://u:***@db.example" in out


def test_study_spec_repr_hides_the_password():
    spec = studies.StudySpec("postgresql://u:s3cret@h/db", connect_timeout=3)
    assert "s3cret" not in repr(spec) and "u:***@h/db" in repr(spec) and spec.connect_timeout == 3.0
    for bad in (0, -1, float("nan"), float("inf"), "x", True):
        with pytest.raises(ValueError, match="^connect_timeout must be a number of seconds > 0"):
            studies.StudySpec("sqlite:///x.db", connect_timeout=bad)


def test_driver_and_optuna_errors_and_logs_are_redacted(monkeypatch):
    """Exception text that echoes the URL or the password (SQLAlchemy, a driver, Optuna) and Optuna's log lines
    never show the password."""
    import sqlalchemy.exc

    url = "postgresql://u:s3cr@t@127.0.0.1:5432/db"

    def echoing(url_seen, **kwargs):
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception(f"FATAL for {url_seen} (password s3cr@t)"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", echoing)
    with pytest.raises(ValueError) as err:
        studies.open_storage(url, connect_timeout=5)
    message = str(err.value)
    assert message.startswith("storage 'postgresql+psycopg://u:***@127.0.0.1:5432/db' cannot be opened: ")
    assert "s3cr" not in message and "FATAL for postgresql+psycopg://u:***@127.0.0.1:5432/db" in message

    stream = io.StringIO()
    handlers = [h for h in logging.getLogger("optuna").handlers if isinstance(h, logging.StreamHandler)]
    assert handlers  # Optuna's own handler (it prints to stderr)
    for handler in handlers:
        monkeypatch.setattr(handler, "stream", stream)
    logger = optuna.logging.get_logger("optuna.storages.test_secrets")
    logger.warning("lost %s", studies.normalise_url(url))
    try:
        raise RuntimeError("driver said: password " + "s3cr@t" + f" rejected for {url}")
    except RuntimeError:
        logger.exception("trial failed")
    logged = stream.getvalue()
    assert "lost postgresql+psycopg://u:***@127.0.0.1" in logged and "driver said: password *** rejected" in logged
    assert "s3cr" not in logged


def test_connect_timeout_reaches_the_driver(monkeypatch):
    seen = {}

    def capture(url, engine_kwargs=None, **kwargs):
        seen.update(url=url, engine=engine_kwargs)
        return "storage"

    monkeypatch.setattr(optuna.storages, "RDBStorage", capture)
    assert studies.open_storage("postgresql://u:pw@h/db", connect_timeout=2.5) == "storage"
    assert seen["engine"]["connect_args"] == {"connect_timeout": 3}
    assert studies.open_storage("postgresql://u:pw@h/db") == "storage"
    assert seen["engine"]["connect_args"] == {"connect_timeout": studies.CONNECT_TIMEOUT}


def test_a_failing_worker_prints_one_redacted_line(capsys):
    spec = studies.StudySpec("postgresql://u:s3cret@127.0.0.1:1/db", "w")  # port 1: connection refused
    with pytest.raises(SystemExit) as code:
        studies._worker(lambda: None, 1, spec, 3, False, 1, 0)
    err = capsys.readouterr().err
    assert code.value.code == 1 and err.count("\n") == 1 and err.startswith("worker 3 (")
    assert "u:***@127.0.0.1:1/db" in err and "s3cret" not in err


# ---------------------------------------------------------------------------------------------------------------
# a server that accepts and never answers


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never sends a byte; yields its port."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_silent_server_fails_within_the_timeout_without_showing_the_password(silent_server, tmp_path, capsys):
    obs = write_tiny(tmp_path)
    out = tmp_path / "sweep.json"
    url = f"postgresql://u:p%40ss@127.0.0.1:{silent_server}/db"
    t0 = time.monotonic()
    rc = sweep_cli.main(sweep_argv(obs, url, 1, "--storage-timeout", "2", "--json", str(out)))
    elapsed = time.monotonic() - t0
    cap = capsys.readouterr()
    assert rc == 2 and elapsed < 9, (rc, elapsed)  # the default timeout is 10 s
    assert cap.err.count("\n") == 1 and cap.err.startswith(
        f"nbtorch-sweep: --storage 'postgresql+psycopg://u:***@127.0.0.1:{silent_server}/db': the server did not "
        "answer within 2 s (--storage-timeout)"), cap.err
    assert "p%40ss" not in cap.out + cap.err and "p@ss" not in cap.out + cap.err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# nbtorch-sweep's user errors: exit 2, one line naming the option


@pytest.mark.parametrize("args, message", [
    (["--threads", "-2"], "--threads must be an integer >= 1, got -2"),
    (["--threads", "x"], "argument --threads: invalid int value: 'x'"),
    (["--workers", "0"], "--workers must be an integer >= 1; got 0"),
    (["--workers", "1.5"], "argument --workers: invalid int value"),
    (["--max-iter", "-1"], "--max-iter must be an integer >= 0; got -1"),
    (["--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
    (["--seed", str(2 ** 32 - 1), "--workers", "2"], "--seed must be an integer in [0, 4294967294] (with --workers 2)"),
    (["--storage-timeout", "0"], "--storage-timeout must be a number of seconds > 0"),
    (["--storage-timeout", "soon"], "argument --storage-timeout: invalid float value"),
    (["--refine", "bogus"], "--refine 'bogus': unknown parameter group 'bogus'; allowed: cell"),
    (["--refine", ",,"], "--refine ',,': no group given"),
    (["--sampler", "nsga"], "argument --sampler: invalid choice: 'nsga' (choose from 'tpe'"),
    (["--trial-iter", "0"], "--trial-iter must be an integer >= 1; got 0"),
    (["--study-name", " "], "--study-name must not be empty"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_sweep_usage_errors_exit_2_with_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    obs = write_tiny(tmp_path)
    monkeypatch.setattr(studies, "global_search", lambda *a, **k: pytest.fail("the study started"))
    rc = sweep_cli.main([obs, "--search", "distance:2", "--n-trials", "2", *args, *TINY_START])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("nbtorch-sweep: ") and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["tiny.img"]  # nothing written, no study created


@pytest.mark.parametrize("change, message", [
    (lambda obs, start: ["missing.img", *start], "OBSERVED missing.img: no such file"),
    (lambda obs, start: [obs, *start[:start.index("-default_F")], *start[start.index("-default_F") + 2:]],
     "give -hkl FILE"),
    (lambda obs, start: [obs, *" ".join(start).replace("-detpixels 32", "-detpixels 30").split()],
     "tiny.img is 32×32 pixels (fast × slow) but the flags describe a 30×30 detector"),
])
def test_sweep_input_errors_exit_2(change, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    obs = write_tiny(tmp_path)
    monkeypatch.setattr(studies, "global_search", lambda *a, **k: pytest.fail("the study started"))
    argv = change(obs, list(TINY_START))
    rc = sweep_cli.main([argv[0], "--search", "distance:2", "--n-trials", "2", *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["tiny.img"]


def test_sweep_without_a_completed_trial_exits_1(tmp_path, monkeypatch, capsys):
    obs = write_tiny(tmp_path)

    def no_trial(*args, **kwargs):
        raise RuntimeError("no trial of the study completed: nothing to refine (see the FAIL/PRUNED trials)")

    monkeypatch.setattr(studies, "global_search", no_trial)
    assert sweep_cli.main(sweep_argv(obs, f"sqlite:///{tmp_path / 's.db'}", 1, "--quiet")) == 1
    assert capsys.readouterr().err == ("nbtorch-sweep: no trial of the study completed: nothing to refine (see the "
                                       "FAIL/PRUNED trials)\n")


@pytest.mark.parametrize("mode", [
    [], ["--images", "LIST", "--independent", "--refine", "scale", "--results", "r.jsonl"],
    ["--images", "LIST", "--shared", "distance", "--per-image", "scale"]], ids=["single", "independent", "joint"])
@pytest.mark.parametrize("value, message", [("-2", "--threads must be an integer >= 1, got -2"),
                                            ("two", "argument --threads: invalid int value: 'two'")])
def test_refine_threads_refused_in_every_mode(mode, value, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    obs = write_tiny(tmp_path)
    (tmp_path / "LIST").write_text(obs + "\n")
    head = mode if mode else [obs, "--refine", "scale"]
    rc = refine_main([*head, "--threads", value, *TINY_START])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(os.listdir(tmp_path)) == ["LIST", "tiny.img"]
