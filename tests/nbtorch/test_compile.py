"""The hot path traces into one graph (no graph breaks), so torch.compile can fuse it."""
from __future__ import annotations

import torch
import torch._dynamo

import nbtorch


def test_simulate_has_no_graph_breaks():
    p, s = nbtorch.from_nanobragg_args("-default_F 100 -cell 60 70 80 90 90 90 -misset 3 4 5 -N 5 -detpixels 16 "
                                       "-pixel 0.4 -mosaic 0.3 -mosaic_domains 3 -oversample 2 -roi 2 13 3 12",
                                       dtype=torch.float32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(nbtorch.simulate)(p, s)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1
