"""The engine's single attention entry point: `attention()` picks a backend and calls it.

Every model in mmfuse calls `attention()`. It covers prefill, chunked prefill, decode against a
static KV cache, multi-token verification, padded encoder batches and grouped-query attention with
one set of semantics, written down (with the argument checks and the references) in
attention_semantics.py.

Backends: "auto" (Triton kernels on CUDA fp16/bf16 where supported, torch SDPA otherwise), "sdpa"
(attention_sdpa.py), "reference" (the plain PyTorch code, for debugging) and "triton" (the Triton
kernels for every device and dtype they support, CPU tensors included under TRITON_INTERPRET=1;
for tests). Select with `set_backend()` or the environment variable MMFUSE_ATTENTION (read at each
call until `set_backend` is used). The kernels are flash_prefill.py (Tq > 16) and flash_decode.py
(split-KV, Tq <= 16); inputs they do not support (gradients needed, head dim > 256, mixed dtypes,
empty tensors) go to SDPA, never to a wrong result. While tracing or compiling (ONNX export) every
backend records one masked SDPA, whose shapes stay symbolic (the CPU SDPA path reads lengths on the
host, which a trace would freeze).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from mmfuse import envs
from mmfuse.errors import SettingError

from .attention_sdpa import sdpa_attention
from .attention_semantics import attention_reference, check_positions, check_shapes, visibility_mask
from .backends import require_triton, triton_installed

BACKENDS = envs.choices("MMFUSE_ATTENTION")
_chosen: Optional[str] = None  # set_backend's choice; None: the environment variable's


def set_backend(name: Optional[str]) -> None:
    """Select the attention backend for the whole process: "auto", "sdpa", "reference" or "triton";
    None goes back to MMFUSE_ATTENTION."""
    global _chosen
    if name is not None and name not in BACKENDS:
        raise SettingError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _chosen = name


def get_backend() -> str:
    """The backend `attention()` uses now: set_backend's choice, else MMFUSE_ATTENTION."""
    return envs.read("MMFUSE_ATTENTION") if _chosen is None else _chosen  # read(): cheaper than the attribute


@functools.lru_cache(maxsize=None)
def _kernels_usable(device: torch.device) -> bool:
    """"auto" uses the kernels on Ampere or newer GPUs (bf16 tensor cores) with triton installed."""
    return triton_installed() and torch.cuda.get_device_capability(device) >= (8, 0)


def triton_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forced: bool) -> bool:
    """Whether the Triton kernels handle these inputs ("auto": CUDA fp16/bf16 only)."""
    if not forced and not (q.is_cuda and _kernels_usable(q.device)):
        return False
    if forced and not q.is_cuda:
        dtypes = (torch.float16, torch.float32)  # the interpreter's bf16 arithmetic is wrong
    elif forced:
        dtypes = (torch.float16, torch.bfloat16, torch.float32)
    else:
        dtypes = (torch.float16, torch.bfloat16)
    return (q.dtype in dtypes and k.dtype == q.dtype and v.dtype == q.dtype
            and k.device == q.device and v.device == q.device and 0 < q.shape[3] <= 256
            and q.numel() > 0 and k.numel() > 0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def triton_attention(q, k, v, causal, q_start, kv_len, scale):
    """The Triton kernels: decode_attention for Tq <= 16 query tokens, prefill_attention above."""
    require_triton("attention backend 'triton'", q.device)
    if q.shape[2] <= 16:
        from .flash_decode import decode_attention
        return decode_attention(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)
    from .flash_prefill import prefill_attention
    return prefill_attention(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention (semantics: attention_semantics.py). q (B, Hq, Tq, D), k and v
    (B, Hkv, Tk, D), q_start / kv_len integer (B,) -> (B, Hq, Tq, D)."""
    check_shapes(q, k, v)
    check_positions(q.shape[0], q_start, kv_len)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exports record one shape-generic SDPA
        mask = visibility_mask(q.shape[0], q.shape[2], k.shape[2], causal, q_start, kv_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=bool(k.shape[1] != q.shape[1]))
    backend = get_backend()
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)
    if backend in ("auto", "triton") and triton_supported(q, k, v, forced=backend == "triton"):
        return triton_attention(q, k, v, causal, q_start, kv_len, scale)
    return sdpa_attention(q, k, v, causal, q_start, kv_len, scale)
