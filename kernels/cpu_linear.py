"""Linear layers on the CPU: a numba GEMV for 1-4 rows, oneDNN with pre-packed weights above.

At batch 1 a decode step is a matrix-vector product per weight, so its speed is the rate at which
the weights stream from memory. MKL's fp32 GEMV reaches about 11 GB/s on our 2-core box; the numba
kernel (gemv.py) splits the output rows over the cores, reads each weight row once and reaches 23-30 GB/s
(the measured stream bandwidth) for 1-3 rows.

With more rows (a batch of decodes, a prompt, an image of 50 patches) MKL's GEMM through
`F.linear` repacks the weight into its blocked layout on every call, and with weights that do not
stay in cache that repacking streams at a few GB/s: 50 rows through the linears of a ViT-B/32 run
at 82 GFLOP/s against 130 when the same weights are cache-hot. So weights that inference code has
marked with `freeze` are packed once into oneDNN's blocked layout (`torch.ops.mkldnn`, what
inductor's weight freezing uses) on first use and kept until they change. Packing is opt-in, as
with inductor's freezing and IPEX's `optimize`: a write that bypasses the version counter would
otherwise leave a stale copy. Measured on that box with cold weights, 2 threads, fp32: 8 rows
1.2x, 17 rows 2.2x, 50 rows 1.9x, 128 rows 1.6x, 1600 rows 1.6x over `F.linear`; bf16 1.6x at
1 row, 1.3x at 50. The cost is memory: a packed copy beside each weight used this way.
The MLP's activation runs as a oneDNN post-op on the GEMM's output while it is in cache (a separate
quick_gelu costs three passes over a (1600, 3072) tensor: 13 ms beside a 42 ms GEMM).
`MMFUSE_CPU_GEMV=0` / `MMFUSE_CPU_PACKED=0` turn either path off (read at each call, mmfuse.envs).
The registry of frozen weights and their copies is frozen_weights.py; the activations, activations.py.

Gradients, CUDA tensors, other dtypes, tracing and compiling go to `torch.nn.functional.linear`,
which is also the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmfuse import envs

from .activations import QUICK_GELU_SCALE, activation
from .frozen_weights import FrozenWeights
from .gemv import gemv

GEMV_MAX_ROWS = 4  # up to here the numba GEMV beats packed oneDNN (0.85x at 1 row, parity at 4)
GEMV_UNPACKED_MAX_ROWS = 16  # weights that are not frozen: up to here the GEMV beats MKL's GEMM
CAN_PACK = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
# oneDNN packs bf16 weights only on CPUs with AVX-512 (bw/vl/dq) or AVX-NE-CONVERT; elsewhere bf16 takes F.linear.
CAN_PACK_BF16 = CAN_PACK and torch.ops.mkldnn._is_mkldnn_bf16_supported()
FROZEN = FrozenWeights()  # the weights `freeze` marked, and their packed copies

# oneDNN post-ops that give our activations exactly: (attr, scalars, algorithm). quick_gelu(h) is
# silu(1.702 h) / 1.702, so it runs as swish on a weight and bias scaled by 1.702.
_POST_OPS = {None: ("none", [], ""), "gelu": ("gelu", [], "none"), "gelu_tanh": ("gelu", [], "tanh"),
             "silu": ("swish", [], ""), "relu": ("relu", [], ""), "quick_gelu": ("swish", [], "")}
_PRE_SCALE = {"quick_gelu": QUICK_GELU_SCALE}


def packs(dtype: torch.dtype) -> bool:
    """Whether `linear` runs frozen weights of `dtype` from packed copies (MMFUSE_CPU_PACKED and
    what oneDNN supports on this CPU)."""
    can = {torch.float32: CAN_PACK, torch.bfloat16: CAN_PACK_BF16}.get(dtype, False)
    return can and envs.read("MMFUSE_CPU_PACKED")  # read(): the attribute's module __getattr__ costs more


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     act: Optional[str] = None) -> torch.Tensor:
    return activation(act, F.linear(x, weight, bias))


def freeze(module: torch.nn.Module, refresh: bool = False) -> torch.nn.Module:
    """Mark `module`'s weights (its parameters of 2+ dims) as inference constants, so `linear` may
    keep a oneDNN-packed copy of each. The engine's inference objects (`DecodeState`, `Encoder`) do
    this; nothing else is packed. Freezing again keeps the packed copies; after a write that
    bypasses the version counter (`.data`, fused optimizers) call it with `refresh=True` (see
    frozen_weights.py for the contract)."""
    FROZEN.add(module, refresh)
    return module


def unfreeze(module: torch.nn.Module) -> torch.nn.Module:
    """Drop the packed copies of `module`'s weights; `linear` goes back to `F.linear` for them."""
    FROZEN.remove(module)
    return module


def packed_weight(weight: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    """The oneDNN-packed `scale * weight` (N, K) of a frozen weight or a view of one, else None."""
    return FROZEN.packed(weight, scale, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, 64))


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], act: Optional[str]) -> torch.Tensor:
    out = gemv(x.reshape(-1, x.shape[-1]), weight)  # (n, N)
    if bias is not None:
        out += bias
    return activation(act, out.view(*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           act: Optional[str] = None) -> torch.Tensor:
    """`activation(act, F.linear(x, weight, bias))` for inference on the CPU. x (..., K), weight (N, K),
    bias (N,) -> (..., N).

    fp32 with 1-4 rows: the numba GEMV; fp32/bf16 with more rows (bf16 from 1 row) and a frozen
    weight (`freeze`): oneDNN with the weight packed once and the activation fused as a post-op;
    fp32 with up to 16 rows and a weight that is not frozen: the GEMV; anything else, or anything
    that needs gradients: `F.linear`."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exports and graphs record a plain linear
        return linear_reference(x, weight, bias, act)
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16)
            or rows == 0 or weight.is_inference() or (torch.is_grad_enabled() and (
                x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)))):
        return linear_reference(x, weight, bias, act)
    gemv = (rows <= GEMV_UNPACKED_MAX_ROWS and x.dtype == torch.float32 and weight.is_contiguous()
            and envs.read("MMFUSE_CPU_GEMV"))
    if gemv and rows <= GEMV_MAX_ROWS:
        return _gemv(x, weight, bias, act)
    if act in _POST_OPS and (bias is None or bias.dtype == x.dtype) and packs(x.dtype):
        scale = _PRE_SCALE.get(act, 1.0)
        packed = packed_weight(weight, scale)
        if packed is not None:
            if scale != 1.0 and bias is not None:
                bias = bias * scale
            out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, *_POST_OPS[act])
            return out if scale == 1.0 else out.mul_(1.0 / scale)
    if gemv:
        return _gemv(x, weight, bias, act)
    return linear_reference(x, weight, bias, act)
