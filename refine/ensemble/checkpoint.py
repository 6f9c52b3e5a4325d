"""The checkpoint of an ensemble refinement: after every outer cycle, ``DIR/ensemble_checkpoint.pt`` holds the
log-scales x, the refined classes, SIGF, the cycles' rows, and every shot's record and refined model (tensors,
strings and JSON only: read back with ``torch.load(weights_only=True)``).  It is replaced atomically, so a run killed
at any moment leaves the last finished cycle's; a run with the same shots (labels), space group and anomalous flag
resumes from it."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

from nbtorch.types import Background, Beam, Crystal, Detector, Params, Structure

#: The checkpoint's file name in its folder.
CHECKPOINT_NAME = "ensemble_checkpoint.pt"
_PARTS = {"crystal": Crystal, "beam": Beam, "detector": Detector, "structure": Structure, "background": Background}


def checkpoint_path(folder: str) -> str:
    """The checkpoint file of ``folder``."""
    return os.path.join(folder, CHECKPOINT_NAME)


def _params_state(p: Params) -> dict:
    return {part: {f: getattr(getattr(p, part), f).detach().clone() for f in cls._fields}
            for part, cls in _PARTS.items()}


def _params_of(state: dict) -> Params:
    return Params(**{part: cls(**state[part]) for part, cls in _PARTS.items()})


def save_checkpoint(folder: str, fm, labels: Sequence[str], state: dict) -> None:
    """Write the state of a finished cycle (``cycle``, ``x``, ``refined``, ``sigF``, ``rows``, ``records``,
    ``shots``: [{"record", "model"}]) into ``folder`` (made when missing), atomically."""
    os.makedirs(folder, exist_ok=True)
    payload = {"version": 1, "space_group": fm.amap.space_group, "anomalous": fm.amap.anomalous, "n": fm.n,
               "labels": list(labels), "cycle": int(state["cycle"]), "x": state["x"].detach().clone(),
               "refined": torch.as_tensor(np.asarray(state["refined"])), "sigF": torch.as_tensor(state["sigF"]),
               "rows": json.dumps(state["rows"]), "records": json.dumps(state["records"], allow_nan=True),
               "models": [_params_state(s["model"]) for s in state["shots"]]}
    path = checkpoint_path(folder)
    tmp = path + ".part"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(folder: str, fm, labels: Sequence[str]) -> Optional[dict]:
    """The state in ``folder``'s checkpoint (None when there is none), with ``shots`` [{"model"}] in ``labels``
    order; ValueError naming the folder when it is not a checkpoint of this run (other shots, space group,
    anomalous flag or reflections) or cannot be read."""
    path = checkpoint_path(folder)
    if not os.path.exists(path):
        return None
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line
        raise ValueError(f"checkpoint {folder}: {CHECKPOINT_NAME} cannot be read ({type(exc).__name__}); remove it "
                         "to start afresh") from None
    mine = {"space_group": fm.amap.space_group, "anomalous": fm.amap.anomalous, "n": fm.n, "labels": list(labels)}
    for key, value in mine.items():
        if not isinstance(data, dict) or data.get(key) != value:
            raise ValueError(f"checkpoint {folder}: made by another run (its {key} differs from this run's); give "
                             "another --checkpoint folder or remove it")
    return {"cycle": data["cycle"], "x": data["x"], "refined": data["refined"].numpy().astype(bool),
            "sigF": data["sigF"].numpy(), "rows": json.loads(data["rows"]), "records": json.loads(data["records"]),
            "shots": [{"model": _params_of(m)} for m in data["models"]]}
