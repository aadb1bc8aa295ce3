"""Weights in 4 KiB pages vs in the huge-page arena (engine/nn/weight_arena.py): how fast they stream.

    python bench/bench_huge_pages.py [--mb 512] [--k 576] [--repeats 9]

One fp32 matrix the size of a small model's weights, read by `torch.mv` (MKL's GEMV on torch's
threads) where the allocator put it and again after `relocate` moved it into the arena, alternating;
GB/s of weights read, medians. `bench_quant.py` with `MMFUSE_HUGE_PAGES=0` / `1` gives the same A/B
for whole decode steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmfuse.nn.weight_arena import relocate


def huge_kb(t: torch.Tensor) -> int:
    """AnonHugePages (kB) of the mapping that holds t (Linux), -1 where it cannot be read."""
    addr = t.data_ptr()
    try:
        inside = False
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="matrix size in MB")
    ap.add_argument("--k", type=int, default=576, help="row length (SmolLM2-135M's width by default)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    k = args.k
    n = args.mb * 10**6 // (4 * k)
    plain = torch.nn.Linear(k, n, bias=False).requires_grad_(False)  # torch's allocator (4 KiB pages)
    arena = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
    arena.weight.copy_(plain.weight)
    relocate(arena)
    x = torch.randn(k)
    runs = {"4 KiB pages": plain.weight, "huge-page arena": arena.weight}
    times = {name: [] for name in runs}
    for w in runs.values():
        torch.mv(w, x)  # warm-up
    for _ in range(args.repeats):
        for name, w in runs.items():
            t = time.perf_counter()
            torch.mv(w, x)
            times[name].append(time.perf_counter() - t)
    print(f"torch.mv, {n} x {k} fp32 ({n * k * 4 / 1e6:.0f} MB), {torch.get_num_threads()} threads, "
          f"median of {args.repeats} alternating rounds")
    print("| weights | GB/s | AnonHugePages of the mapping |")
    print("|---|---|---|")
    for name, w in runs.items():
        print(f"| {name} | {n * k * 4 / statistics.median(times[name]) / 1e9:.1f} | {huge_kb(w)} kB |")


if __name__ == "__main__":
    main()
