"""Studies that persist and scale out: worker processes sharing SQLite / journal / PostgreSQL storages, a run killed
with SIGKILL and resumed, orphaned and stale trials, the JSON contract of nbtorch-sweep."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna")

from refine import studies  # noqa: E402
from refine.cli import sweep as sweep_cli  # noqa: E402

from .study_cases import PostgresServer, sweep_argv, write_tiny  # noqa: E402
from .study_cases import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _study(url: str, name: str = "nbtorch-sweep"):
    return optuna.load_study(study_name=name, storage=studies.open_storage(url))


def _check_no_lost_or_duplicated(study, n: int, processes: int) -> None:
    """n trials, each finished once, run by ``processes`` processes (workers, and the sweep's own process, which
    runs the enqueued start before its workers begin)."""
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(n))           # nothing lost, no number twice
    assert all(t.state in FINISHED for t in trials)
    starts = [t.params["distance_mm"] for t in trials]
    assert len(set(starts)) == n                                          # no trial run twice
    assert len({t.user_attrs["worker"] for t in trials}) == processes     # every worker ran trials


def test_two_workers_share_sqlite_and_json_contract(tmp_path):
    obs = write_tiny(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "sweep.json"
    rc = sweep_cli.main(sweep_argv(obs, url, 6, "--workers", "2", "--json", str(out), "--quiet"))
    assert rc == 0
    study = _study(url)
    _check_no_lost_or_duplicated(study, 6, 3)
    # the enqueued start ran once, in this process, before the workers (optuna's pop of a waiting trial is not
    # atomic on SQLite: two workers could both take it, and the second failed with "Cannot tell a COMPLETE trial")
    first = study.trials[0]
    assert first.state.name == "COMPLETE" and first.user_attrs["worker"].endswith(f":{os.getpid()}")
    data = json.loads(out.read_text())
    for key in ("nanobragg_args", "loss", "trial", "n_trials", "parameters", "esd"):
        assert key in data
    assert data["n_trials"] == 6 and "-distance" in data["nanobragg_args"]
    assert abs(data["parameters"]["distance_mm"] - 60.0) < 0.05           # the 1.5 mm error is gone


def test_killed_run_resumes_without_losing_trials(tmp_path, capsys):
    obs = write_tiny(tmp_path)
    url = f"journal:{tmp_path / 'study.log'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "refine.cli.sweep", *sweep_argv(obs, url, 40, "--quiet", "--threads", "1")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                if len(_study(url).get_trials(deepcopy=False, states=FINISHED)) >= 2:
                    break
            except KeyError:  # the study is not created yet
                continue
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = {t.number: (t.state, t.value) for t in _study(url).get_trials(deepcopy=False, states=FINISHED)}
    n_before = len(_study(url).get_trials(deepcopy=False))
    assert len(before) >= 2
    assert sweep_cli.main(sweep_argv(obs, url, 2, "--quiet")) == 0      # the same command, two more trials
    after = _study(url).get_trials(deepcopy=False)
    assert len(after) == n_before + 2
    for t in after:
        assert t.state != optuna.trial.TrialState.RUNNING                  # the killed trial is marked, not left
        if t.number in before:
            assert (t.state, t.value) == before[t.number]                  # every finished trial is still there
    other = sweep_argv(obs, url, 2, "--quiet")
    other[other.index("61.5")] = "61.0"                                   # another start: its losses do not compare
    assert sweep_cli.main(other) == 2
    assert "--study-name 'nbtorch-sweep' already holds trials of another problem" in capsys.readouterr().err


def test_orphaned_running_trial_is_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    study = studies.load_study(studies.StudySpec(url, "orphans", heartbeat_interval=None))  # ask/tell: no heartbeat
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive = study.ask()
    alive.set_user_attr("worker", studies.worker_id())
    assert studies.fail_orphaned_trials(study) == [trial.number]
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states == {trial.number: optuna.trial.TrialState.FAIL, alive.number: optuna.trial.TrialState.RUNNING}


#: A process running one trial that sleeps, its ``worker`` attribute naming another machine (only a heartbeat can
#: tell whether it is alive).
SLEEPING_TRIAL = """
import sys, time
from refine import studies
study = studies.load_study(studies.StudySpec(sys.argv[1], "stale", heartbeat_interval=1, grace_period=5))
def objective(trial):
    trial.set_user_attr("worker", "another-machine:1")
    time.sleep(2)  # a heartbeat is recorded (a trial killed before its first one is never stale)
    print("running", flush=True)
    time.sleep(600)
study.optimize(objective, n_trials=1)
"""


def test_stale_trial_of_another_machine_is_failed_by_its_heartbeat(tmp_path):
    """Killed, its heartbeat stops: FAIL once the grace period has passed (optuna.storages.fail_stale_trials)."""
    url = f"sqlite:///{tmp_path / 'stale.db'}"
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_TRIAL, url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
    finally:
        proc.kill()
        proc.wait()
    study = studies.load_study(studies.StudySpec(url, "stale", heartbeat_interval=1, grace_period=5))
    assert studies.fail_orphaned_trials(study) == []                      # its last heartbeat is recent
    time.sleep(6)
    assert studies.fail_orphaned_trials(study) == [0]
    assert study.trials[0].state == optuna.trial.TrialState.FAIL


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.stop()


def test_two_workers_on_postgresql_and_a_second_machine_joins(tmp_path, postgres):
    obs = write_tiny(tmp_path)
    assert sweep_cli.main(sweep_argv(obs, postgres, 4, "--workers", "2", "--study-name", "pg", "--quiet")) == 0
    _check_no_lost_or_duplicated(_study(postgres, "pg"), 4, 3)
    # another "machine": the same command with the same URL adds its trials to the study
    out = tmp_path / "joined.json"
    assert sweep_cli.main(sweep_argv(obs, postgres, 2, "--study-name", "pg", "--quiet", "--json", str(out))) == 0
    _check_no_lost_or_duplicated(_study(postgres, "pg"), 6, 3)  # (this process joined again)
    assert json.loads(out.read_text())["n_trials"] == 6


def test_password_never_shown_with_a_real_server(tmp_path, postgres, capsys):
    """A password holding '@' ':' '/' (trust authentication: the server does not check it) appears nowhere: not
    in the progress lines, the summary, nor the JSON's ``storage``."""
    obs = write_tiny(tmp_path)
    url = postgres.replace("postgres@", "postgres:pa@ss:w/rd@", 1)
    out = tmp_path / "pw.json"
    rc = sweep_cli.main(sweep_argv(obs, url, 2, "--study-name", "pw", "--json", str(out)))
    cap = capsys.readouterr()
    assert rc in (0, 3, 4) and out.exists(), cap.err  # done (converged or not): the outputs are written
    text = cap.out + cap.err + out.read_text()
    assert "trial    1" in cap.err and "pa@ss" not in text and "pa%40ss" not in text and "w/rd" not in text
    storage = json.loads(out.read_text())["storage"]
    assert storage.startswith("postgresql+") and ":***@127.0.0.1:" in storage
