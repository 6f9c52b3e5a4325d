"""``nbtorch-refine --images LIST | --expt-list LIST --refine-f``: structure factors from many stills
(:func:`refine.ensemble.run.run_ensemble`), in this process or on Dask (``--workers`` / ``--scheduler``, as
``--independent``); the starting |F| from every line's ``-hkl`` / ``-pdb`` / ``-default_F`` or ``--f-start``;
outputs ``--out-mtz``, ``--out-shots`` and the cycles' table on stdout; ``--checkpoint DIR`` to resume.  Options:
:mod:`refine.cli.table` (program ``ensemble``); the command line's checks are :mod:`refine.cli.many`'s."""
from __future__ import annotations

import math
import os
import sys

import torch

from ..imagelist import entry_start
from .asu import space_group
from .fmodel import Restraints
from .run import RunConfig, run_ensemble
from .shots import entry_label, load_shard

#: Suffix of the per-shot JSON lines written next to ``--out-mtz`` when ``--out-shots`` is not given.
SHOTS_SUFFIX = "_shots.jsonl"


def f_start_flags(path: str) -> list:
    """The nanoBragg flags of ``--f-start FILE``: ``-pdb FILE`` for a PDB/mmCIF model (.pdb, .cif, .ent), else
    ``-hkl FILE`` (an MTZ or an ``h k l F`` text file)."""
    model = os.path.splitext(path)[1].lower() in (".pdb", ".cif", ".ent", ".mmcif")
    return ["-pdb" if model else "-hkl", path]


def problem(ns) -> str:
    """What is wrong with the ``--refine-f`` options of ``ns`` (one line naming the option), or ''."""
    for flag in ("restrain_start", "restrain_bins", "restrain_friedel"):
        value = getattr(ns, flag)
        if not (math.isfinite(value) and value >= 0):
            return f"--{flag.replace('_', '-')} must be a finite number >= 0; got {value}"
    try:
        space_group(ns.space_group)
    except ValueError:
        return f"--space-group {ns.space_group!r}: unknown space group (a Hermann–Mauguin symbol or a number 1–230)"
    if not ns.out_mtz:
        return "--refine-f needs --out-mtz F.mtz"
    if ns.restrain_friedel and not ns.anomalous:
        return "--restrain-friedel needs --anomalous"
    if ns.f_start and not os.path.isfile(ns.f_start):
        return f"--f-start {ns.f_start}: no such file"
    return ""


def shots_path(ns) -> str:
    """``--out-shots``, else ``--out-mtz``'s stem + :data:`SHOTS_SUFFIX`."""
    return ns.out_shots or os.path.splitext(ns.out_mtz)[0] + SHOTS_SUFFIX


def _loaders(entries, load: dict):
    """``make(n_shards, threads, common)`` of :func:`run_ensemble`: :func:`load_shard` tasks, shot k in shard
    k mod n_shards (read where each runs)."""
    def make(k, threads, common):
        return [(load_shard, ([entries[j] for j in range(i, len(entries), k)], list(range(i, len(entries), k)),
                              load, *common, threads)) for i in range(min(k, len(entries)))]

    return make


def run_cli(ns, entries, fit_kwargs: dict, expt_dir=None) -> int:
    """Run ``--refine-f`` for the LIST ``entries`` with the parsed options ``ns`` and the per-shot fits' keyword
    arguments ``fit_kwargs``; print the summary and write the outputs (an --expt-list shot's refined experiment
    list into ``expt_dir``); the exit status (0)."""
    dtype = getattr(torch, ns.dtype)
    params, setups = [], []
    for e in entries:
        p, s, _ = entry_start(e, dtype)
        params.append(p)
        setups.append(s)
    load = {"dtype": ns.dtype, "overload": ns.overload, "adc": ns.adc, "gain": ns.gain, "gain_map": ns.gain_map}
    shown = None if ns.quiet else (lambda row: print(f"cycle {row['cycle']}: objective {row['objective']:.8g}, "
                                                     f"R(change) {row['r_change']:.4f}, CC(prev) "
                                                     f"{row['cc_previous']:.4f}", file=sys.stderr, flush=True))
    cfg = RunConfig(ns.space_group, ns.anomalous, tuple((ns.per_image or "scale").replace(",", " ").split()),
                    ns.cycles, Restraints(ns.restrain_start, ns.restrain_bins, ns.restrain_friedel), ns.f_iter,
                    ns.checkpoint, shown, expt_dir)
    on_dask = ns.workers is not None or ns.scheduler is not None
    dask_args = dict(workers=ns.workers, scheduler=ns.scheduler, security=ns.security) if on_dask else None
    result = run_ensemble(_loaders(entries, load), params, setups, [entry_label(e) for e in entries], cfg,
                          dict(fit_kwargs, fused=None), dask_args)
    result.write_mtz(ns.out_mtz)
    result.write_shots(shots_path(ns))
    print(result.summary())
    return 0
