"""Degenerate pairs: found before the fit, real (the image cannot tell them apart), refused by the command line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import jacfwd

import nbtorch
import refine
from nbtorch.io.images import write_raw_float
from refine.cli.fit import main
from refine.model.degeneracy import degenerate_pairs
from refine.model.parameters import parameterise
from refine.pipeline.strategy import DegeneracyWarning

from .refine_cases import model, observe


@pytest.mark.parametrize("extra,free,pairs", [
    ("", ["orientation", "detector_rotation"], [("orientation.x", "detector_rotation.x")]),
    ("-xds", ["orientation", "detector_rotation"], [("orientation.z", "detector_rotation.z")]),
    ("-dials", ["orientation.z", "detector_rotation.z"], [("orientation.z", "detector_rotation.z")]),
    ("", ["orientation", "detector_rotation.y", "detector_rotation.z"], []),
    ("", ["orientation.y", "detector_rotation"], []),
    ("-twotheta 5", ["twotheta", "detector_rotation.z"], [("twotheta", "detector_rotation.z")]),
    ("-twotheta 5", ["twotheta", "detector_rotation.x", "detector_rotation.y"], []),
    ("-xds -twotheta 5", ["twotheta", "detector_rotation"], []),  # sample pivot: the detector moves about the sample
])
def test_pairs_found_before_the_fit(extra, free, pairs):
    p, s, _ = model(f"{extra} -detpixels 8")
    found = [d.names for d in degenerate_pairs(parameterise(p, s, free))]
    assert found == pairs
    for d in degenerate_pairs(parameterise(p, s, free)):
        assert "fix" in d.message() and all(n in d.message() for n in d.names)


@pytest.mark.parametrize("extra,a,b", [("-polar 0", "orientation.x", "detector_rotation.x"),
                                       ("-polar 0 -xds", "orientation.z", "detector_rotation.z"),
                                       ("-polar 0 -twotheta 5", "twotheta", "detector_rotation.z")])
def test_the_pairs_really_are_degenerate(extra, a, b):
    """The image's derivatives with respect to the two scalars are parallel (unpolarized beam): no image can
    separate them; a pair that is not reported is not parallel."""
    p, s, _ = model(f"{extra} -detpixels 32")
    par = parameterise(p, s, [a, b, "orientation.y"])
    J = jacfwd(lambda x: nbtorch.simulate(par.unpack(x), s).reshape(-1))(par.zeros())
    u = J / torch.linalg.vector_norm(J, dim=0)
    ia, ib, iy = (par.index(n)[0] for n in (a, b, "orientation.y"))
    assert abs(float(u[:, ia] @ u[:, ib])) > 1 - 1e-6
    assert abs(float(u[:, ia] @ u[:, iy])) < 0.99


def test_api_warns_and_notes_unless_refused():
    p, s, _ = model("-detpixels 24")
    obs = observe(p, s)
    with pytest.warns(DegeneracyWarning, match="orientation.x and detector_rotation.x"):
        res = refine.fit(obs, p, s, free=["orientation.x", "detector_rotation.x"], coarse_to_fine=False, max_iter=1)
    assert any("detector_rotation.x" in n for n in res.notes) and "note:" in res.summary()
    with pytest.raises(ValueError, match="cannot be told apart.*fix detector_rotation.x"):
        refine.fit(obs, p, s, free=["orientation", "detector_rotation"], allow_degenerate=False)


def test_cli_refuses_a_degenerate_pair_unless_allowed(tmp_path, capsys):
    p, s, flags = model("-detpixels 24")
    path = tmp_path / "obs.bin"
    write_raw_float(str(path), observe(p, s).numpy().astype(np.float32))
    args = [str(path), "--refine", "orientation,detector_rotation.x,scale", "--no-coarse", "--max-iter", "1",
            "--quiet"] + flags.split()
    assert main(args) == 2  # a user error (issue 10)
    err = capsys.readouterr().err
    assert "orientation.x and detector_rotation.x cannot be told apart" in err and "--allow-degenerate" in err
    with pytest.warns(DegeneracyWarning):
        rc = main(args + ["--allow-degenerate"])
    assert rc in (0, 3, 4)
    assert "note: orientation.x and detector_rotation.x" in capsys.readouterr().out
