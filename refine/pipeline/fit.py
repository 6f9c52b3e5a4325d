"""``refine.fit``: observed image + starting model → refined model with uncertainties.

    result = refine.fit(observed, params, setup, free=["cell", "orientation", "distance", "beam_center", "scale"])
    print(result.summary()); result.to_json("fit.json"); flags = result.to_nanobragg_args()

It composes the pieces (see docs/refine.md): :func:`refine.strategy.prepare` (observed pixels, parameterisation,
target, start), :func:`refine.strategy.run_stage` for every stage of :func:`refine.strategy.schedule`, and
:func:`refine.result.finish` (values, ESDs, history).  A caller can run the same steps itself.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Union

from nbtorch.types import Params, Setup

from .options import DEFAULT_MAX_ITER, METHODS, FitOptions  # noqa: F401  (re-exported)
from .report import covariance  # noqa: F401  (re-exported)
from .result import Result, finish
from .strategy import prepare, run_stage, schedule


def fit_options(options: Optional[FitOptions] = None, **changes) -> FitOptions:
    """``options`` (default :class:`FitOptions()`) with ``changes`` applied; ``free``/``method``/``target`` given as
    None are left as they are.  TypeError names an unknown option, ValueError a bad value."""
    for name in ("free", "method", "target"):
        if name in changes and changes[name] is None:
            del changes[name]
    return (options or FitOptions()).replace(**changes) if changes else (options or FitOptions())


def fit(
    observed,
    params: Params,
    setup: Setup,
    free: Union[None, str, Iterable[str]] = None,
    method: Optional[str] = None,
    target: Optional[str] = None,
    *,
    options: Optional[FitOptions] = None,
    start=None,
    **kwargs,
) -> Result:
    """Refine a starting model against an observed image.

    Args:
        observed: observed image [slow, fast] (photons; tensor, array, :class:`nbtorch.io.images.ObservedImage` or a
            path read with :func:`nbtorch.io.images.read_image`, raw files taking their shape from ``setup``).
        params, setup: the starting model (e.g. from :func:`nbtorch.from_nanobragg_args`), float64 recommended;
            the increments of the result are about it.
        free: groups to refine (:data:`refine.table.GROUPS`, sub-groups or single scalars; default
            :data:`refine.table.DEFAULT_FREE`).
        method: 'lm' (Levenberg–Marquardt, default), 'lbfgs' or 'adam'.
        target: 'poisson' (default), 'gaussian' (with ``read_noise`` σ in photons), 'lsq' (optional ``weights``
            image) or 'anscombe'.
        options: a :class:`~refine.options.FitOptions` holding these and every other knob; keyword arguments
            (``crystal_system``, ``max_iter``, ``coarse_to_fine``, ``mask``, ``overload``, ``spots_only``, ``bounds``,
            ``priors``, ``callback``, ``nanobragg_args``, ``allow_degenerate`` … — the fields of FitOptions)
            override it.
        start: where to start: None (the starting model, x = 0), increments x [n] about it, or a previous
            :class:`Result` to resume from (its refined model; with the default ``coarse_to_fine='auto'`` only the
            final stage runs, as a resumed fit is already in the basin).

    Returns:
        :class:`refine.result.Result`.

    Raises:
        ValueError: bad options or input (one line naming what and the allowed values), a degenerate pair of free
            parameters with ``allow_degenerate=False``; TypeError: an unknown option.
    """
    t0 = time.perf_counter()
    options = fit_options(options, free=free, method=method, target=target, **kwargs)
    state = prepare(observed, params, setup, options, start)
    for stage in schedule(options, resuming=isinstance(start, Result)):
        state = run_stage(state, stage)
    return finish(state, seconds=time.perf_counter() - t0)
