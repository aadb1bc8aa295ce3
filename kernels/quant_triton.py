"""Triton w8a16 / w4a16 linear: int8 or int4 weights (the layout of `quant_cpu`), fp16/bf16/fp32
activations, fp32 accumulation. One kernel for decode and prefill: a program computes a
(BLOCK_M rows, BLOCK_N outputs) tile, walking K in BLOCK_K steps; each step gathers the packed
weights of its (BLOCK_K, BLOCK_N) tile, dequantizes them with the scale / zero of each element's
group and multiplies with `tl.dot`. Plain pointer arithmetic and masks (no block pointers), so
one source runs on Triton 3.6 and 3.9 and under TRITON_INTERPRET=1.

Reference: `quant_cpu.quant_linear_reference` (dequantize, then matmul).
"""
from __future__ import annotations

from typing import Optional

import torch

from .activations import activation
from .quant_cpu import quant_linear_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves CUDA tensors too
    triton = None


if triton is not None:
    @triton.jit
    def _wq_linear_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, G, q_stride,
                          BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        rk = tl.arange(0, BLOCK_K)  # (BK,)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        zero_const = 8.0 if BITS == 4 else 0.0
        for k0 in range(0, K, BLOCK_K):
            k = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
            t = k // GROUP  # (BK,) group of each column
            wmask = (k[:, None] < K) & (rn[None, :] < N)
            if BITS == 8:
                v = tl.load(q_ptr + rn[None, :] * q_stride + k[:, None], mask=wmask, other=0).to(tl.float32)
            else:
                c = k % GROUP
                byte = t * (GROUP // 2) + c % (GROUP // 2)
                shift = (c // (GROUP // 2)) * 4
                raw = tl.load(q_ptr + rn[None, :] * q_stride + byte[:, None], mask=wmask, other=0).to(tl.int32)
                v = ((raw >> shift[:, None]) & 15).to(tl.float32)
            s = tl.load(s_ptr + rn[None, :] * G + t[:, None], mask=wmask, other=0.0)
            if HAS_Z:
                z = tl.load(z_ptr + rn[None, :] * G + t[:, None], mask=wmask, other=0).to(tl.float32)
            else:
                z = zero_const
            w = (v - z) * s  # (BK, BN) fp32
            acc += tl.dot(x, w.to(x.dtype))
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def quant_linear_triton(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                        bits: int, group_size: int, bias: Optional[torch.Tensor] = None,
                        act: Optional[str] = None) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1): x (..., K) -> (..., N) in x's dtype."""
    K = x.shape[-1]
    N, G = scales.shape
    flat = x.reshape(-1, K).contiguous()
    M = flat.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    BM = min(64, max(16, _next_pow2(M)))
    BN, BK = 64, 32
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _wq_linear_kernel[grid](flat, q, scales, zeros if zeros is not None else scales,
                            bias if bias is not None else scales, out, M, N, K, G, q.stride(0),
                            BITS=bits, GROUP=group_size, HAS_Z=zeros is not None, HAS_BIAS=bias is not None,
                            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return activation(act, out).to(x.dtype).view(*x.shape[:-1], N)


def quant_linear_cuda(x, q, scales, zeros, bits, group_size, bias=None, act=None) -> torch.Tensor:
    """CUDA tensors: the Triton kernel when Triton is installed, else the reference."""
    if triton is None or (torch.is_grad_enabled() and x.requires_grad):
        return quant_linear_reference(x, q, scales, zeros, bits, group_size, bias, act)
    return quant_linear_triton(x, q, scales, zeros, bits, group_size, bias, act)
