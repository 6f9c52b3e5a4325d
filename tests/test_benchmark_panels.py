"""The panel-detector benchmark (``benchmarks/panels.py``) compares like with like: its Jungfrau-4M-like layouts
hold the stated pixels without overlaps, every description of the detector renders the same image when the gaps are
closed, the C program's per-ASIC CUSTOM flags put one panel where the layout has it, and the whole run (eager, tiny
ASICs) reports its ratios, with the C comparison run or skipped cleanly.  No timing is asserted."""
from __future__ import annotations

import itertools
import math
import stat

import pytest
import torch

import nbtorch
from benchmarks import panels
from benchmarks.report import panel_section, write_panels
from nbtorch.detector import with_panels


def _box(p):
    """(x0, x1, y0, y1) in pixels of a flat panel (fast +x, slow +y)."""
    x, y = p.corner[0] / panels.PIXEL, p.corner[1] / panels.PIXEL
    return x, x + p.fpixels, y, y + p.spixels


@pytest.mark.parametrize("cut,count", [("8 panels", 8), ("16 panels", 16), ("64 panels", 64)])
def test_jungfrau_layouts_hold_4m_pixels_in_8_modules_without_overlaps(cut, count):
    layout = panels.jungfrau_layout(256, cut)
    assert layout.n_panels == count and layout.equal_panels
    assert sum(p.fpixels * p.spixels for p in layout.panels) == 8 * 512 * 1024 == 2048 * 2048
    assert [layout.nodes[i].name for i in layout.nodes_at_level(1)] == [f"m{m}" for m in range(8)]
    boxes = [_box(p) for p in layout.panels]
    for a, b in itertools.combinations(boxes, 2):
        assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2]
    m0, m1 = layout.nodes[layout.node_index("m0")], layout.nodes[layout.node_index("m1")]
    right_of_m0 = max(boxes[k][1] for k in m0.panels)
    assert min(boxes[k][0] for k in m1.panels) - right_of_m0 == pytest.approx(panels.MODULE_GAP[0])
    x0, x1 = min(b[0] for b in boxes), max(b[1] for b in boxes)
    assert x0 + x1 == pytest.approx(0.0) and all(p.corner[2] == panels.DISTANCE for p in layout.panels)


def _stitched(image, layout, side):
    """The panels of ``image`` [P, S, F] placed in one side × side image by their corners (gaps closed)."""
    out = torch.zeros(side, side, dtype=image.dtype)
    for k, p in enumerate(layout.panels):
        x, _, y, _ = _box(p)
        x, y = round(x + side / 2), round(y + side / 2)
        out[y:y + p.spixels, x:x + p.fpixels] = image[k]
    return out


def test_without_gaps_every_description_renders_the_one_panel_image():
    models = panels.detectors(4, "light", torch.float64)
    params, setup = models["nanoBragg detector"]
    flat = nbtorch.simulate(*models["1 panel"], fused=False)[0]
    torch.testing.assert_close(nbtorch.simulate(params, setup, fused=False), flat, rtol=1e-9, atol=0)
    for cut in panels.CUTS:
        layout = panels.jungfrau_layout(4, cut, module_gap=(0, 0), asic_gap=0)
        image = nbtorch.simulate(*with_panels(params, setup, layout), fused=False)
        torch.testing.assert_close(_stitched(image, layout, 32), flat, rtol=1e-9, atol=0)
    assert float(flat.max()) > 10 * float(flat.min()) > 0


@pytest.mark.parametrize("k", [0, 21, 63])
def test_custom_flags_render_one_asic_as_the_layout_does(k):
    params, setup = panels.detectors(4, "light", torch.float64)["64 panels"]
    image = nbtorch.simulate(params, setup, fused=False)
    panel = setup.panels.panels[k]
    p1, s1 = nbtorch.from_nanobragg_args(f"{panels.CRYSTAL} {panels.WORKLOADS['light']} "
                                         f"{panels.custom_flags(panel)}")
    torch.testing.assert_close(nbtorch.simulate(p1, s1, fused=False), image[k], rtol=1e-9, atol=0)


def _check_run(res, with_c: bool):
    assert set(res["runs"]) == {f"{w}_{d}" for w in panels.WORKLOADS for d in ("float32", "float64")} | (
        {f"{w}_C" for w in panels.WORKLOADS} if with_c else set())
    for key in ("light_float32", "mosaic_float64"):
        run = res["runs"][key]
        assert run["pixels"] == 32 * 32 and run["ratio_to_1_panel"]["1 panel"] == [1.0, 1.0, 1.0]
        assert run["cpu_ratio_to_1_panel"]["1 panel"] == [1.0, 1.0, 1.0]
        assert all(math.isfinite(r) and r > 0 for rs in run["ratio_to_nanobragg"].values() for r in rs)
    assert res["runs"]["mosaic_float64"]["samples_per_pixel"] == 20


def test_tiny_eager_run_reports_ratios_and_skips_the_c_program(tmp_path):
    res = panels.run(4, torch.get_num_threads(), 2, None, fused=False)
    _check_run(res, with_c=False)
    text = panel_section(res)
    assert "| mosaic (20 samples per pixel) | float64 | 16 panels |" in text and "was skipped" in text
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Performance\n\nkept\n")
    write_panels(res, path)
    write_panels(res, path)
    out = path.read_text()
    assert out.count("## Panel detectors") == 1 and "kept" in out and out.index("kept") < out.index("## Panel")


def test_c_program_runs_once_per_asic_with_custom_flags(tmp_path):
    log = tmp_path / "calls.txt"
    fake = tmp_path / "nanoBragg"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    res = panels.run(4, torch.get_num_threads(), 1, str(fake), fused=False)
    _check_run(res, with_c=True)
    calls = log.read_text().splitlines()
    assert len(calls) == 2 * 64 == 2 * res["runs"]["light_C"]["processes"]
    assert all("-detpixels_f 4 -detpixels_s 4" in c and "-nonoise" in c and "-fdet_vector" in c for c in calls)
    assert "| light | 64 C processes (one per ASIC):" in panel_section(res)
