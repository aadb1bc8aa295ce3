"""FlashAttention-2-style forward for prefill and chunked prefill (Triton), with its reference.

One program handles BLOCK_M query rows of one (batch row, query head) and streams that sequence's
keys in BLOCK_N blocks with an online softmax (flash_common.attend_blocks). Grouped-query attention
reads the shared K/V head in place (head h uses K/V head h // (Hq // Hkv)); nothing is repeated.
Query i of row b sits at position q_start[b] + i and sees key j iff j < kv_len[b] and (causal)
j <= q_start[b] + i, which covers right-padded batches, chunked prefill against a static cache and
multi-token verification. Key blocks that every row of the program sees in full run without masks;
only the diagonal / length boundary blocks are masked. Causal programs are launched longest first.

The references of the output and of the natural-log LSE (return_lse=True) are
`attention_semantics.attention_reference` / `lse_reference`. No backward: this is an inference kernel, and
`attention()` sends inputs that need gradients to SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash_common import attend, finish_rows, head_block, new_output, positions, row_extent, softmax_scale
from .triton_utils import LN2, autotuned, dot_precision


@triton.jit(do_not_specialize=["Tq", "Tk", "q_start_default", "TQ_BUCKET"])
def flash_prefill_kernel(
        Q, K, V, Out, Lse, QStart, KvLen,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        Hq, group, Tq, Tk, q_start_default, qk_scale, TQ_BUCKET,
        HAS_Q_START: tl.constexpr, HAS_KV_LEN: tl.constexpr, CAUSAL: tl.constexpr,
        WRITE_LSE: tl.constexpr, PRECISION: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)  # heads of one KV group run side by side and share K/V in L2
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m  # the longest rows first: better tail balance
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // group
    q_start, kv_len = row_extent(QStart, KvLen, b, q_start_default, Tk, HAS_Q_START, HAS_KV_LEN)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (M,)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
              + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd)
    row_ok = (offs_m[:, None] < Tq) & (offs_d[None, :] < HEAD_DIM)  # (M, BLOCK_D)
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)
    q_pos = q_start + offs_m

    if CAUSAL:
        hi = tl.minimum(kv_len, q_start + tl.minimum(m0 + BLOCK_M, Tq))  # last row's horizon
        full = tl.minimum(kv_len, q_start + m0 + 1)  # keys the first row already sees
    else:
        hi = kv_len
        full = kv_len
    hi = tl.maximum(hi, 0)
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    acc, l_i, m_i = attend(q, q_pos, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, 0, full, hi,
                           qk_scale, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
    out, lse2 = finish_rows(acc, l_i, m_i)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)
    if WRITE_LSE:
        tl.store(Lse + pid_bh.to(tl.int64) * Tq + offs_m, lse2 * LN2, mask=offs_m < Tq)


# H100/H200 autotuning candidates; ones too large for a head dim fail to compile and are skipped.
GPU_CONFIGS = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
               for m, n, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 4)]]


# Interpreter: one small config (more programs of smaller blocks exercise the block boundaries).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
_tuned_kernel = autotuned(flash_prefill_kernel, GPU_CONFIGS, key=["BLOCK_D", "CAUSAL", "TQ_BUCKET", "WRITE_LSE"])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                      q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
                      scale: Optional[float] = None, return_lse: bool = False, config: Optional[dict] = None):
    """Attention with the semantics of `attention()` for any Tq (best for Tq > 16).

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D), any strides. Returns out (B, Hq, Tq, D) in q's dtype
    (memory order (B, Tq, Hq, D)), and with return_lse the fp32 natural-log LSE (B, Hq, Tq)
    (-inf for rows that see no key). `config` ({"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"})
    bypasses autotuning.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qs, kl, q_start_default, has_qs, has_kl = positions(q, k, v, q_start, kv_len)
    out, lse = new_output(q, return_lse)
    args = (q, k, v, out, out if lse is None else lse, qs, kl,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Hq, Hq // Hkv, Tq, Tk, q_start_default, softmax_scale(scale, D),
            min(triton.next_power_of_2(Tq), 8192))
    meta = dict(HAS_Q_START=has_qs, HAS_KV_LEN=has_kl, CAUSAL=bool(causal), WRITE_LSE=return_lse,
                PRECISION=dot_precision(q.dtype), HEAD_DIM=D, BLOCK_D=head_block(D))
    if config is None and _tuned_kernel is not None:
        grid = lambda META: (B * Hq, triton.cdiv(Tq, META["BLOCK_M"]))  # noqa: E731
        _tuned_kernel[grid](*args, **meta)
    else:
        config = dict(INTERPRET_CONFIG if config is None else config)
        flash_prefill_kernel[(B * Hq, triton.cdiv(Tq, config["BLOCK_M"]))](*args, **meta, **config)
    return (out, lse) if return_lse else out

