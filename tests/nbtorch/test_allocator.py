"""The allocator settings of the command-line programs (nbtorch.allocator): freed tensor memory is reused without
page faults; the user's own glibc settings are left alone."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from nbtorch import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

PAGE_FAULTS = r"""
import resource, sys, torch
from nbtorch.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.ones(1 << 20, dtype=torch.float64)  # 8 MB

def work():  # what an eager tile does: several few-MB tensors alive at once, then freed
    ys = [x * float(i) for i in range(6)]
    del ys

work()
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    work()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""
#: Pages that one ``work()`` of PAGE_FAULTS writes: what it faults on when its tensors get fresh pages.
FRESH = 6 * (8 << 20) // resource.getpagesize()


def _faults(mode: str):
    """(what keep_freed_memory returned, the page faults of each of 10 calls of ``work`` after a first one)."""
    out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], [int(v) for v in out[1:]]


def test_freed_tensor_memory_is_reused_without_page_faults():
    """Without the settings the first call after the first one always faults on all its pages (later ones too, or —
    when glibc raised its own threshold by then — on none); with them the calls reuse the freed blocks: none, or now
    and then one tensor's pages where the heap grew past a small block left at its top."""
    applied, kept = _faults("keep")
    _, plain = _faults("plain")
    if plain[0] < FRESH / 2:
        pytest.skip(f"this C library does not hand freed blocks back to the system here ({plain[0]} page faults)")
    assert applied == "True"
    assert max(kept) <= FRESH / 3 and sum(kept) <= FRESH * len(kept) / 4, kept  # plain's first: ≈ FRESH


def test_the_users_own_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False


def test_the_programs_apply_the_settings(monkeypatch):
    """nbtorch's and refine's command-line entry points set up the process (allocator, collector) before their
    work."""
    import nbtorch.cli
    import refine.cli.checks

    calls = []
    monkeypatch.setattr(nbtorch.cli, "set_up_program", lambda: calls.append("nbtorch"))
    monkeypatch.setattr(refine.cli.checks, "set_up_program", lambda: calls.append("refine"))
    assert nbtorch.cli.main(["-help"]) == 0
    assert refine.cli.checks.run("prog", lambda: 0, str) == 0
    assert calls == ["nbtorch", "refine"]


FREEZE = r"""
import gc, sys
import nbtorch.cli
assert gc.get_freeze_count() == 0
first = nbtorch.allocator.freeze_imported_objects()
frozen = gc.get_freeze_count()
cycle = []
cycle.append(cycle)  # garbage made after the freeze is still collected
del cycle
print(first, frozen, nbtorch.allocator.freeze_imported_objects(), gc.get_freeze_count() == frozen, gc.collect() >= 1)
"""


def test_a_program_freezes_the_objects_of_its_imports_once():
    """freeze_imported_objects moves the ≈ 10⁶ objects of torch's import out of the collector's way, once per
    process; garbage made later is still collected."""
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True" and int(out[1]) > 100_000
    assert out[2:] == ["False", "True", "True"]
