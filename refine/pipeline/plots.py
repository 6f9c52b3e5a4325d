"""Figures of a :class:`refine.Result` (matplotlib, imported lazily): images and the loss per stage.

Stages differ in pixels, spot model and target, so their losses are not on one scale: each stage's curve is drawn on
its own (its loss minus its lowest, plus one, on a log axis), and the losses that *are* comparable — the starting
model's and every stage's end point's, with the fit's target on all usable pixels (``loss_all``) — are drawn as
squares on a second axis.  No line joins one stage to the next, so nothing jumps that did not.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def _pyplot(path: Optional[str]):
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Optional[str]):
    """Lay out ``fig``; with a ``path``, write it there under the safe-output rule
    (:func:`nbtorch.io.atomic_write_from`: never half-written, never over a special file) and close it.  Returns the
    figure."""
    from nbtorch.io import atomic_write_from

    fig.tight_layout()
    if path is not None:
        atomic_write_from(path, lambda scratch: fig.savefig(scratch, dpi=100))
        plt.close(fig)
    return fig


def _segments(history):
    """Consecutive runs of one stage's iterations: [(stage name, [loss, ...]), ...]."""
    out = []
    for h in history:
        if not out or out[-1][0] != h["stage"]:
            out.append((h["stage"], []))
        out[-1][1].append(h["loss"])
    return out


def loss_axes(ax, result) -> None:
    """Draw the loss per stage on ``ax`` (see the module docstring): x is the iteration counted over all stages."""
    segments, pos, points = _segments(result.history), 0, [(0, result.start_loss)]
    for st in result.stages:
        if segments and segments[0][0] == st["stage"]:
            name, L = segments.pop(0)
            L = np.asarray(L, dtype=float)
            ax.semilogy(pos + np.arange(len(L)), L - np.nanmin(L) + 1.0, "o-", ms=3, label=name)
            pos += len(L)
        if st.get("loss_all") is not None:
            points.append((max(pos - 1, 0), st["loss_all"]))
    ax.set_xlabel("iteration (all stages)")
    ax.set_ylabel("stage loss − its lowest + 1")
    ax.set_title("loss per stage")
    if pos:
        ax.legend(fontsize=7, loc="upper right")
    finite = [(p, v) for p, v in points if np.isfinite(v)]
    if finite:
        floor = min(v for _, v in finite)
        twin = ax.twinx()
        twin.semilogy([p for p, _ in finite], [v - floor + 1.0 for _, v in finite], "ks", ms=5)
        twin.set_ylabel(f"loss on all pixels − {floor:.6g} + 1 (squares)")


def plot_fit(result, path: Optional[str] = None, log: bool = True):
    """Figure with observed / model / residual images and :func:`loss_axes`; saved to ``path`` when given.
    ``log``: show images as log10(1 + photons).  A panel detector's panels are shown stacked along slow."""
    plt = _pyplot(path)
    obs, mod, res = (t.detach().cpu().numpy() for t in (result.observed, result.model_image(),
                                                        result.residual_image()))
    obs, mod, res = (a.reshape(-1, a.shape[-1]) for a in (obs, mod, res))
    tf = (lambda a: np.log10(1.0 + np.clip(a, 0, None))) if log else (lambda a: a)
    fig, ax = plt.subplots(1, 4, figsize=(16, 4))
    vmax = float(max(tf(obs).max(), tf(mod).max()))
    for a, img, title in ((ax[0], tf(obs), "observed"), (ax[1], tf(mod), "model")):
        im = a.imshow(img, vmin=0, vmax=vmax, cmap="viridis")
        a.set_title(title + (" (log10 1+I)" if log else ""))
        fig.colorbar(im, ax=a, fraction=0.046)
    lim = float(np.abs(res).max()) or 1.0
    im = ax[2].imshow(res, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax[2].set_title("observed − model")
    fig.colorbar(im, ax=ax[2], fraction=0.046)
    loss_axes(ax[3], result)
    return _save(fig, plt, path)


def plot_loss(result, path: Optional[str] = None):
    """:func:`loss_axes` alone; saved to ``path`` when given."""
    plt = _pyplot(path)
    fig, a = plt.subplots(figsize=(5, 4))
    loss_axes(a, result)
    return _save(fig, plt, path)
