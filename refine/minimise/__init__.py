"""Minimisers: Levenberg–Marquardt (:mod:`.lm`) with the linear solves of its normal equations (:mod:`.solve`),
L-BFGS and Adam (:mod:`.optim`), and :data:`MINIMISERS`, the table a fit's ``method`` is looked up in.

Every minimiser is ``minimise(objective, x0, active, *, max_iter, ftol, callback, lower, upper, **options)`` →
:class:`~refine.minimise.lm.MinimizeResult`; ``options`` are the :class:`~refine.pipeline.options.FitOptions` fields
its entry names.  A new minimiser is one function and one entry here (or ``MINIMISERS[name] = Minimiser(...)``)."""
from typing import Callable, Dict, NamedTuple, Tuple

from .lm import MinimizeResult, levenberg_marquardt  # noqa: F401
from .optim import SCHEDULES, adam, lbfgs  # noqa: F401


class Minimiser(NamedTuple):
    """A fit ``method``: the function, the FitOptions fields it takes, and its iterations when ``max_iter`` is None."""

    minimise: Callable[..., MinimizeResult]
    options: Tuple[str, ...] = ()
    default_max_iter: int = 100


#: The fit methods by name.
MINIMISERS: Dict[str, Minimiser] = {
    "lm": Minimiser(levenberg_marquardt, ("damping",), 30),
    "lbfgs": Minimiser(lbfgs, (), 100),
    "adam": Minimiser(adam, ("lr", "schedule"), 300),
}
