"""Split-KV "flash-decoding" for 1..16 query tokens per sequence against a static KV cache (Triton).

Decode, multi-token verification and small chunks have few query rows, so one program per query
head would leave the GPU idle and read every K/V byte Hq/Hkv times. Here one program takes all
G = Hq/Hkv query heads of one KV group times the Tq query tokens as its rows (row r = g * Tq + t),
so each K/V byte is read once, and the key range [0, kv_end) is cut into `num_splits` slices that
run as separate programs. Each writes its normalised partial output and log2-sum-exp; a second
kernel combines the slices by LSE. The split count grows until batch x KV heads x splits fills the
GPU, so batch 1 at long context still uses every SM; with one split the first kernel writes the
final output and the combine is skipped.

Semantics are those of `attention()` (query t of row b at position q_start[b] + t; key j visible
iff j < kv_len[b] and, causal, j <= q_start[b] + t); the reference is
`attention_semantics.attention_reference`. Inference only: no backward.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .flash_common import attend, finish_rows, head_block, new_output, positions, row_extent, softmax_scale
from .triton_utils import INTERPRET, LN2, autotuned, dot_precision

MAX_QUERY_TOKENS = 16  # attention() sends Tq <= this here, longer queries to prefill_attention
MAX_SPLITS = 64
MAX_ROWS = 128  # query rows (heads x tokens) per program; larger groups use several row blocks


@triton.jit(do_not_specialize=["Tq", "Tk", "q_start_default", "split_len", "SPLIT_BUCKET"])
def flash_decode_kernel(
        Q, K, V, Out, Lse, OPart, LsePart, QStart, KvLen,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        Hkv, group, Tq, Tk, q_start_default, qk_scale, split_len, num_splits, SPLIT_BUCKET,
        HAS_Q_START: tl.constexpr, HAS_KV_LEN: tl.constexpr, CAUSAL: tl.constexpr,
        SINGLE_SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr, PRECISION: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    q_start, kv_end = row_extent(QStart, KvLen, b, q_start_default, Tk, HAS_Q_START, HAS_KV_LEN)
    if CAUSAL:
        kv_end = tl.minimum(kv_end, q_start + Tq)  # the last token's horizon

    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) = head-in-group * Tq + token
    t = rows % Tq
    h = hk * group + rows // Tq  # query head of each row
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (rows[:, None] < group * Tq) & (offs_d[None, :] < HEAD_DIM)  # (M, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh
              + t[:, None] * stride_qt + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)
    q_pos = q_start + t

    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_end)
    if CAUSAL:
        seen_by_all = tl.minimum(hi, q_start + 1)  # the first token's horizon
    else:
        seen_by_all = hi
    full = lo + tl.maximum(seen_by_all - lo, 0) // BLOCK_N * BLOCK_N

    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    acc, l_i, m_i = attend(q, q_pos, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, lo, full, hi,
                           qk_scale, HEAD_DIM, BLOCK_M, BLOCK_D, BLOCK_N, CAUSAL, PRECISION)
    out, lse2 = finish_rows(acc, l_i, m_i)
    if SINGLE_SPLIT:
        o_ptrs = (Out + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh
                  + t[:, None] * stride_ot + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)
        if WRITE_LSE:
            lse_ptrs = Lse + (b.to(tl.int64) * Hkv * group + h) * Tq + t
            tl.store(lse_ptrs, lse2 * LN2, mask=rows < group * Tq)
    else:
        # Partials: (B, Hq, Tq, num_splits) log2-sum-exp and (B, Hq, Tq, num_splits, HEAD_DIM) fp32.
        part = ((b.to(tl.int64) * Hkv * group + h) * Tq + t) * num_splits + split  # (M,)
        tl.store(LsePart + part, lse2, mask=rows < group * Tq)
        tl.store(OPart + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok)


@triton.jit
def combine_kernel(OPart, LsePart, Out, Lse, Hq, Tq, num_rows, num_splits,
                    stride_ob, stride_oh, stride_ot, stride_od,
                    WRITE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    """BLOCK_R query rows per program: out = sum_s w_s O_s / sum_s w_s, w_s = exp2(lse_s - max_s)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,) = (b * Hq + h) * Tq + t
    t = row % Tq
    h = (row // Tq) % Hq
    b = row // (Tq * Hq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    rs_ok = (row[:, None] < num_rows) & (offs_s[None, :] < num_splits)  # (R, S)
    lse = tl.load(LsePart + row[:, None] * num_splits + offs_s[None, :], mask=rs_ok,
                  other=float("-inf"))  # (R, S)
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row that sees no key: all weights 0
    w = tl.exp2(lse - m[:, None])  # (R, S)
    total = tl.sum(w, 1)  # (R,)
    part = (row[:, None] * num_splits + offs_s[None, :])[:, :, None] * HEAD_DIM + offs_d[None, None, :]
    ok3 = rs_ok[:, :, None] & (offs_d[None, None, :] < HEAD_DIM)  # (R, S, BLOCK_D)
    o = tl.load(OPart + part, mask=ok3, other=0.0)
    out = tl.sum(o * w[:, :, None], 1) / tl.where(total == 0.0, 1.0, total)[:, None]  # (R, BLOCK_D)
    o_ptrs = Out + (b * stride_ob + h * stride_oh + t * stride_ot)[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(row[:, None] < num_rows) & (offs_d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        tl.store(Lse + row, (m + tl.log2(total)) * LN2, mask=row < num_rows)


# H100/H200 autotuning candidates: memory-bound, so deep pipelines of K/V tiles.
GPU_CONFIGS = [dict(BLOCK_N=n, num_warps=w, num_stages=s)
               for n, w, s in [(64, 4, 3), (64, 4, 4), (128, 4, 3), (32, 4, 4)]]


# Interpreter: one small config, so short tests still cross several key blocks and splits.
INTERPRET_CONFIG = {"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
COMBINE_TILE = 65536 if INTERPRET else 4096  # elements of partial output one combine program reads
# split_len is a multiple of every candidate BLOCK_N
SPLIT_GRANULE = INTERPRET_CONFIG["BLOCK_N"] if INTERPRET else max(c["BLOCK_N"] for c in GPU_CONFIGS)
_tuned_kernel = autotuned(flash_decode_kernel, GPU_CONFIGS,
                          key=["BLOCK_D", "BLOCK_M", "CAUSAL", "SINGLE_SPLIT", "SPLIT_BUCKET"])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # CPU (interpreter): a pretend small GPU, so tests see several splits


def choose_num_splits(programs: int, Tk: int, num_sms: int, granule: int = SPLIT_GRANULE) -> int:
    """Splits per sequence so that `programs` x splits covers about 3 waves of the GPU's SMs,
    keeping each split at least 2 granules (split_len) long and at most MAX_SPLITS."""
    longest = max(1, triton.cdiv(Tk, 2 * granule))
    return max(1, min(triton.cdiv(3 * num_sms, programs), longest, MAX_SPLITS))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     q_start: Optional[torch.Tensor] = None, kv_len: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, return_lse: bool = False,
                     num_splits: Optional[int] = None, config: Optional[dict] = None):
    """Attention with the semantics of `attention()` for Tq <= 16 query tokens per sequence.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) -- typically the whole static cache, any strides.
    The split count is chosen from B x Hkv x Tk (Tk, not kv_len, so no host sync) unless
    `num_splits` is given. Returns out (B, Hq, Tq, D) (memory order (B, Tq, Hq, D)) and, with
    return_lse, the fp32 natural-log LSE (B, Hq, Tq). `config` ({"BLOCK_N", "num_warps",
    "num_stages"}) bypasses autotuning; its BLOCK_N must divide the split length.
    """
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tq > MAX_QUERY_TOKENS:
        raise ValueError(f"decode_attention takes at most {MAX_QUERY_TOKENS} query tokens; got q {tuple(q.shape)}")
    group = Hq // Hkv
    block_m = max(16, triton.next_power_of_2(min(group * Tq, MAX_ROWS)))
    row_blocks = triton.cdiv(group * Tq, block_m)
    granule = SPLIT_GRANULE if config is None else max(SPLIT_GRANULE, config["BLOCK_N"])
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"decode_attention: num_splits must be >= 1, got {num_splits}")
    if num_splits is None:
        num_splits = choose_num_splits(B * Hkv * row_blocks, Tk, _num_sms(q.device), granule)
    split_len = triton.cdiv(triton.cdiv(Tk, num_splits), granule) * granule
    num_splits = triton.cdiv(Tk, split_len)  # no split starts past the cache
    single = num_splits == 1

    qs, kl, q_start_default, has_qs, has_kl = positions(q, k, v, q_start, kv_len)
    out, lse = new_output(q, return_lse)
    if single:
        o_part = lse_part = out  # unused
    else:
        o_part = torch.empty(B, Hq, Tq, num_splits, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(B, Hq, Tq, num_splits, dtype=torch.float32, device=q.device)
    lse_arg = out if lse is None else lse
    args = (q, k, v, out, lse_arg, o_part, lse_part, qs, kl,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            Hkv, group, Tq, Tk, q_start_default, softmax_scale(scale, D), split_len, num_splits,
            min(triton.next_power_of_2(split_len), 4096))  # SPLIT_BUCKET: autotuning key
    meta = dict(HAS_Q_START=has_qs, HAS_KV_LEN=has_kl, CAUSAL=bool(causal), SINGLE_SPLIT=single,
                WRITE_LSE=return_lse, PRECISION=dot_precision(q.dtype), HEAD_DIM=D,
                BLOCK_D=head_block(D), BLOCK_M=block_m)
    grid = (B * Hkv, num_splits, row_blocks)
    if config is None and _tuned_kernel is not None:
        _tuned_kernel[grid](*args, **meta)
    else:
        flash_decode_kernel[grid](*args, **meta, **(INTERPRET_CONFIG if config is None else config))
    if not single:
        block_s = max(2, triton.next_power_of_2(num_splits))
        block_r = max(1, min(COMBINE_TILE // (block_s * head_block(D)), triton.next_power_of_2(B * Hq * Tq)))
        combine_kernel[(triton.cdiv(B * Hq * Tq, block_r),)](
            o_part, lse_part, out, lse_arg, Hq, Tq, B * Hq * Tq, num_splits, *out.stride(),
            WRITE_LSE=return_lse, HEAD_DIM=D, BLOCK_D=head_block(D), BLOCK_S=block_s, BLOCK_R=block_r,
            num_warps=4)
    return (out, lse) if return_lse else out
