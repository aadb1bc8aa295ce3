"""The engine's single attention entry point, and its plain PyTorch reference.

Every model in mmfuse calls `attention()`. It covers prefill, chunked prefill, decode against a
static KV cache, multi-token verification, padded encoder batches and grouped-query attention
with one set of semantics:

    q: (B, Hq, Tq, D)    k, v: (B, Hkv, Tk, D)   with Hq % Hkv == 0
    query i of row b sits at absolute position  q_start[b] + i
    key j of row b is visible iff  j < kv_len[b]  and, when causal,  j <= q_start[b] + i

`k`/`v` may be the whole preallocated cache (Tk = T_max); `kv_len` then says how much of it is
filled. Defaults: q_start = Tk - Tq (queries are the last Tq positions), kv_len = Tk.

Backends: "auto" (Triton kernels on CUDA fp16/bf16 where supported, torch SDPA otherwise), "sdpa",
"reference" (the plain PyTorch code below, for debugging) and "triton" (the Triton kernels for
every device and dtype they support, CPU tensors included under TRITON_INTERPRET=1; for tests).
Select with `set_backend()` or the environment variable MMFUSE_ATTENTION. While tracing or compiling
(ONNX export) every backend records one masked SDPA, whose shapes stay symbolic (the CPU path reads
lengths on the host, which a trace would freeze). The kernels are
flash_prefill.py (Tq > 16) and flash_decode.py (split-KV, Tq <= 16); inputs they do not support
(gradients needed, head dim > 256, mixed dtypes, empty tensors) go to SDPA, never to a wrong result.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "sdpa", "reference", "triton")
_backend = os.environ.get("MMFUSE_ATTENTION", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"MMFUSE_ATTENTION={_backend!r}: expected one of {_BACKENDS}")


def set_backend(name: str) -> None:
    """Select the attention backend for the whole process: "auto", "sdpa", "reference" or "triton"."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects 4-D q, k, v; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or Hq % k.shape[1] != 0:
        raise ValueError(
            f"attention shapes do not agree: q {tuple(q.shape)} (B, Hq, Tq, D), "
            f"k {tuple(k.shape)}, v {tuple(v.shape)} (B, Hkv, Tk, D) with Hq % Hkv == 0")


def check_positions(B: int, q_start: Optional[torch.Tensor], kv_len: Optional[torch.Tensor]) -> None:
    """q_start / kv_len, when given, are integer tensors with one element per batch row."""
    for name, t in (("q_start", q_start), ("kv_len", kv_len)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.numel() != B
                              or t.dtype.is_floating_point or t.dtype == torch.bool):
            raise ValueError(f"attention: {name} must be an integer tensor with one element per batch "
                             f"row ({B}); got {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} "
                             f"of shape {tuple(t.shape) if isinstance(t, torch.Tensor) else ()}")


def visibility_mask(B: int, Tq: int, Tk: int, causal: bool, q_start: Optional[torch.Tensor],
                    kv_len: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Boolean (B, 1, Tq, Tk) mask, True where a key is visible; None when every key is."""
    if not causal and kv_len is None:
        return None
    j = torch.arange(Tk, device=device)  # (Tk,)
    mask = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=device)
    if kv_len is not None:
        mask = mask & (j < kv_len.to(device).view(B, 1, 1, 1))
    if causal:
        if q_start is None:
            pos = torch.full((B,), Tk - Tq, device=device)
        else:
            pos = q_start.to(device)
        qpos = pos.view(B, 1, 1, 1) + torch.arange(Tq, device=device).view(1, 1, Tq, 1)  # (B, 1, Tq, 1)
        mask = mask & (j.view(1, 1, 1, Tk) <= qpos)
    return mask


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Plain PyTorch attention with the semantics of `attention()`; computes in q's dtype."""
    _check(q, k, v)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    mask = visibility_mask(B, Tq, Tk, causal, q_start, kv_len, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key give zeros
    return p @ v


def _attention_sdpa(q, k, v, causal, q_start, kv_len, scale):
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if causal and q_start is None:
        q_start = torch.full((B,), Tk - Tq, device=q.device)
    if q.is_cuda:
        top_left = kv_len is None and causal and Tq == Tk and not bool(q_start.any())
    else:
        # Host values cost nothing on the CPU: read only the filled part of a static cache and drop
        # masks that hide nothing, so decode and prefill reach the mask-free fast paths.
        lens = kv_len.tolist() if kv_len is not None else [Tk] * B
        used = max(lens)
        if used < Tk:
            k, v, Tk = k[:, :, :used], v[:, :, :used], used
        if min(lens) >= Tk:
            kv_len = None
        starts = q_start.tolist() if causal else None
        if causal and all(s >= min(n, Tk) - 1 for s, n in zip(starts, lens)):
            causal = False  # each row's first query already sees every valid key (decode)
        top_left = kv_len is None and causal and Tq == Tk and not any(starts)
    if top_left:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != Hq)
    mask = visibility_mask(B, Tq, Tk, causal, q_start, kv_len, q.device)
    if not q.is_cuda and Tq <= 16:
        return _attention_few_queries(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != Hq)


def _attention_few_queries(q, k, v, mask, scale):
    """Decode/verification on CPU: the query heads of each KV group form one matrix, so a step is
    two batched matmuls that read each K/V byte once (SDPA's CPU kernels are slow for Tq=1)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, Hkv, rep * Tq, D)  # row r*Tq + t holds head g*rep + r, query t
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, rep*Tq, Tk)
    if mask is not None:
        s = s.masked_fill(~mask.unsqueeze(2).expand(B, 1, rep, Tq, Tk).reshape(B, 1, rep * Tq, Tk), float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype)
    return torch.matmul(p, v).view(B, Hq, Tq, D)


@functools.lru_cache(maxsize=None)
def _kernels_usable(device: torch.device) -> bool:
    """"auto" uses the kernels on Ampere or newer GPUs (bf16 tensor cores) with triton installed."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def _triton_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forced: bool) -> bool:
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


def _attention_triton(q, k, v, causal, q_start, kv_len, scale):
    try:
        from .flash_common import INTERPRET
    except ImportError as e:  # triton not installed
        raise RuntimeError("attention backend 'triton' needs the triton package") from e
    if not q.is_cuda and not INTERPRET:
        raise RuntimeError("attention backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                           "set before triton is first imported")
    if q.shape[2] <= 16:
        from .flash_decode import decode_attention
        return decode_attention(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)
    from .flash_prefill import prefill_attention
    return prefill_attention(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention; see the module docstring for the semantics. Returns (B, Hq, Tq, D)."""
    _check(q, k, v)
    check_positions(q.shape[0], q_start, kv_len)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # exports record one shape-generic SDPA
        mask = visibility_mask(q.shape[0], q.shape[2], k.shape[2], causal, q_start, kv_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=bool(k.shape[1] != q.shape[1]))
    if _backend == "reference":
        return attention_reference(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)
    if _backend in ("auto", "triton") and _triton_supported(q, k, v, forced=_backend == "triton"):
        return _attention_triton(q, k, v, causal, q_start, kv_len, scale)
    return _attention_sdpa(q, k, v, causal, q_start, kv_len, scale)
