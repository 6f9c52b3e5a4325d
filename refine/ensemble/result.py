"""The outcome of an ensemble refinement: refined |F| with SIGF, the outer cycles' table, the per-shot records; MTZ
(gemmi) and JSON-lines output."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import List

import numpy as np
import torch

from nbtorch.io._atomic import atomic_write

from .fmodel import FModel

#: Columns of the outer cycles' table (:func:`cycle_row`).
CYCLE_KEYS = ("cycle", "objective", "r_change", "cc_previous", "refined", "fixed", "mean_chi2_nu", "failed",
              "seconds", "sigf_method", "sigf_note", "sigf_seconds", "scale_esd")


def _cc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (NaN for fewer than 2 values or no spread)."""
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def cycle_row(cycle: int, objective: float, fm: FModel, x_old: torch.Tensor, x: torch.Tensor, records, seconds,
              sigf_method: str = "", sigf_note: str = "", sigf_seconds: float = 0.0, scale_esd: float = math.nan):
    """One row of the cycles' table: ``objective`` (summed loss + restraints after the F step), ``r_change`` =
    Σ|F − F_prev| / Σ F_prev and ``cc_previous`` over the refined classes, ``refined``/``fixed`` class counts,
    ``mean_chi2_nu`` of the per-shot fits, ``failed`` shots (left out of the cycle), ``seconds``; how SIGF was found
    (:class:`refine.ensemble.run.Sigma`): ``sigf_method`` ('inverse' or 'diagonal'), ``sigf_note`` (why the
    diagonal, else ''), ``sigf_seconds`` (its share of ``seconds``), ``scale_esd`` (the σ of the mean ln|F| that
    SIGF holds fixed when the shots' scales are refined, ≈ the relative σ of the common scale; NaN otherwise)."""
    on = fm.refined & fm.movable()
    F0 = fm.amplitudes(x_old).detach().numpy()[on]
    F1 = fm.amplitudes(x).detach().numpy()[on]
    chi = [r.get("chi2_nu") for r in records if isinstance(r.get("chi2_nu"), (int, float))]
    return {"cycle": cycle, "objective": float(objective),
            "r_change": float(np.abs(F1 - F0).sum() / max(F0.sum(), 1e-300)), "cc_previous": _cc(F0, F1),
            "refined": int(on.sum()), "fixed": int(fm.n - on.sum()),
            "mean_chi2_nu": float(np.mean(chi)) if chi else float("nan"),
            "failed": sum(1 for r in records if r.get("error")), "seconds": float(seconds),
            "sigf_method": sigf_method, "sigf_note": sigf_note, "sigf_seconds": float(sigf_seconds),
            "scale_esd": float(scale_esd)}


@dataclasses.dataclass
class EnsembleResult:
    """Refined structure factors.  Per class of the asymmetric unit (:class:`~refine.ensemble.asu.AsuMap` order):
    ``hkl`` int [n, 3], ``plus`` bool [n] (F(+) or, centric, both), ``F`` and ``F_start`` [n], ``SIGF`` [n] (NaN
    where not refined), ``refined`` bool [n] (seen by some shot's pixels; the others kept their start), ``d`` [n] Å.
    ``rows``: the outer cycles (:data:`CYCLE_KEYS`); ``records``: each shot's last fit
    (:data:`~refine.ensemble.shots.SHOT_KEYS`); ``table`` the final flat P1 |F| table of ``table_shape`` starting at
    ``hkl_min``; ``space_group``, ``anomalous``, ``cell`` (Å, degrees), ``seconds``."""

    hkl: np.ndarray
    plus: np.ndarray
    centric: np.ndarray
    F: np.ndarray
    F_start: np.ndarray
    SIGF: np.ndarray
    refined: np.ndarray
    d: np.ndarray
    rows: List[dict]
    records: List[dict]
    table: np.ndarray
    table_shape: tuple
    hkl_min: tuple
    space_group: str
    anomalous: bool
    cell: tuple
    seconds: float = 0.0

    @classmethod
    def build(cls, fm: FModel, x: torch.Tensor, sigF, rows, records, table_shape, hkl_min) -> "EnsembleResult":
        """The result of model ``fm`` at log-scales ``x``."""
        a = fm.amap
        return cls(a.hkl, a.plus, a.centric, fm.amplitudes(x).detach().numpy(), fm.F_ref.copy(), np.asarray(sigF),
                   fm.refined & fm.movable(), fm.d, list(rows), list(records), fm.table(x).detach().numpy(),
                   tuple(int(v) for v in table_shape), tuple(int(v) for v in hkl_min), a.space_group, a.anomalous,
                   fm.cell)

    def structure_table(self, dtype=torch.float64) -> torch.Tensor:
        """The refined P1 table [nh, nk, nl] for :class:`nbtorch.types.Structure` (``Setup.hkl_min`` = ``hkl_min``)."""
        return torch.as_tensor(self.table, dtype=dtype).reshape(self.table_shape)

    def _mtz_columns(self):
        """(hkl [m, 3], {label: (type, values [m])}) of the refined reflections, merged by ASU index."""
        on = self.refined
        if not self.anomalous:
            return self.hkl[on], {"F": ("F", self.F[on]), "SIGF": ("Q", self.SIGF[on])}
        keys = sorted({tuple(h) for h in self.hkl[on].tolist()})
        where = {h: k for k, h in enumerate(keys)}
        cols = {name: np.full(len(keys), np.nan) for name in ("F(+)", "SIGF(+)", "F(-)", "SIGF(-)")}
        for h, p, c, f, s in zip(self.hkl[on].tolist(), self.plus[on], self.centric[on], self.F[on], self.SIGF[on]):
            for sign in (("+", "-") if c else (("+",) if p else ("-",))):
                cols[f"F({sign})"][where[tuple(h)]], cols[f"SIGF({sign})"][where[tuple(h)]] = f, s
        fp, fm_, sp, sm = cols["F(+)"], cols["F(-)"], cols["SIGF(+)"], cols["SIGF(-)"]
        both = ~np.isnan(fp) & ~np.isnan(fm_)
        F = np.where(both, 0.5 * (fp + fm_), np.where(np.isnan(fp), fm_, fp))
        S = np.where(both, 0.5 * np.sqrt(sp ** 2 + sm ** 2), np.where(np.isnan(fp), sm, sp))
        out = {"F": ("F", F), "SIGF": ("Q", S), "F(+)": ("G", fp), "SIGF(+)": ("L", sp), "F(-)": ("G", fm_),
               "SIGF(-)": ("L", sm)}
        return np.array(keys, dtype=np.int64).reshape(-1, 3), out

    def write_mtz(self, path: str) -> None:
        """Write the refined reflections (those no shot saw are left out) as an MTZ file (gemmi): H, K, L, F, SIGF
        and, with ``anomalous``, F(+), SIGF(+), F(−), SIGF(−) (missing halves NaN); the cell and space group.
        Written to a temporary file and renamed: never half-written."""
        import gemmi

        hkl, cols = self._mtz_columns()
        mtz = gemmi.Mtz(with_base=True)
        mtz.spacegroup = gemmi.SpaceGroup(self.space_group)
        mtz.set_cell_for_all(gemmi.UnitCell(*self.cell))
        mtz.add_dataset("nbtorch")
        for label, (kind, _) in cols.items():
            mtz.add_column(label, kind)
        data = np.column_stack([hkl.astype(np.float64)] + [v for _, v in cols.values()]).astype(np.float32)
        mtz.set_data(data)
        tmp = f"{path}.part"
        mtz.write_to_file(tmp)
        os.replace(tmp, path)

    def write_shots(self, path: str) -> None:
        """Write each shot's record of its last fit as one JSON line (atomically)."""
        atomic_write(path, "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.records).encode())

    def table_text(self) -> str:
        """The outer cycles as a text table."""
        head = f"{'cycle':>5s} {'objective':>16s} {'R(change)':>10s} {'CC(prev)':>9s} {'refined':>8s} " \
               f"{'fixed':>6s} {'<chi2/nu>':>9s} {'failed':>6s} {'seconds':>8s}"
        lines = [head] + [f"{r['cycle']:5d} {r['objective']:16.8g} {r['r_change']:10.4f} {r['cc_previous']:9.4f} "
                          f"{r['refined']:8d} {r['fixed']:6d} {r['mean_chi2_nu']:9.3f} {r.get('failed', 0):6d} "
                          f"{r['seconds']:8.1f}"
                          for r in self.rows]
        return "\n".join(lines)

    @property
    def sigf_method(self) -> str:
        """How the last cycle found SIGF: 'inverse', 'diagonal' (its row's ``sigf_note`` says why), '' (no cycle)."""
        return self.rows[-1].get("sigf_method", "") if self.rows else ""

    def _sigf_line(self) -> str:
        """The summary's line on SIGF ('' without cycles)."""
        if self.sigf_method == "inverse":
            esd = self.rows[-1].get("scale_esd", math.nan)
            scale = ("" if not math.isfinite(esd) else f", on the run's common scale of |F| (held; the data leave it "
                     f"to the restraints, which fix it to ±{100 * esd:.2g} %)")
            return f"SIGF from the diagonal of the inverse of the profiled Gauss–Newton matrix{scale}\n"
        if self.sigf_method:
            return f"SIGF from the diagonal of the profiled Gauss–Newton matrix only: {self.rows[-1]['sigf_note']}\n"
        return ""

    def summary(self) -> str:
        """A few lines: the space group, reflections refined and fixed, how SIGF was found, the cycles' table."""
        n_on = int(self.refined.sum())
        failed = [r for r in self.records if r.get("error")]
        text = (f"structure factors from {len(self.records)} stills, {self.space_group}"
                f"{' (anomalous)' if self.anomalous else ''}: {n_on} reflections refined, "
                f"{len(self.F) - n_on} not on any image (kept at their start)\n"
                + "".join(f"shot {r['label']} left out of cycle {r['cycle']}: {r['error']}\n" for r in failed)
                + self._sigf_line() + self.table_text())
        return text
