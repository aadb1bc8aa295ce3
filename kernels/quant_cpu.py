"""Weight-only quantized linear layers on the CPU: fused dequantize-and-multiply for 1-16 rows.

Batch-1 decoding streams every weight once per token, so int8 weights (1 byte) and int4 weights
(half a byte) cut the bytes read 4x and 8x against fp32. The numba GEMV (gemv.py) reads the packed
weights once, converts them to fp32 in registers and multiplies; the scale (and zero point) of each
group is applied once per group, not per element:

    y[r, j] = sum_t s[j, t] * (sum_{i in group t} q[j, i] * x[r, i] - z[j, t] * sum_{i in group t} x[r, i])

so the inner loop is convert + FMA (AVX2: 8 lanes). More rows (prefill, big batches) dequantize
blocks of output rows into fp32 and use the float GEMM, whose cost is then the FLOPs.

Weight layout (`engine/quant/` builds it; `dequantize` is its definition):
- int8: q (N, Kp) int8, the signed value; zeros (N, G) int16 or None (symmetric: 0).
- int4: q (N, Kp // 2) uint8; in group t the byte b holds column t*g + b in its low nibble and
  column t*g + g/2 + b in its high nibble (two contiguous halves, so the kernel reads x
  contiguously); values 0..15; zeros (N, G) uint8 or None (symmetric: 8).
- scales (N, G) fp32; g the group size (int8 per output channel: g = K), Kp = G * g >= K; the
  padded columns hold the zero point, so they dequantize to 0 (and x is zero-padded anyway).

The plain PyTorch reference is `dequantize` then `F.linear`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from mmfuse import envs

from .activations import activation
from .gemv import gemv

FUSED_MAX_ROWS = 16  # up to here the fused kernel; above, dequantized blocks through the float GEMM
DEQUANT_BLOCK = 1024  # output rows dequantized at a time on the GEMM path (4 MiB of fp32 at K = 1024)


def unpack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, Kp // 2) packed nibbles -> (N, Kp) uint8 values in column order."""
    N, half = q.shape
    g = q.view(N, half // (group_size // 2), group_size // 2)
    return torch.cat([g & 15, g >> 4], dim=2).reshape(N, 2 * half)


def pack_int4(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, Kp) values 0..15 -> (N, Kp // 2) bytes in the layout above."""
    N, Kp = v.shape
    g = v.to(torch.uint8).view(N, Kp // group_size, 2, group_size // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(N, Kp // 2)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
               group_size: int, k: int, dtype=torch.float32) -> torch.Tensor:
    """The float weight (N, k) the quantized tensors stand for: (q - zero) * scale per group."""
    v = (unpack_int4(q, group_size) if bits == 4 else q).to(torch.float32)  # (N, Kp)
    N, Kp = v.shape
    z = zeros.to(torch.float32) if zeros is not None else torch.full_like(scales, 8.0 if bits == 4 else 0.0)
    w = (v.view(N, -1, group_size) - z[:, :, None]) * scales[:, :, None].to(torch.float32)
    return w.reshape(N, Kp)[:, :k].to(dtype)


def quant_linear_reference(x: torch.Tensor, q, scales, zeros, bits: int, group_size: int,
                           bias: Optional[torch.Tensor] = None, act: Optional[str] = None) -> torch.Tensor:
    """Dequantize, then the float linear: what every kernel here must equal."""
    w = dequantize(q, scales, zeros, bits, group_size, x.shape[-1], dtype=x.dtype if x.is_floating_point() else None)
    return activation(act, F.linear(x, w, None if bias is None else bias.to(w.dtype)))


@functools.lru_cache(maxsize=None)
def _dequant_kernel():
    """Compile on first use (cached on disk), so importing mmfuse does not import numba."""
    import numba
    import numpy as np

    u = np.uint64  # unsigned indices: numba then skips the negative-index wraparound that blocks vectorizing

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def dequant(q, s, z, zc, bits, g, out):  # out (M, Kp) fp32 = deq(q rows (M, .))
        m, kp = out.shape
        ng, h = kp // g, g // 2
        has_z = z.shape[0] > 0
        zc = np.float32(zc)
        for j in numba.prange(m):
            for t in range(ng):
                zt = np.float32(z[j, t]) if has_z else zc
                st = s[j, t]
                if bits == 8:
                    for i in range(g):
                        k = u(t * g + i)
                        out[j, k] = (np.float32(q[j, k]) - zt) * st
                else:
                    for i in range(h):
                        v = q[j, u(t * h + i)]
                        out[j, u(t * g + i)] = (np.float32(v & np.uint8(15)) - zt) * st
                        out[j, u(t * g + h + i)] = (np.float32(v >> np.uint8(4)) - zt) * st

    return dequant


_NO_ZEROS = torch.empty(0, 0, dtype=torch.uint8)


def quant_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
                 group_size: int, bias: Optional[torch.Tensor] = None, act: Optional[str] = None) -> torch.Tensor:
    """`quant_linear_reference` on the CPU: x (..., K) float, weight as described above -> (..., N) in x's dtype.

    1-16 rows: the fused kernel; more: dequantized blocks through the float GEMM. Gradients,
    other devices and tracing take the reference."""
    if (x.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and x.requires_grad) or x.numel() == 0):
        return quant_linear_reference(x, q, scales, zeros, bits, group_size, bias, act)
    K = x.shape[-1]
    N, Kp = q.shape[0], scales.shape[1] * group_size
    flat = x.reshape(-1, K).to(torch.float32)  # (n, K)
    if Kp != K:
        flat = F.pad(flat, (0, Kp - K))
    flat = flat.contiguous()
    n = flat.shape[0]
    zc = 8.0 if bits == 4 else 0.0
    if n <= FUSED_MAX_ROWS and envs.read("MMFUSE_QUANT_FUSED"):
        out = gemv(flat, q, bits, scales, zeros, zc, group_size)
    else:
        z = (zeros if zeros is not None else _NO_ZEROS).numpy()
        out = torch.empty(n, N, dtype=torch.float32)
        step = max(1, min(N, DEQUANT_BLOCK * 1024 // max(Kp, 1)))
        buf = torch.empty(step, Kp, dtype=torch.float32)
        for j0 in range(0, N, step):
            j1 = min(N, j0 + step)
            blk = buf[: j1 - j0]
            _dequant_kernel()(q[j0:j1].numpy(), scales[j0:j1].numpy(), z[j0:j1] if z.shape[0] else z, zc, bits, group_size,
                blk.numpy())
            out[:, j0:j1] = flat @ blk.t()
    if bias is not None:
        out += bias
    out = activation(act, out).view(*x.shape[:-1], N)
    return out if x.dtype == torch.float32 else out.to(x.dtype)
