"""The CPU GEMV for 1-16 input rows: fp32 weights (cpu_linear) and int8 / int4 weights (quant_cpu).

A decode step at small batch is a matrix-vector product per weight, so its speed is the rate at
which the weights stream from memory (or, for int4 on AVX2, are unpacked). One kernel serves the
three weight formats: the output rows are split over the cores; each weight row is read once,
converted to fp32 in registers and multiplied with every input row. Four input rows share each
weight element loaded (four accumulators in registers); the rows after the last block of four run
one at a time while the weight row is in L1. Zero-padding them to a block of four instead costs
more at 1 or 2 rows; at 3 rows it may help int4, whose unpacking it does once instead of three
times (bench/bench_gemv.py measures both ways).

Quantized weights (layout in quant_cpu.py) apply each group's scale and zero point once per group:
    y[r, j] = sum_t s[j, t] * (sum_{i in group t} q[j, i] * x[r, i] - z[j, t] * sum_{i in group t} x[r, i])
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

FLOAT = 32     # `bits` of fp32 weights
_NONE = np.empty((0, 0), dtype=np.uint8)  # no scales / zero points


def gemv(x: torch.Tensor, weight: torch.Tensor, bits: int = FLOAT, scales: Optional[torch.Tensor] = None,
         zeros: Optional[torch.Tensor] = None, zero_default: float = 0.0, group_size: int = 0) -> torch.Tensor:
    """x (n, Kp) -> x @ W.T (n, N) fp32, with W the fp32 weight (N, Kp) (bits=32) or the quantized
    one: q, scales (N, G), zeros (N, G) or None (then `zero_default`), groups of `group_size`."""
    flat = x.contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    _kernel()(weight.detach().numpy(), _NONE if scales is None else scales.numpy(),
              _NONE if zeros is None else zeros.numpy(), zero_default, flat.detach().numpy(), out.numpy(),
              group_size or flat.shape[1], bits)
    return out


@functools.lru_cache(maxsize=None)
def _kernel():
    """gemv_numba.gemv_rows, imported (and compiled, or read from numba's disk cache) on first use."""
    from .gemv_numba import gemv_rows

    return gemv_rows
