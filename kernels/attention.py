"""The engine's single attention entry point, and its plain PyTorch reference.

Every model in mmfuse calls `attention()`. It covers prefill, chunked prefill, decode against a
static KV cache, multi-token verification, padded encoder batches and grouped-query attention
with one set of semantics:

    q: (B, Hq, Tq, D)    k, v: (B, Hkv, Tk, D)   with Hq % Hkv == 0
    query i of row b sits at absolute position  q_start[b] + i
    key j of row b is visible iff  j < kv_len[b]  and, when causal,  j <= q_start[b] + i

`k`/`v` may be the whole preallocated cache (Tk = T_max); `kv_len` then says how much of it is
filled. Defaults: q_start = Tk - Tq (queries are the last Tq positions), kv_len = Tk.

Backends: "auto" (Triton kernels on CUDA where supported, torch SDPA otherwise), "sdpa", and
"reference" (the plain PyTorch code below, for debugging). Select with `set_backend()` or the
environment variable MMFUSE_ATTENTION.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "sdpa", "reference")
_backend = os.environ.get("MMFUSE_ATTENTION", "auto")
if _backend not in _BACKENDS:
    raise ValueError(f"MMFUSE_ATTENTION={_backend!r}: expected one of {_BACKENDS}")


def set_backend(name: str) -> None:
    """Select the attention backend for the whole process: "auto", "sdpa" or "reference"."""
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


def visibility_mask(B: int, Tq: int, Tk: int, causal: bool, q_start: Optional[torch.Tensor],
                    kv_len: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Boolean (B, 1, Tq, Tk) mask, True where a key is visible; None when every key is."""
    if not causal and kv_len is None:
        return None
    j = torch.arange(Tk, device=device)  # (Tk,)
    mask = torch.ones(B, 1, Tq, Tk, dtype=torch.bool, device=device)
    if kv_len is not None:
        mask &= (j < kv_len.to(device).view(B, 1, 1, 1))
    if causal:
        if q_start is None:
            pos = torch.full((B,), Tk - Tq, device=device)
        else:
            pos = q_start.to(device)
        qpos = pos.view(B, 1, 1, 1) + torch.arange(Tq, device=device).view(1, 1, Tq, 1)  # (B, 1, Tq, 1)
        mask &= (j.view(1, 1, 1, Tk) <= qpos)
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
    if kv_len is not None and not kv_len.is_cuda:
        # Only read the filled part of a static cache (no host sync needed on CPU).
        used = int(kv_len.max())
        if used < Tk:
            k, v, Tk = k[:, :, :used], v[:, :, :used], used
    if kv_len is None and causal and Tq == Tk and not bool(q_start.any()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != Hq)
    mask = visibility_mask(B, Tq, Tk, causal, q_start, kv_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != Hq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
              q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention; see the module docstring for the semantics. Returns (B, Hq, Tq, D)."""
    _check(q, k, v)
    if _backend == "reference":
        return attention_reference(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, scale=scale)
    return _attention_sdpa(q, k, v, causal, q_start, kv_len, scale)
