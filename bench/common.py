"""What the bench scripts share: timing, and a switch for mmfuse's fused CPU decode step. (Output poisoning for the GPU checks is in
mmfuse.kernels.testing, beside the kernels it checks.)"""
from __future__ import annotations

import contextlib
import os
import statistics
import time


def median_seconds(run, repeats: int, sync=lambda: None) -> float:
    """Median wall time of `repeats` calls of run() after one warm-up call (which also autotunes
    Triton kernels); `sync` (e.g. torch.cuda.synchronize) runs before each clock read."""
    run()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict:
    """{name: median seconds per call}, one call of each per round."""
    for fn in fns.values():
        fn()  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def unfused():
    """mmfuse's per-op PyTorch decode path (MMFUSE_FUSED_DECODE=0: the fused step switched off) inside the block."""
    old = os.environ.get("MMFUSE_FUSED_DECODE")
    os.environ["MMFUSE_FUSED_DECODE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MMFUSE_FUSED_DECODE"]
        else:
            os.environ["MMFUSE_FUSED_DECODE"] = old
