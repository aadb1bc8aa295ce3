"""What the bench scripts share: timing. (Output poisoning for the GPU checks is in
mmfuse.kernels.testing, beside the kernels it checks.)"""
from __future__ import annotations

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
