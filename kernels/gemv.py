"""The CPU GEMV for 1-16 input rows: fp32 weights (cpu_linear) and int8 / int4 weights (quant_cpu).

A decode step at small batch is a matrix-vector product per weight, so its speed is the rate at
which the weights stream from memory (or, for int4 on AVX2, are unpacked). One kernel serves the
three weight formats: the output rows are split over the cores; each weight row is read once,
converted to fp32 in registers and multiplied with every input row. Four input rows share each
weight element loaded (four accumulators in registers); the input is zero-padded so its row count
is a multiple of four or one more than that (2 -> 4, 3 -> 4, 5 stays 4 + 1), and that last row runs
alone. Padding 2 or 3 rows costs no more than running them one by one (each weight element is
loaded and converted once either way); padding a single row would cost up to 2x.

Quantized weights (layout in quant_cpu.py) apply each group's scale and zero point once per group:
    y[r, j] = sum_t s[j, t] * (sum_{i in group t} q[j, i] * x[r, i] - z[j, t] * sum_{i in group t} x[r, i])
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

ROW_BLOCK = 4  # input rows that share each weight element loaded (dot4's accumulators in gemv_numba.py)
FLOAT = 32     # `bits` of fp32 weights
_NONE = np.empty((0, 0), dtype=np.uint8)  # no scales / zero points


def padded_rows(n: int) -> int:
    """The rows the kernel runs for n input rows: n rounded up to a multiple of ROW_BLOCK, or to one
    more than a multiple (the row that then runs alone)."""
    return n + (ROW_BLOCK - n % ROW_BLOCK if n % ROW_BLOCK > 1 else 0)


def gemv(x: torch.Tensor, weight: torch.Tensor, bits: int = FLOAT, scales: Optional[torch.Tensor] = None,
         zeros: Optional[torch.Tensor] = None, zero_default: float = 0.0, group_size: int = 0) -> torch.Tensor:
    """x (n, Kp) -> x @ W.T (n, N) fp32, with W the fp32 weight (N, Kp) (bits=32) or the quantized
    one: q, scales (N, G), zeros (N, G) or None (then `zero_default`), groups of `group_size`."""
    n = x.shape[0]
    extra = padded_rows(n) - n
    flat = (F.pad(x, (0, 0, 0, extra)) if extra else x).contiguous()  # (n + extra, Kp)
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    _kernel()(weight.detach().numpy(), _NONE if scales is None else scales.numpy(),
              _NONE if zeros is None else zeros.numpy(), zero_default, flat.detach().numpy(), out.numpy(),
              group_size or flat.shape[1], bits)
    return out[:n] if extra else out


@functools.lru_cache(maxsize=None)
def _kernel():
    """gemv_numba.gemv_rows, imported (and compiled, or read from numba's disk cache) on first use."""
    from .gemv_numba import gemv_rows

    return gemv_rows
