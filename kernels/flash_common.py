"""Pieces shared by the Triton attention kernels (flash_prefill.py, flash_decode.py).

`attend_blocks` is the FlashAttention-2 inner loop: online softmax over key blocks in the log2
domain (scores pre-multiplied by scale * log2(e) so the exponentials are exp2), fp32 statistics and
accumulator. Both kernels go through `attend`, which runs it twice: over the key blocks every query
row of the program sees in full (no masks, the fast path), then over the boundary blocks (masked).
`row_extent` reads a batch row's q_start / kv_len, `finish_rows` normalises and gives the LSE.

The Python helpers normalise the optional `q_start` / `kv_len` arguments of `attention()` and
allocate the output in (B, Tq, Hq, D) memory order, returned as a (B, Hq, Tq, D) view, so that the
caller's usual `o.transpose(1, 2).reshape(B, Tq, Hq * D)` costs no copy.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .attention_semantics import check_positions, check_shapes
from .triton_utils import LOG2E


@triton.jit
def attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                  q_pos, lo, hi, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate keys [lo, hi) (lo a multiple of BLOCK_N) into (acc, l_i, m_i).

    q: (M, BLOCK_D) query rows; q_pos: (M,) their absolute positions; acc: (M, BLOCK_D) fp32,
    l_i / m_i: (M,) fp32 running sum and max (log2 domain). MASKED=False promises every key of
    [lo, hi) is in bounds and visible to every row; MASKED=True hides keys >= hi and, when CAUSAL,
    keys after a row's position.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM  # (1, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        cols = start + offs_n  # (N,)
        k_ptrs = k_base + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (N, BLOCK_D)
        v_ptrs = v_base + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd
        if MASKED:
            ld_ok = (cols[:, None] < hi) & d_ok
            k = tl.load(k_ptrs, mask=ld_ok, other=0.0)
            v = tl.load(v_ptrs, mask=ld_ok, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (M, N), log2 domain
        if MASKED:
            visible = cols[None, :] < hi
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        # m_i starts at a finite -1e30, so fully masked rows give exp2(-inf) = 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attend(q, q_pos, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, lo, full, hi, qk_scale,
           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
           CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q's rows over keys [lo, full) without masks, then [full, hi) with them.
    Returns (acc, l_i, m_i) for `finish_rows`."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                  q_pos, lo, full, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, PRECISION)
    acc, l_i, m_i = attend_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                  q_pos, full, hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, PRECISION)
    return acc, l_i, m_i


@triton.jit
def row_extent(QStart, KvLen, b, q_start_default, Tk, HAS_Q_START: tl.constexpr, HAS_KV_LEN: tl.constexpr):
    """(q_start, kv_len) of batch row b: the loaded values or the defaults; kv_len clipped to Tk."""
    if HAS_Q_START:
        q_start = tl.load(QStart + b).to(tl.int32)
    else:
        q_start = q_start_default
    if HAS_KV_LEN:
        kv_len = tl.minimum(tl.load(KvLen + b).to(tl.int32), Tk)
    else:
        kv_len = Tk
    return q_start, kv_len


@triton.jit
def finish_rows(acc, l_i, m_i):
    """Normalised output rows and their log2-sum-exp; rows that saw no key give 0 and -inf."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse2 = m_i + tl.log2(l_i)
    return out, lse2


def head_block(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def positions(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: Optional[torch.Tensor],
              kv_len: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, int, bool, bool]:
    """Checked shapes; device copies of q_start / kv_len and the default query start.

    Returns (q_start_t, kv_len_t, q_start_default, has_q_start, has_kv_len).
    """
    check_shapes(q, k, v)
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    check_positions(B, q_start, kv_len)
    # An absent tensor is never read (HAS_Q_START / HAS_KV_LEN = False): pass q as a placeholder.
    qs = q if q_start is None else q_start.reshape(B).to(q.device, non_blocking=True).contiguous()
    kl = q if kv_len is None else kv_len.reshape(B).to(q.device, non_blocking=True).contiguous()
    return qs, kl, Tk - Tq, q_start is not None, kv_len is not None


def new_output(q: torch.Tensor, return_lse: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Output (B, Hq, Tq, D) stored as (B, Tq, Hq, D), and the optional fp32 LSE (B, Hq, Tq)."""
    B, Hq, Tq, D = q.shape
    out = torch.empty(B, Tq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device) if return_lse else None
    return out, lse


def softmax_scale(scale: Optional[float], D: int) -> float:
    """scale * log2(e): scores come out of the dot product ready for exp2."""
    return (1.0 / math.sqrt(D) if scale is None else float(scale)) * LOG2E
