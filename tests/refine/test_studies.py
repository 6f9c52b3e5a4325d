"""refine.studies: objectives (FixedTrial), the global search beyond the local basin, pruning, samplers, plots and the
errors of nbtorch-sweep's --search / --storage."""
from __future__ import annotations

import math

import pytest
import torch

optuna = pytest.importorskip("optuna")

import refine  # noqa: E402
from refine import studies  # noqa: E402
from refine.cli import sweep as sweep_cli  # noqa: E402

from .refine_cases import misorientation_deg, model, observe, rotate_crystal  # noqa: E402
from .study_cases import TINY, TINY_START, sweep_argv, write_tiny  # noqa: E402
from .study_cases import one_thread  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def tiny():
    """(observed, start params, setup, true params) of the tiny case, the start 1.5 mm off in distance."""
    truth, setup, _ = model(base=TINY)
    start, _, _ = model(base=" ".join(TINY_START))
    return observe(truth, setup, seed=3), start, setup, truth


# ---------------------------------------------------------------------------------------------------------------
# errors that name what is wrong


@pytest.mark.parametrize("text, words", [
    ("", ["search is empty"]),
    (" , ", ["search is empty"]),
    ("orientation", ["'orientation'", "GROUP:RANGE"]),
    ("mosaic:2", ["'mosaic'", "unknown", "orientation (deg)"]),
    ("cell.alpha:1", ["'cell.alpha'", "unknown"]),
    ("distance:abc", ["'abc'", "distance", "not a number"]),
    ("beam_center:-3", ["beam_center", "> 0", "px"]),
    ("orientation:5,cell:0", ["cell", "> 0", "percent"]),
])
def test_bad_search_ranges_are_named(text, words):
    with pytest.raises(ValueError) as err:
        studies.parse_search(text)
    assert str(err.value).startswith("search ")                          # the Python argument, not a flag
    for w in words:
        assert w in str(err.value)


def test_parse_search_reads_groups_and_scalars():
    assert studies.parse_search("orientation:5, cell:3,distance:2.5,beam_center.x:10") == {
        "orientation": 5.0, "cell": 3.0, "distance": 2.5, "beam_center.x": 10.0}


@pytest.mark.parametrize("url, words", [
    ("foo://bar", ["'foo://bar'", "not a storage URL", "postgresql://"]),
    ("study.db", ["'study.db'", "sqlite:///"]),
    ("postgresql://user:secret@127.0.0.1:1/none", ["cannot be opened", "user:***@127.0.0.1:1/none"]),
])
def test_bad_storage_urls_are_named(url, words, capsys, tmp_path):
    rc = sweep_cli.main(sweep_argv(write_tiny(tmp_path), url, 2))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("nbtorch-sweep: --storage")
    for w in words:
        assert w in err
    assert "secret" not in err


def test_cli_usage_errors(capsys, tmp_path):
    obs = write_tiny(tmp_path)
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert sweep_cli.main([obs, "--search", "mosaic:1", "--n-trials", "2", "--storage", db, *TINY_START]) == 2
    assert "--search group 'mosaic' is unknown" in capsys.readouterr().err
    assert sweep_cli.main([obs, "--search", "distance:1", "--n-trials", "0", "--storage", db, *TINY_START]) == 2
    assert "--n-trials must be an integer >= 1" in capsys.readouterr().err
    argv = sweep_argv(obs, db, 2, "--refine", "distance,scale")
    argv[argv.index("distance:2")] = "orientation:1"
    assert sweep_cli.main(argv) == 2                                   # searched but not free: named
    assert "--search orientation: not refined here" in capsys.readouterr().err


def test_sweep_exit_status_is_that_of_the_final_refinement(capsys, tmp_path):
    """0 converged and a good fit, 3 not converged (as nbtorch-refine; it was 0 before)."""
    obs = write_tiny(tmp_path)
    db = f"sqlite:///{tmp_path / 's.db'}"
    assert sweep_cli.main(sweep_argv(obs, db, 1, "--quiet")) == 0
    argv = sweep_argv(obs, db + "2", 1, "--quiet", "--max-iter", "0", "--refine", "distance,scale,ncells")
    assert sweep_cli.main(argv) == 3  # N free too: the best trial's end is not already converged
    assert "NOT converged: reached max_iter = 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# objectives through FixedTrial


def test_global_objective_with_fixed_trial(tiny):
    obs, start, setup, truth = tiny
    objective = studies.global_search_objective(obs, start, setup, {"distance": 2.0}, iterations=2,
                                                free=("distance", "scale"))
    assert [d.name for d in objective.dimensions] == ["distance_mm"]
    trial = optuna.trial.FixedTrial({"distance_mm": -1.5})               # a start on the true distance
    loss = objective(trial)
    x = torch.tensor(trial.user_attrs["x"], dtype=torch.float64)
    par = objective.base.problem.par
    assert math.isfinite(loss) and abs(float(par.unpack(x).detector.distance) - 60.0) < 0.05
    assert loss == pytest.approx(objective.base.problem.objective.loss(x))
    assert objective.start_params() == {"distance_mm": 0.0}


def test_hyperparameter_objective_with_fixed_trial(tiny):
    obs, start, setup, truth = tiny
    space = {k: studies.HYPER_SPACE[k] for k in ("method", "damping", "lr", "schedule", "coarse_iter", "spot_roi",
                                                  "oversample", "target")}
    objective = studies.hyperparameter_objective(obs, start, setup, space, truth=truth,
                                                 free=("distance", "scale"))
    opts, s2 = objective.configure({"method": "adam", "lr": 0.1, "schedule": "final_only", "spot_roi": 3,
                                    "oversample": 2, "target": "anscombe"})
    assert (opts.method, opts.lr, opts.coarse_to_fine, opts.spots_only, opts.spot_dilate, opts.target,
            s2.oversample) == ("adam", 0.1, False, True, 3, "anscombe", 2)
    trial = optuna.trial.FixedTrial({"method": "lm", "damping": 1e-2, "schedule": "coarse_to_fine", "coarse_iter": 2,
                                     "spot_roi": 0, "oversample": 1, "target": "poisson"})
    error = objective(trial)                                             # RMS error in typical errors
    assert error < 0.2 and trial.user_attrs["converged"]
    assert objective.configure({"method": "lm", "damping": 0.5})[0].damping == 0.5
    study = studies.hyperparameter_sweep(obs, start, setup, 2, {"method": ["lm", "lbfgs"], "schedule": ["final_only"]},
                                         truth=truth, free=("distance", "scale"))
    assert len(study.trials) == 2 and study.best_value < 0.5 and set(study.best_params) == {"method", "schedule"}
    with pytest.raises(ValueError, match="hyperparameter 'mu' is unknown"):
        studies.hyperparameter_objective(obs, start, setup, {"mu": (1e-4, 1.0)}, free=("distance",))


# ---------------------------------------------------------------------------------------------------------------
# samplers, pruners, plots


@pytest.mark.parametrize("name", studies.SAMPLERS)
def test_samplers_by_name(name):
    study = studies.load_study(studies.StudySpec(None, f"s-{name}", sampler=name, pruner="none", seed=1))
    study.optimize(lambda t: (t.suggest_float("a", -1, 1) - 0.3) ** 2 + t.suggest_float("b", -1, 1) ** 2,
                   n_trials=4)
    assert len(study.trials) == 4 and study.best_value < 2.0
    with pytest.raises(ValueError, match="^sampler must be one of tpe, cmaes, gp, random; got 'nsga'"):
        studies.StudySpec(None, sampler="nsga")


def test_pruners_by_name():
    kinds = {n: type(studies.make_pruner(n, n_steps=5)).__name__ for n in studies.PRUNERS}
    assert kinds == {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
    with pytest.raises(ValueError, match="^pruner must be one of median, hyperband, none; got 'sha'"):
        studies.StudySpec(None, pruner="sha")


def test_median_pruner_prunes_on_a_bad_range(tiny):
    obs, start, setup, _ = tiny
    spec = studies.StudySpec(None, "pruning", pruner="median", seed=0, pruner_startup=3)
    out = studies.global_search(obs, start, setup, {"distance": 15.0}, n_trials=8, spec=spec, iterations=1,
                                free=("distance", "scale"))
    states = [t.state for t in out.study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1
    assert out.trial in [t.number for t in out.study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def test_plots(tmp_path):
    study = studies.load_study(studies.StudySpec(None, "plots", pruner="none", seed=0))
    study.optimize(lambda t: (t.suggest_float("a", -1, 1) - 0.3) ** 2 + 0.1 * t.suggest_float("b", -1, 1) ** 2,
                   n_trials=12)
    assert set(studies.study_plots.importances(study)) == {"a", "b"}
    for name, fn in (("h", studies.plot_history), ("i", studies.plot_importances)):
        fn(study, str(tmp_path / f"{name}.png"))
    studies.plot_surface(study, ("a", "b"), str(tmp_path / "s.png"))
    assert all((tmp_path / f"{n}.png").stat().st_size > 1000 for n in "his")
    paths = sweep_cli.write_plots(study, str(tmp_path / "dir"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["history.png", "importances.png", "surface.png"]


# ---------------------------------------------------------------------------------------------------------------
# global search beyond the local basin

#: 64×64 pixels of 0.3 mm, N = 12: sharp spots whose basin is narrower than a 3.5° orientation error.
SHARP = ("-default_F 100 -cell 40 50 60 90 90 90 -misset 10 20 30 -N 12 -lambda 1 -distance 60 -pixel 0.3 "
         "-detpixels 64 -oversample 1 -fluence 1e30")


def test_global_search_recovers_an_orientation_3_5_degrees_off():
    truth, setup, _ = model(base=SHARP)
    obs = observe(truth, setup)
    start = rotate_crystal(truth, [0, 0, 1], 3.5)
    free = ("orientation", "scale")
    local = refine.fit(obs, start, setup, free=free)
    assert misorientation_deg(local.params, truth) > 0.5                 # the local refinement alone fails
    out = studies.global_search(obs, start, setup, {"orientation": 4.0}, n_trials=40, iterations=3,
                                free=free, prelim_pixels=1024)
    assert len(out.study.trials) <= 60
    assert out.study.trials[0].params == {f"orientation.{a}_deg": 0.0 for a in "xyz"}   # the user's start first
    assert misorientation_deg(out.result.params, truth) < 0.05
    assert out.result.converged and all(math.isfinite(v) for v in out.result.x_esd.tolist())
