"""Linear layers for CPU decoding: a bandwidth-bound GEMV for up to 16 rows, in numba.

At batch 1 a decode step is a matrix-vector product per weight, so its speed is the rate at which
the weights stream from memory. MKL's fp32 GEMV reaches about 11 GB/s on our 2-core box; this
kernel splits the output rows over the cores, reads each weight row once and reaches about
27-30 GB/s (the measured stream bandwidth) for 1-3 rows, and beats MKL's small GEMMs up to 16 rows
(GPT-2-124M weights, 2 threads: 5 rows 32 vs 77 ms, 8 rows 45 vs 69 ms, 16 rows 66 vs 100 ms).
Larger inputs, other dtypes, gradients and CUDA tensors go to `torch.nn.functional.linear`,
which is also the reference.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # decode batches and k+1-token verification; beyond this MKL's GEMM is the better tool
_ENABLED = os.environ.get("MMFUSE_CPU_GEMV", "1") != "0"


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


@functools.lru_cache(maxsize=None)
def _kernel():
    """Compile on first use (cached on disk), so importing mmfuse does not import numba."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gemv_rows(w, x, out):  # out (n, N) = x (n, K) @ w (N, K).T, w streamed once
        n_out, k = w.shape
        n = x.shape[0]
        blocks = 32  # a few blocks per core keeps the cores evenly loaded
        for b in numba.prange(blocks):
            for j in range(b * n_out // blocks, (b + 1) * n_out // blocks):
                r = 0
                while n - r >= 4:  # four input rows share each weight element loaded
                    a0 = np.float32(0.0)
                    a1 = np.float32(0.0)
                    a2 = np.float32(0.0)
                    a3 = np.float32(0.0)
                    for i in range(k):
                        wi = w[j, i]
                        a0 += wi * x[r, i]
                        a1 += wi * x[r + 1, i]
                        a2 += wi * x[r + 2, i]
                        a3 += wi * x[r + 3, i]
                    out[r, j] = a0
                    out[r + 1, j] = a1
                    out[r + 2, j] = a2
                    out[r + 3, j] = a3
                    r += 4
                while r < n:  # the weight row is still in L1 for the remaining rows
                    acc = np.float32(0.0)
                    for i in range(k):
                        acc += w[j, i] * x[r, i]
                    out[r, j] = acc
                    r += 1

    return gemv_rows


def _usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS and x.numel() > 0)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`F.linear` with the numba GEMV for 1-16 fp32 rows on the CPU. x (..., K), weight (N, K) -> (..., N)."""
    if not _usable(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # (n, K)
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    _kernel()(weight.detach().numpy(), rows.detach().numpy(), out.numpy())
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])
