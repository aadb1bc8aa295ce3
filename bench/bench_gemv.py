"""The CPU GEMV (kernels/gemv.py) at 1-8 input rows: fp32, int8 and int4 weights, each row count run
as gemv runs it (the rows after the last block of four one at a time) and zero-padded to a multiple
of four rows, interleaved call by call.

    python bench/bench_gemv.py [--n 3072] [--k 768] [--rounds 7] [--threads 1]

Per round the minimum of 20 calls; the table gives the median over rounds (microseconds).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mmfuse.kernels.gemv import FLOAT, gemv


def padded(x, w, bits, s, z, zc, g):
    """gemv with x zero-padded to a multiple of four rows (no rows run singly)."""
    n = x.shape[0]
    return gemv(F.pad(x, (0, 0, 0, -n % 4)), w, bits, s, z, zc, g)[:n]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3072, help="output features")
    ap.add_argument("--k", type=int, default=768, help="input features")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    N, K = args.n, args.k
    torch.manual_seed(0)
    weights = {"fp32": (torch.randn(N, K), FLOAT, None, 0.0, 0),
               "int8": (torch.randint(-127, 128, (N, K), dtype=torch.int8), 8, torch.rand(N, 1), 0.0, K),
               "int4-g128": (torch.randint(0, 256, (N, K // 2), dtype=torch.uint8), 4, torch.rand(N, K // 128), 8.0, 128)}
    times = {}
    for _ in range(args.rounds):
        for rows in range(1, 9):
            x = torch.randn(rows, K)
            for name, (w, bits, s, zc, g) in weights.items():
                calls = (lambda: gemv(x, w, bits, s, None, zc, g), lambda: padded(x, w, bits, s, None, zc, g))
                best = [float("inf"), float("inf")]
                for f in calls:
                    f()
                for _ in range(20):
                    for i, f in enumerate(calls):
                        t = time.perf_counter()
                        f()
                        best[i] = min(best[i], time.perf_counter() - t)
                times.setdefault((name, rows), []).append(best)
    print(f"{args.threads} thread(s), weight ({N}, {K}); median over {args.rounds} rounds of the best of 20 calls, us")
    print("| weight | rows | gemv us | padded to 4k rows us | gemv / padded |")
    print("|---|---|---|---|---|")
    for (name, rows), v in times.items():
        a, b = (statistics.median(t[i] for t in v) * 1e6 for i in (0, 1))
        print(f"| {name} | {rows} | {a:.0f} | {b:.0f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
