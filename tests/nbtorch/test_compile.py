"""The compiled tile kernels (the forward tile, the derivative moments) trace into one graph each (no graph breaks),
so a compiler can fuse them."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import nbtorch
from nbtorch import kernel
from nbtorch.simulate import pixel_tile


def _tile(args):
    p, s = nbtorch.from_nanobragg_args(args, dtype=torch.float32)
    k = torch.arange(40)
    return pixel_tile(p, s, k % s.fpixels, k // s.fpixels)


@pytest.mark.parametrize("fn", [kernel.tile_sums, kernel.sample_moments])
def test_tile_kernels_have_no_graph_breaks(fn):
    spec, tp, tc = _tile("-default_F 100 -cell 60 70 80 90 90 90 -misset 3 4 5 -N 5 -detpixels 16 -pixel 0.4 "
                         "-mosaic 0.3 -mosaic_domains 3 -oversample 2 -dispersion 0.1 -dispsteps 2")
    assert kernel.has_fast_derivatives(spec)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a, b: fn(a, b, spec))(tp, tc)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
