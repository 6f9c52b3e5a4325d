"""``refine.fit`` and ``refine.fit_many``: observed images + starting models → refined models with uncertainties.

    result = refine.fit(observed, params, setup, free=["cell", "orientation", "distance", "beam_center", "scale"])
    print(result.summary()); result.to_json("fit.json"); flags = result.to_nanobragg_args()

    joint = refine.fit_many(observed_list, params_list, setup_list, shared=["distance", "beam_center"],
                            per_image=["orientation", "scale"])
    print(joint.summary()); joint.images[0].to_nanobragg_args()

Both run the one pipeline (one image is N = 1 with nothing shared): :func:`~refine.pipeline.problem.prepare`,
:func:`~refine.pipeline.strategy.run_stage` for every stage of :func:`~refine.pipeline.strategy.schedule`, and
:func:`~refine.pipeline.result.finish` / ``finish_many``, which a caller can also run step by step.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence, Union

from nbtorch.types import Params, Setup

from ..model.parameters import expand_free
from .options import FitOptions
from .problem import build_problem, image_inputs, initial_state, prepare
from .result import JointResult, Result, finish, finish_many
from .strategy import run_stage, schedule, start_scales


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
        free: groups to refine (:data:`refine.model.table.GROUPS`, sub-groups or single scalars; default
            :data:`refine.model.table.DEFAULT_FREE`).
        method: 'lm' (Levenberg–Marquardt, default), 'lbfgs' or 'adam'.
        target: 'poisson' (default), 'gaussian' (with ``read_noise`` σ in photons), 'lsq' (optional ``weights``
            image) or 'anscombe'.
        options: a :class:`~refine.pipeline.options.FitOptions` holding these and every other knob; keyword arguments
            (``crystal_system``, ``max_iter``, ``coarse_to_fine``, ``mask``, ``overload``, ``spots_only``, ``bounds``,
            ``priors``, ``callback``, ``nanobragg_args``, ``allow_degenerate`` … — the fields of FitOptions)
            override it.
        start: where to start: None (the starting model, x = 0), increments x [n] about it, or a previous
            :class:`Result` to resume from (its refined model; with the default ``coarse_to_fine='auto'`` only the
            final stage runs, as a resumed fit is already in the basin).

    Returns:
        :class:`refine.pipeline.result.Result`.

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


def _joint_options(options, shared, per_image, kwargs):
    """(FitOptions with free = shared + per-image, shared, per_image); ValueError for a group named both shared and
    per image, or none at all."""
    split = (lambda g: g.replace(",", " ").split() if isinstance(g, str) else [str(v) for v in g])
    shared, per_image = tuple(split(shared)), tuple(split(per_image))
    both = set(expand_free(shared)) & set(expand_free(per_image))
    if both:
        raise ValueError(f"{sorted(both)[0]} is named both shared and per image")
    if not shared and not per_image:
        raise ValueError("fit_many needs at least one shared or per-image group")
    return fit_options(options, free=shared + per_image, **kwargs), shared, per_image


def fit_many(observed_list: Sequence, params_list: Sequence, setup_list, shared=(), per_image=(), *,
             options: Optional[FitOptions] = None, paths: Optional[Sequence[str]] = None, nanobragg_args=None,
             batch: bool = True, progress: Optional[Callable[[str, int, int], None]] = None,
             **kwargs) -> JointResult:
    """Refine N images jointly: ``shared`` groups take one value for all images, ``per_image`` groups one per image.

    Args:
        observed_list: N observed images [slow, fast] (photons; tensors, arrays, ObservedImage or paths).
        params_list, setup_list: the N starting models (a single Setup is used for every image); the shared parts
            start from the first model's values (the others are overwritten and a note says so).
        shared, per_image: groups, sub-groups or scalars (:data:`refine.model.table.GROUPS`; e.g. shared ``distance``,
            ``beam_center``, ``detector_rotation.y``; per image ``orientation``, ``scale``).
        options / keyword arguments: as :func:`refine.fit` (target, crystal_system, max_iter, coarse_to_fine,
            coarse_iter, robust_iter, mask, overload, bounds, ftol, chunk_pixels, esd_scale, callback,
            allow_degenerate, method, priors, spots_only …).
        paths: a label per image for the result (default: the observed paths, when given as paths).
        nanobragg_args: the starting flags per image (a list of N strings or token lists; one string is used for
            every image), so that each image's refined model can be written back as flags.
        batch: simulate images of equal shape together under vmap (False: one at a time; same numbers).
        progress: None, or ``progress(what, done, total)`` called as the work on the images proceeds (``done`` of
            ``total`` images): 'preparing', 'starting scales', then per stage '<stage>: simulating' and
            '<stage>: Jacobians' (every pixel chunk), and 'ESDs: …' (a counter to show on a terminal; the
            per-iteration records go to ``callback``).

    Returns:
        :class:`refine.pipeline.result.JointResult` (shared values and ESDs, and per image a
        :class:`~refine.pipeline.result.Result`: its values, ESDs, correlations and refined flags).
    """
    t0 = time.perf_counter()
    opts, shared, _ = _joint_options(options, shared, per_image, kwargs)
    obs, params, setups, paths, flags = image_inputs(observed_list, params_list, setup_list, paths, nanobragg_args)
    pb = build_problem(obs, params, setups, opts, shared, paths, flags, batch, progress)
    state = initial_state(pb, start_scales(pb, pb.layout.pack([par.zeros() for par in pb.pars])))
    for stage in schedule(opts):
        state = run_stage(state, stage)
    return finish_many(state, seconds=time.perf_counter() - t0)
