"""What `attention()` computes, in one place: argument checks, the visibility mask, the references.

    q: (B, Hq, Tq, D)    k, v: (B, Hkv, Tk, D)   with Hq % Hkv == 0
    query i of row b sits at absolute position  q_start[b] + i
    key j of row b is visible iff  j < kv_len[b]  and, when causal,  j <= q_start[b] + i

`k`/`v` may be the whole preallocated cache (Tk = T_max); `kv_len` then says how much of it is
filled. Defaults: q_start = Tk - Tq (queries are the last Tq positions), kv_len = Tk.

Every backend (attention_dispatch.py) and kernel (flash_prefill.py, flash_decode.py) checks its
arguments with these functions; `attention_reference` and `lse_reference` are the plain PyTorch
code the tests compare them to (in float64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """4-D q, k, v whose batch, head and head-dim sizes agree (ValueError naming the shapes)."""
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


def _masked_scores(q, k, causal, q_start, kv_len, scale) -> torch.Tensor:
    """Scaled scores (B, Hq, Tq, Tk) with K repeated over each KV group; -inf where not visible."""
    check_shapes(q, k, k)
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    mask = visibility_mask(B, Tq, Tk, causal, q_start, kv_len, q.device)
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Plain PyTorch attention with the semantics above; computes in q's dtype. (B, Hq, Tq, D)."""
    check_shapes(q, k, v)
    p = torch.softmax(_masked_scores(q, k, causal, q_start, kv_len, scale), dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key give zeros
    return p @ v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> torch.Tensor:
    """Natural-log sum of exp of the visible scaled scores, (B, Hq, Tq); -inf where none is visible
    (what the kernels return with return_lse=True)."""
    check_shapes(q, k, v)
    return torch.logsumexp(_masked_scores(q, k, causal, q_start, kv_len, scale), dim=-1)
