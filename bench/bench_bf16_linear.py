"""The fused decode step's two bf16 linear kernels on one layer, one thread: AVX-512 BF16 dot
products (vdpbf16ps) against bf16 -> fp32 conversion in registers + FMA (the kernel of CPUs without
AVX-512 BF16), at 1-16 rows; `torch.mv` on an fp32 matrix of the same shape as a bandwidth yardstick.

    OMP_NUM_THREADS=1 python bench/bench_bf16_linear.py [--shapes 1536x576 49152x576] [--rows 1 2 4 8 16]

A layer's weights are read from memory once per call at 1 row (GB/s of weight bytes is the figure),
from cache at more rows once the layer fits (the instruction count then matters).
"""
from __future__ import annotations

import argparse

import torch

from mmfuse import _decode

from common import interleaved, median_seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["1536x576", "576x1536", "49152x576"], help="NxK (out x in)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args(argv)
    print(f"AVX-512 BF16: {_decode.has_bf16()}, {torch.get_num_threads()} torch threads (the kernels: 1)")
    print("| N x K | rows | vdpbf16ps us | convert+FMA us | convert / vdpbf16ps | vdpbf16ps GB/s of weights |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k).to(torch.bfloat16)
        spec = (16, w.data_ptr(), 0, 0, 0, n, k, 0, 0)
        for rows in args.rows:
            x = torch.randn(rows, k)
            y = torch.empty(rows, n)
            t = interleaved({dots: (lambda d=dots: _decode.linear(spec, x.data_ptr(), k, rows, y.data_ptr(), d))
                             for dots in (True, False)}, args.repeats)
            print(f"| {n} x {k} | {rows} | {t[True] * 1e6:.0f} | {t[False] * 1e6:.0f} | {t[False] / t[True]:.2f} | "
                  f"{w.numel() * 2 / t[True] / 1e9:.1f} |", flush=True)
        wf = w.float()
        xv = torch.randn(k)
        tm = median_seconds(lambda: torch.mv(wf, xv), args.repeats)
        print(f"| {n} x {k} fp32 torch.mv | 1 | {tm * 1e6:.0f} | | | {wf.numel() * 4 / tm / 1e9:.1f} (fp32 bytes) |")


if __name__ == "__main__":
    main()
