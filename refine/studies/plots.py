"""Figures of an Optuna study (matplotlib, imported lazily): the optimisation history, parameter importances and
the loss over two searched parameters; each saved to ``path`` when given, and returned."""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..pipeline.plots import _pyplot, _save


def _trials(study, state: str) -> List:
    """The study's trials in ``state`` ('COMPLETE': only those with a finite value; 'PRUNED')."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState[state],))
    return [t for t in trials if state != "COMPLETE" or (t.value is not None and math.isfinite(t.value))]


def plot_history(study, path: Optional[str] = None):
    """Loss of every COMPLETE trial against its number (dots), the best so far (line) and the last reported loss of
    PRUNED trials (crosses); log scale when every loss is positive."""
    plt = _pyplot(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    done = sorted(_trials(study, "COMPLETE"), key=lambda t: t.number)
    pruned = [t for t in _trials(study, "PRUNED") if t.intermediate_values]
    v, last = [t.value for t in done], [t.intermediate_values[t.last_step] for t in pruned]
    if done:
        n = [t.number for t in done]
        ax.plot(n, v, "o", ms=4, label="complete")
        ax.step(n, [min(v[: k + 1]) for k in range(len(v))], where="post", color="k", lw=1.2, label="best so far")
    if pruned:
        ax.plot([t.number for t in pruned], last, "x", color="0.5", label="pruned (last reported)")
    if v + last and min(v + last) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="trial", ylabel="loss", title=f"{study.study_name}: optimisation history")
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def importances(study) -> dict:
    """{parameter: importance} of the COMPLETE trials (PED-ANOVA); {} with fewer than 3 or a single parameter."""
    import optuna

    if len(_trials(study, "COMPLETE")) < 3:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()))
    except (ValueError, RuntimeError, ZeroDivisionError):
        return {}


def plot_importances(study, path: Optional[str] = None):
    """Horizontal bars of :func:`importances` (most important on top)."""
    plt = _pyplot(path)
    imp = importances(study)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * max(1, len(imp))))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    if not imp:
        ax.text(0.5, 0.5, "not enough complete trials", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="importance (PED-ANOVA)", title=f"{study.study_name}: parameter importances")
    return _save(fig, plt, path)


def surface_parameters(study) -> Tuple[str, str]:
    """The two most important numeric parameters (or the first two); ValueError with fewer than two."""
    done = _trials(study, "COMPLETE")
    numeric = sorted({k for t in done for k, v in t.params.items() if isinstance(v, (int, float))})
    if len(numeric) < 2:
        raise ValueError(f"a loss surface needs two numeric searched parameters; the study has {numeric}")
    ranked = [k for k in importances(study) if k in numeric]
    return tuple((ranked + [k for k in numeric if k not in ranked])[:2])


def plot_surface(study, params: Optional[Sequence[str]] = None, path: Optional[str] = None):
    """The loss of COMPLETE trials over two searched parameters (default :func:`surface_parameters`): points
    coloured by log10(loss − lowest + 1), a filled contour of it from 4 trials, the best trial starred."""
    px, py = params if params is not None else surface_parameters(study)
    done = [t for t in _trials(study, "COMPLETE") if px in t.params and py in t.params]
    plt = _pyplot(path)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if done:
        x, y = (np.array([t.params[p] for t in done], float) for p in (px, py))
        v = np.array([t.value for t in done], float)
        c = np.log10(v - v.min() + 1.0)
        if len(done) >= 4 and np.ptp(x) > 0 and np.ptp(y) > 0:
            with contextlib.suppress(ValueError, RuntimeError):  # collinear points
                ax.tricontourf(x, y, c, levels=12, cmap="viridis", alpha=0.6)
        sc = ax.scatter(x, y, c=c, cmap="viridis", edgecolors="k", linewidths=0.4, s=24)
        fig.colorbar(sc, ax=ax, label="log10(loss − best + 1)")
        k = int(np.argmin(v))
        ax.plot(x[k], y[k], "*", color="r", ms=14, label=f"best (trial {done[k].number})")
        ax.legend(fontsize=8)
        for name, setlim in ((px, ax.set_xlim), (py, ax.set_ylim)):  # the whole searched range
            dist = done[0].distributions.get(name)
            if hasattr(dist, "low") and hasattr(dist, "high"):
                pad = 0.02 * (dist.high - dist.low)
                setlim(dist.low - pad, dist.high + pad)
    ax.set(xlabel=px, ylabel=py)
    ax.set_title(f"{study.study_name}: loss over two parameters", fontsize=10)
    return _save(fig, plt, path)
