"""The torch backend of `attention()`: SDPA, with fast paths for static caches and few queries on CPU.

Semantics and argument checks are those of attention_semantics.py; attention_dispatch.py calls
`sdpa_attention` for everything the Triton kernels do not take.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .attention_semantics import visibility_mask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   q_start: Optional[torch.Tensor], kv_len: Optional[torch.Tensor],
                   scale: Optional[float]) -> torch.Tensor:
    """Checked (B, Hq, Tq, D), (B, Hkv, Tk, D) inputs -> (B, Hq, Tq, D) through torch's SDPA."""
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
        return few_queries_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != Hq)


def few_queries_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                          scale: Optional[float]) -> torch.Tensor:
    """Decode/verification on CPU: the query heads of each KV group form one matrix, so a step is
    two batched matmuls that read each K/V byte once (SDPA's CPU kernels are slow for Tq=1).
    `mask`: (B, 1, Tq, Tk) visibility or None."""
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
