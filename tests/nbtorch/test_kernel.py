"""The tile kernel: compiled = eager, one-pass derivatives = autograd, tiling invisible, memory set by the tile."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import nbtorch
from nbtorch import aot, fused, kernel
from nbtorch import shape as shapes
from nbtorch.simulate import kernel_spec, pixel_tile, plan

BASE = "-default_F 100 -cell 60 70 80 90 95 90 -misset 1 2 3 -N 4 -detpixels 8 -pixel 1.2 -distance 80 "
DERIVATIVE_CASES = ["-mosaic 0.3 -mosaic_domains 3 -oversample 2 -dispersion 1 -dispsteps 3",
                    "-dmin 2 -water 100 -polar 0.5 -oversample 2",
                    "-detector_thick 100 -detector_thicksteps 3 -detector_rotx 5 -twotheta 10",
                    "-point_pixel -nopolar -dispersion 1 -dispsteps 3 -divergence 1 -divsteps 3",
                    "-dmin 1.5 -divergence 1 -divsteps 3 -mosaic 1 -mosaic_domains 2"]


def _whole_image_tile(args):
    p, s = nbtorch.from_nanobragg_args(BASE + args)
    idx = torch.arange(s.fpixels * s.spixels)
    return pixel_tile(p, s, idx % s.fpixels, idx // s.fpixels)


@pytest.mark.parametrize("N", [1.0, 2.0, 4.7, 5.0, 50.0, 0.6])
@pytest.mark.parametrize("form", ["polynomial", "sines"])
def test_both_forms_of_the_lattice_factor_equal_the_quotient_of_sines(N, form):
    """sincg in the form compiled kernels take (polynomials) and the form eager code takes (sines): the quotient of
    sines (where sin πΔh is not tiny), N at 0, closed-form derivatives against autograd and against the derivative of
    the quotient; float32 within its rounding of the float64 value."""
    value = getattr(shapes, f"_sincg_{form}")
    with_derivatives = getattr(shapes, f"_sincg_{form}_and_derivatives")
    dh = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)
    Nt = torch.tensor(N, dtype=torch.float64)
    x = torch.pi * dh
    away = dh.abs() > 1e-4
    quotient = torch.sin(N * x) / torch.sin(x)
    f = value(dh, Nt)
    assert float((f - quotient)[away].abs().max()) <= 1e-13 * N
    assert float(value(torch.zeros((), dtype=torch.float64), Nt)) == N
    f2, g, m = with_derivatives(dh, Nt)
    torch.testing.assert_close(f2, f, rtol=1e-13, atol=1e-13 * N)
    d, n = dh.clone().requires_grad_(), Nt.clone().requires_grad_()
    gd, gn = torch.autograd.grad(value(d, n).sum(), (d, n))
    torch.testing.assert_close(g, gd, rtol=1e-11, atol=1e-11 * N**3)
    torch.testing.assert_close(m.sum(), gn, rtol=1e-11, atol=1e-11 * N)
    g_ref = torch.pi * (N * torch.cos(N * x) - quotient * torch.cos(x)) / torch.sin(x)
    outside = dh.abs() > 1e-3  # outside the sines form's series window (its truncation there: ≈ 1e-11 of N³)
    assert float((g - g_ref)[outside].abs().max()) <= 1e-11 * N**3
    f32 = value(dh.float(), Nt.float())
    assert float((f32.double() - f).abs().max()) <= 4e-7 * N


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_values_only_lattice_factor_equals_the_guarded_one(dtype):
    """values_only (the plain quotient of sines, no guard at 0) = the guarded sines form: within 1e-13 of N in
    float64 (also inside the guard's series window, whose truncation is ≈ 4e-14 at N = 0.6, and at 1e-300), its
    rounding in float32, exactly N at Δh = 0 for integer, fractional and zero N."""
    eps = 1e-13 if dtype == torch.float64 else 1e-6
    fine = torch.linspace(-0.5, 0.5, 20001, dtype=torch.float64)
    tiny = torch.tensor([0.0, 1e-300, -1e-300, 1e-30, 1e-12, -3e-7, 1e-5, 4e-5, 0.5, -0.5], dtype=torch.float64)
    dh = torch.cat([fine, tiny]).to(dtype)
    for N in (0.0, 0.6, 1.0, 4.7, 5.0, 50.0, 1e4):
        Nt = torch.tensor(N, dtype=dtype)
        values = shapes.sincg_reduced(dh, Nt, values_only=True)
        guarded = shapes.sincg_reduced(dh.double(), Nt.double())
        assert float((values.double() - guarded).abs().max()) <= eps * max(N, 1.0)
        assert float(values[20001]) == float(Nt)  # Δh = 0: N exactly


class _NaNDerivative(torch.autograd.Function):
    """x itself, whose derivative in either mode is NaN: a trap for derivatives that flow through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")

    @staticmethod
    def jvp(ctx, t):
        return t * float("nan")


def test_derivatives_never_flow_through_the_values_only_lattice_factor(monkeypatch):
    """The eager forward tiles take the values-only lattice factor (no guard at Δh = 0, not differentiable there);
    with that form made a NaN trap for derivatives, the eager image is unchanged and backward, jacfwd, jacrev and
    vmap over cells stay finite and equal to the untrapped ones: derivatives always take the guarded form."""
    p, s = _model(SMALL)
    cells = torch.stack([p.crystal.cell, p.crystal.cell * 1.001])

    def image(cell):
        return nbtorch.simulate(_with_cell(p, cell), s, fused=False)

    def derivatives():
        cell = p.crystal.cell.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(image(cell).square().sum(), cell)
        return (image(p.crystal.cell), g, torch.func.jacfwd(lambda c: image(c).sum((-1, -2)))(p.crystal.cell),
                torch.func.jacrev(lambda c: image(c)[5:9, 5:9].sum())(p.crystal.cell), torch.vmap(image)(cells))

    calls = []
    plain = shapes._sincg_values
    expected = derivatives()
    monkeypatch.setattr(shapes, "_sincg_values", lambda dh, N: calls.append(1) or _NaNDerivative.apply(plain(dh, N)))
    trapped = derivatives()
    assert calls
    for got, want in zip(trapped, expected):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-13, atol=0)


def test_compiled_code_takes_the_polynomial_lattice_factor():
    """Traced by the compiler, sincg_reduced is the polynomial form (no sin in the graph); eager, the sines."""
    ops = []

    def backend(gm, example_inputs):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    dh = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    N = torch.tensor(5.0, dtype=torch.float64)
    compiled = torch.compile(shapes.sincg_reduced, backend=backend, fullgraph=True)(dh, N)
    assert ops and not any("sin" in o for o in ops)
    torch.testing.assert_close(compiled, shapes.sincg_reduced(dh, N), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("args", DERIVATIVE_CASES)
def test_one_pass_forward_mode_equals_autograd(args):
    """derivative_moments + jvp_from_moments (all tangents in one pass) = torch.func.jvp of the tile, per column."""
    spec, tp, tc = _whole_image_tile(args)
    assert kernel.has_fast_derivatives(spec)
    gen = torch.Generator().manual_seed(3)
    tans = [kernel.TileParams(*(torch.randn(v.shape, generator=gen, dtype=v.dtype) for v in tp))._replace(F=None)
            for _ in range(3)]
    batched = kernel.TileParams(*(None if v[0] is None else torch.stack(v) for v in zip(*tans)))
    m = kernel.derivative_moments(tp, tc, spec)
    Sd, fd = kernel.jvp_from_moments(m, tp, batched)
    S0, f0 = kernel.tile_sums(tp, tc, spec)
    torch.testing.assert_close(tp.I_bg + m.S, S0, rtol=1e-12, atol=0)
    for c, t in enumerate(tans):
        _, (Sd0, fd0) = torch.func.jvp(lambda q: kernel.tile_sums(q, tc, spec), (tp,),
                                       (t._replace(F=torch.zeros_like(tp.F)),))
        torch.testing.assert_close(Sd[c], Sd0, rtol=1e-9, atol=1e-9 * float(Sd0.abs().max()))
        torch.testing.assert_close(fd[c], fd0, rtol=1e-9, atol=1e-9 * float(fd0.abs().max()))


def _model(args, dtype=torch.float64):
    p, s = nbtorch.from_nanobragg_args(args, dtype=dtype)
    return p, s


def _with_cell(p, cell):
    return p._replace(crystal=p.crystal._replace(cell=cell))


def _with_grad_cell(p):
    return p._replace(crystal=p.crystal._replace(cell=p.crystal.cell.detach().clone().requires_grad_()))


SMALL = ("-default_F 100 -cell 60 70 80 90 95 90 -misset 3 4 5 -N 5 -detpixels 16 -pixel 0.4 -distance 60 "
         "-mosaic 0.3 -mosaic_domains 3 -oversample 2 -dispersion 0.5 -dispsteps 2")


def test_compiled_forward_equals_eager():
    """simulate(fused=True) and fused=False give the same image to 1e-10 in float64 (the compiled kernel is built
    here: a few seconds on a cold cache)."""
    p, s = _model(SMALL)
    eager = nbtorch.simulate(p, s, fused=False)
    with _no_fallback():
        comp = nbtorch.simulate(p, s, fused=True)
    torch.testing.assert_close(comp, eager, rtol=1e-10, atol=1e-10 * float(eager.max()))
    assert float(eager.max()) > 0
    if fused.compiler_available():
        assert ("forward", kernel_spec(p, s), torch.float64, "cpu", None) in aot._loaded, "compiled forward unused"


_SECOND_PROCESS = """
import sys, torch, nbtorch
p, s = nbtorch.from_nanobragg_args(sys.argv[1].split())
torch.save(nbtorch.simulate(p, s, fused=True), sys.argv[2])
print("dynamo imported:", "torch._dynamo" in sys.modules, "inductor imported:", "torch._inductor" in sys.modules)
"""


def test_a_second_process_loads_the_compiled_forward_without_dynamo(tmp_path):
    """Once a machine has the compiled forward tile of a kernel spec, a new process runs it without importing dynamo
    or inductor (no tracing, no compilation) and gets the eager image to 1e-10."""
    p, s = _model(SMALL)
    with _no_fallback():
        nbtorch.simulate(p, s, fused=True)  # builds the package here if this machine has none yet
    if not fused.compiler_available() or fused._broken:
        pytest.skip("no compiled kernels on this machine")
    out = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, SMALL, str(tmp_path / "img.pt")], capture_output=True,
                         text=True, check=True, timeout=300)
    assert "dynamo imported: False inductor imported: False" in out.stdout, out.stdout + out.stderr
    eager = nbtorch.simulate(p, s, fused=False)
    torch.testing.assert_close(torch.load(tmp_path / "img.pt"), eager, rtol=1e-10, atol=1e-10 * float(eager.max()))


def test_compiled_packages_are_keyed_by_kernel_dtype_and_cpu(monkeypatch, tmp_path):
    """A package name changes with the kernel, its spec, the dtype and the CPU's vector instruction set (a cache
    shared by different machines must not hand one CPU's code to another)."""
    spec, cpu = kernel.KernelSpec(), torch.device("cpu")
    base = aot.package_path(tmp_path, "forward", spec, torch.float64, cpu)
    others = [aot.package_path(tmp_path, "moments", spec, torch.float64, cpu),
              aot.package_path(tmp_path, "forward", kernel.KernelSpec(dmin=True), torch.float64, cpu),
              aot.package_path(tmp_path, "forward", spec, torch.float32, cpu)]
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SOME_OTHER_ISA")
    others.append(aot.package_path(tmp_path, "forward", spec, torch.float64, cpu))
    assert len({base, *others}) == 5 and all(p.parent == tmp_path / "aot" for p in others)


def test_compiled_forward_any_sizes_and_strided_inputs():
    """One compiled forward package serves every tile size, orientation and source count, sub-pixel grid and
    sensor-layer count of a kernel spec, and strided (non-contiguous) inputs (float64, 1e-10 against eager)."""
    p, s = _model(SMALL)
    spec, tp, tc = pixel_tile(p, s, torch.arange(7), torch.arange(7) + 3)
    with _no_fallback():
        for O, K, P in ((3, 2, 7), (1, 1, 1), (2, 1, 5)):
            tpo = tp._replace(A=tp.A.flip(0)[:O], close=tp.close[:P],  # strided views
                              **{k: getattr(tp, k)[:, :P] for k in ("pix0", "fdet", "sdet", "odet")})
            tco = tc._replace(fast=tc.fast[:P], slow=tc.slow[:P], area=tc.area[:P], capture_k=tc.capture_k[:P],
                              layers=tc.layers[:, :P], incident=tc.incident_all[:K],
                              lam_factor=tc.lam_factor_all[:K], weight=tc.weight_all[:K])
            comp, ref = fused.forward(spec, tco, tpo, True), kernel.tile_sums(tpo, tco, spec)
            for a, b in zip(comp, ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
        for extra in (["-oversample", "3"], ["-oversample", "1", "-dispsteps", "5", "-mosaic_domains", "1"]):
            q, t = _model(SMALL + " " + " ".join(extra))
            assert kernel_spec(q, t) == spec
            eager = nbtorch.simulate(q, t, fused=False)
            torch.testing.assert_close(nbtorch.simulate(q, t, fused=True), eager, rtol=1e-10,
                                       atol=1e-10 * float(eager.max()))


class _no_fallback:
    """Fail if the compiled kernel fell back to eager code (a RuntimeWarning from nbtorch.fused)."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings(record=True)
        self.log = self._w.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        if exc[0] is None and fused.compiler_available():
            msgs = [str(w.message) for w in self.log if "compiled" in str(w.message)]
            assert not msgs, msgs
        return False


def test_gradients_and_jacfwd_same_compiled_or_eager_and_for_any_tile_size():
    """Reverse and forward mode through compiled tiles, eager tiles and one-pixel tiles agree (float64, 1e-10)."""
    p, s = _model(SMALL)
    cell = p.crystal.cell

    def image_sum(c, setup, fz):
        return nbtorch.simulate(p._replace(crystal=p.crystal._replace(cell=c)), setup, fused=fz).sum()

    g_eager = torch.func.grad(image_sum)(cell, s, False)
    g_comp = torch.func.grad(image_sum)(cell, s, True)
    g_tiny = torch.func.grad(image_sum)(cell, s.replace(sample_budget=100), False)
    j_eager = torch.func.jacfwd(image_sum)(cell, s, False)
    with _no_fallback():
        j_comp = torch.func.jacfwd(image_sum)(cell, s, True)
    if fused.compiler_available():
        assert ("moments", kernel_spec(p, s), torch.float64, "cpu", None) in aot._loaded, "compiled moments unused"
    for g in (g_comp, g_tiny, j_eager, j_comp):
        torch.testing.assert_close(g, g_eager, rtol=1e-10, atol=1e-10 * float(g_eager.abs().max()))
    assert float(g_eager.abs().max()) > 0


@pytest.mark.parametrize("extra", ["", "-curved_det"])
def test_compiled_backward_equals_eager(extra):
    """.backward() through compiled tiles = eager = plain autograd of the eager tile, float64 1e-10: by the transpose
    of the compiled derivative moments where they apply (no torch.compile), else through the tile compiled by
    AOTAutograd (the curved detector)."""
    p, s = _model(SMALL + " " + extra)
    spec = kernel_spec(p, s)
    fast = kernel.has_fast_derivatives(spec)
    assert fast == (extra == "")
    grads = []
    for fz in (False, True):
        q = _with_grad_cell(p)
        with _no_fallback():
            nbtorch.simulate(q, s, fused=fz).pow(2).sum().backward()
        grads.append(q.crystal.cell.grad)
    # under torch.func.grad the tiles see wrapped tensors and run plain autograd of the eager tile
    grads.append(torch.func.grad(lambda c: nbtorch.simulate(_with_cell(p, c), s, fused=False).pow(2).sum())(
        p.crystal.cell))
    for g in grads:
        assert float(g.abs().max()) > 0
        torch.testing.assert_close(g, grads[0], rtol=1e-10, atol=1e-10 * float(grads[0].abs().max()))
    if fused.compiler_available():
        assert (("grad", spec) in fused._compiled) != fast, "wrong backward kernel"
        assert (("orientation", spec, torch.float64, "cpu", None) in aot._loaded) == fast  # the cell alone: M


@pytest.mark.parametrize("args", DERIVATIVE_CASES)
def test_one_pass_reverse_mode_equals_autograd(args):
    """vjp_from_moments (the transpose of the one-pass forward mode) = torch.func.vjp of the tile for every leaf."""
    spec, tp, tc = _whole_image_tile(args)
    gen = torch.Generator().manual_seed(5)
    gS, gf = (torch.rand(tc.fast.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        got = kernel.vjp_from_moments(kernel.sample_moments(tp, tc, spec), tp, tc, spec, gS, gf)
    ref = torch.func.vjp(lambda q: kernel.tile_sums(q, tc, spec), tp)[1]((gS, gf))[0]
    for name, r in zip(kernel.TileParams._fields, ref):
        g, scale = got.get(name, torch.zeros_like(r)), float(r.abs().sum())  # (F is an empty table)
        assert name in got or scale == 0, name
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9 * scale, msg=name)
    assert float(got["A"].abs().max()) > 0
    with torch.no_grad():  # asked for some leaves only: the same values for those (no pass over the factor for A)
        for fields in (("A",), ("A", "close"), ("fdet",)):
            part = kernel.vjp_from_moments(kernel.sample_moments(tp, tc, spec), tp, tc, spec, gS, gf, fields)
            assert set(fields) <= set(part) and not (set(part) & {"pix0", "fdet", "sdet", "odet", "close"} - set(fields))
            for name in fields:
                torch.testing.assert_close(part[name], got[name], rtol=0, atol=0, msg=name)
        # the orientation moment alone (the kernel of reverse mode for crystal parameters): the same M and A gradient
        # to rounding (its Miller indices are written-out dot products, the moments' a matrix product)
        M = kernel.orientation_moments(tp, tc, spec)
        full = kernel.sample_moments(tp, tc, spec)[1]
        torch.testing.assert_close(M[0], full, rtol=1e-10, atol=1e-12 * float(full.abs().max()))
        only = kernel.vjp_from_moments(M, tp, tc, spec, gS, gf, kernel.ORIENTATION_FIELDS)
        assert set(only) == {"A"}
        torch.testing.assert_close(only["A"], got["A"], rtol=1e-10, atol=1e-12 * float(got["A"].abs().max()))


@pytest.mark.parametrize("with_distance", [False, True])
def test_jacfwd_takes_the_forward_value_from_the_moments(monkeypatch, with_distance):
    """Under jacfwd of plain parameters a compiled tile runs one pass (the derivative moments carry the value too):
    the forward tile is not run, and value and Jacobian (cell, and the detector distance, which moves the pixel
    factor too) equal the eager ones (float64, 1e-10)."""
    p, s = _model(SMALL)
    ran = []
    monkeypatch.setattr(fused, "forward", lambda *a: ran.append(1) or kernel.tile_sums(a[2], a[1], a[0]))
    x0 = torch.cat([p.crystal.cell, p.detector.distance[None]]) if with_distance else p.crystal.cell

    def image(x, fz):
        q = _with_cell(p, x[:6])
        if with_distance:
            q = q._replace(detector=q.detector._replace(distance=x[6]))
        out = nbtorch.simulate(q, s, fused=fz)
        return out, out

    with _no_fallback():
        j_comp, v_comp = torch.func.jacfwd(image, has_aux=True)(x0, True)
    assert not ran
    j_eager, v_eager = torch.func.jacfwd(image, has_aux=True)(x0, False)
    for a, b in ((j_comp, j_eager), (v_comp, v_eager)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    assert ran  # the eager path does run the forward tile
    assert float(j_eager[..., -1].abs().max()) > 0


def test_tiny_budget_chunks_orientations_and_sources_with_same_image_and_gradient():
    """A budget smaller than one pixel's samples splits orientations and sources; image and gradient unchanged."""
    p, s = _model(SMALL)
    tiny = s.replace(sample_budget=5)
    pl = plan(tiny, 4)
    assert pl.tile == 1 and (pl.o_chunk < s.n_domains or pl.k_chunk < s.n_sources)
    q, r = _with_grad_cell(p), _with_grad_cell(p)
    a = nbtorch.simulate(q, s, fused=False)
    b = nbtorch.simulate(r, tiny, fused=False)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12 * float(a.detach().max()))
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(r.crystal.cell.grad, q.crystal.cell.grad, rtol=1e-10, atol=0)


_MEMORY_PROBE = r"""
import json, resource, sys, torch, nbtorch
torch.set_num_threads(1)
args = "-default_F 100 -cell 60 70 80 90 95 90 -misset 3 4 5 -N 5 -pixel 0.1 -distance 60 -oversample 2 -detpixels "
peaks = []
for n in (int(sys.argv[1]), int(sys.argv[2])):
    p, s = nbtorch.from_nanobragg_args(args + str(n), dtype=torch.float64)
    s = s.replace(sample_budget=1 << 16)
    p = p._replace(crystal=p.crystal._replace(cell=p.crystal.cell.clone().requires_grad_()))
    nbtorch.simulate(p, s, fused=False).sum().backward()
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(peaks))
"""


def test_reverse_mode_peak_memory_does_not_grow_with_the_image():
    """sum().backward() of a 256² image after a 128² one (4× the pixels, same sample_budget): the peak RSS grows by
    little (≈20 MB here), where one tile for the whole image (what the peak would follow if graphs were kept)
    adds ≈120 MB."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, "128", "256"], capture_output=True, text=True,
                         check=True, timeout=300)
    small, large = json.loads(out.stdout.strip().splitlines()[-1])
    assert large - small < 40, (small, large)


def test_absurd_requests_are_refused_before_any_work():
    """Work beyond what a machine can do is refused at once (one line, exit 2) with the count and what to lower."""
    for flags in ("-mosaic 1 -mosaic_domains 100000000", "-mosaic 1 -mosaic_domains 2000 -phi 0 -osc 10 -phisteps 1000",
                  "-divergence 1 -divsteps 100000 -dispersion 1 -dispsteps 100000",
                  "-detpixels 4000 -divergence 1 -divsteps 300 -oversample 30"):
        proc = subprocess.run([sys.executable, "-m", "nbtorch", *(BASE + flags).split(), "-floatfile", "/dev/null"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (flags, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr and "lower" in proc.stderr, proc.stderr[-500:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-500:]


_BIG_PIXEL = r"""
import json, resource, torch, nbtorch
torch.set_num_threads(1)
p, s = nbtorch.from_nanobragg_args("-default_F 100 -cell 60 70 80 90 95 90 -N 5 -detpixels 2 -pixel 0.4 "
                                   "-distance 60 -oversample 64 -mosaic 1 -mosaic_domains 3000", dtype=torch.float64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
img = nbtorch.simulate(p, s, fused=False)
print(json.dumps([before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, float(img.sum())]))
"""


def test_a_pixel_with_more_samples_than_the_budget_is_split():
    """2×2 pixels × 64² sub-pixels × 3000 domains (12 M samples per pixel, 3× the default budget): the peak stays
    within a few hundred MB of the process's size before rendering."""
    out = subprocess.run([sys.executable, "-c", _BIG_PIXEL], capture_output=True, text=True, check=True, timeout=300)
    before, after, total = json.loads(out.stdout.strip().splitlines()[-1])
    assert total > 0
    assert after - before < 700, (before, after)


def test_undefined_output_gradients_skip_the_tile(monkeypatch):
    """A backward pass whose output gradient is undefined (gradcheck checks this on every call) recomputes no tile
    and gives zero or no gradient; a defined one does."""
    p, s = _model(BASE + "-oversample 2")
    calls = []
    real = fused.vjp
    monkeypatch.setattr(fused, "vjp", lambda *a, **k: calls.append(1) or real(*a, **k))
    cell = p.crystal.cell.clone().requires_grad_()
    out = nbtorch.simulate(_with_cell(p, cell), s, fused=False).sum()
    (g,) = torch.autograd.grad(torch._C._functions.UndefinedGrad()(out), cell, allow_unused=True)
    assert not calls and (g is None or not g.any())
    (g,) = torch.autograd.grad(nbtorch.simulate(_with_cell(p, cell), s, fused=False).sum(), cell)
    assert calls and g.abs().max() > 0
