import os
import sys

import torch

# make `tests.golden` importable however pytest is invoked
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# two threads (CI's machine has 2 cores) unless OMP_NUM_THREADS asks for another count (e.g. 1, to check tolerances)
_threads = os.environ.get("OMP_NUM_THREADS", "").strip()
torch.set_num_threads(int(_threads) if _threads.isdigit() and int(_threads) > 0 else max(1, min(2, os.cpu_count() or 1)))
# jobs that choose compiled kernels by themselves build a missing one first, as before background builders
# (tests/nbtorch/test_background_build.py checks those): no builder processes outlive or slow the suite
os.environ.setdefault("NBTORCH_BUILD", "wait")
