"""CPU and GPU give the same images and gradients (skipped, with the reason, where no CUDA device is present)."""
from __future__ import annotations

import pytest
import torch

import nbtorch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

ARGS = ("-default_F 100 -cell 60 70 80 90 95 90 -misset 3 4 5 -N 5 -detpixels 48 -pixel 0.3 -distance 60 "
        "-mosaic 0.3 -mosaic_domains 3 -oversample 2 -dispersion 0.5 -dispsteps 2")


@pytest.mark.parametrize("fused", [False, True])
def test_gpu_image_and_gradient_equal_cpu(fused):
    p, s = nbtorch.from_nanobragg_args(ARGS, dtype=torch.float64)
    pg, _ = nbtorch.from_nanobragg_args(ARGS, dtype=torch.float64, device="cuda")
    out = []
    for q in (p, pg):
        cell = q.crystal.cell.clone().requires_grad_()
        img = nbtorch.simulate(q._replace(crystal=q.crystal._replace(cell=cell)), s, fused=fused)
        img.pow(2).sum().backward()
        assert img.device == cell.device
        out.append((img.detach().cpu(), cell.grad.cpu()))
    (ic, gc), (ig, gg) = out
    torch.testing.assert_close(ig, ic, rtol=1e-10, atol=1e-10 * float(ic.max()))
    torch.testing.assert_close(gg, gc, rtol=1e-10, atol=1e-10 * float(gc.abs().max()))
    assert float(ic.max()) > 0
