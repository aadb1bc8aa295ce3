"""Triton kernels of the contrastive losses (see contrastive.py for the math and the API).

Imported lazily by contrastive.py on the first Triton call, so TRITON_INTERPRET=1 only has to be
set before that call. Plain pointer arithmetic and masks: one source for Triton 3.6 and 3.9.
"""
import torch
import triton
import triton.language as tl

from .contrastive_kinds import CLIP
from .triton_utils import INTERPRET, autotuned, dot_precision


@triton.jit
def dot_tile(x_ptr, y_ptr, rows, cols, M, K, D, stride_x, stride_y,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """x[rows] @ y[cols].T as a (BLOCK_M, BLOCK_N) fp32 tile, looping over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        dims = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + dims[None, :],
                    mask=(rows[:, None] < M) & (dims[None, :] < D), other=0.0)
        y = tl.load(y_ptr + cols[:, None] * stride_y + dims[None, :],
                    mask=(cols[:, None] < K) & (dims[None, :] < D), other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly: do everything in fp32 there
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc += tl.dot(x, tl.trans(y), input_precision=PRECISION)
    return acc


@triton.jit
def fwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, lse_ptr, rowloss_ptr, M, K, D, stride_x,
                stride_y, off, KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """Per row i: lse_i = logsumexp_j z_ij (CLIP) and the row's loss term, online over y."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    s = tl.load(scale_ptr).to(tl.float32)
    b = 0.0
    if KIND == 1:
        b = tl.load(bias_ptr).to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max (CLIP)
    acc = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp (CLIP) / of softplus (SigLIP)
    pos = tl.zeros((BLOCK_M,), tl.float32)  # z of the positive pair
    for n0 in range(0, K, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        z = s * dot_tile(x_ptr, y_ptr, rows, cols, M, K, D, stride_x, stride_y,
                          BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) + b  # (BM, BN)
        valid = cols[None, :] < K
        pos += tl.sum(tl.where(cols[None, :] == rows[:, None] + off, z, 0.0), axis=1)
        if KIND == 0:
            z = tl.where(valid, z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            acc = acc * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m_i = m_new
        else:
            softplus = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
            acc += tl.sum(tl.where(valid, softplus, 0.0), axis=1)
    rmask = rows < M
    if KIND == 0:
        lse = m_i + tl.log(acc)
        tl.store(lse_ptr + rows, lse, mask=rmask)
        tl.store(rowloss_ptr + rows, lse - pos, mask=rmask)
    else:
        tl.store(rowloss_ptr + rows, acc - pos, mask=rmask)

@triton.jit
def bwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, lse_x_ptr, lse_y_ptr, coef_ptr, dx_ptr,
                gdot_ptr, gsum_ptr, M, K, D, stride_x, stride_y, stride_dx, off, diag_w,
                KIND: tl.constexpr, HAS_LSE_X: tl.constexpr, HAS_LSE_Y: tl.constexpr,
                WANT_SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, D_SPLITS: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dx[rows, dslice] = coef * s * G @ y[:, dslice], G recomputed tile by tile.

    CLIP: G = exp(z - lse_x[i]) + exp(z - lse_y[j]) - diag_w * [j == i + off] (either exp
    term optional); SigLIP: G = sigmoid(z) - [j == i + off]. Program (i, 0) also writes the
    row sums of G * (x . y) and of G. Output dims are split over D_SPLITS programs, each
    recomputing z, to bound the (BLOCK_M, BLOCK_D / D_SPLITS) accumulator.
    """
    BLOCK_DO: tl.constexpr = BLOCK_D // D_SPLITS
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    pid_d = tl.program_id(1)
    dout = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)  # (BDO,)
    rmask = rows < M
    s = tl.load(scale_ptr).to(tl.float32)
    b = 0.0
    if KIND == 1:
        b = tl.load(bias_ptr).to(tl.float32)
    lse_x = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_LSE_X:
        lse_x = tl.load(lse_x_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    gdot = tl.zeros((BLOCK_M,), tl.float32)
    gsum = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, K, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # (BN,)
        valid = cols < K
        dot = dot_tile(x_ptr, y_ptr, rows, cols, M, K, D, stride_x, stride_y,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)  # (BM, BN)
        z = s * dot + b
        diag = tl.where(cols[None, :] == rows[:, None] + off, diag_w, 0.0)
        if KIND == 0:
            g = -diag
            if HAS_LSE_X:
                g += tl.exp(z - lse_x[:, None])
            if HAS_LSE_Y:
                lse_y = tl.load(lse_y_ptr + cols, mask=valid, other=0.0)
                g += tl.exp(z - lse_y[None, :])
        else:
            e = tl.exp(-tl.abs(z))  # sigmoid without overflow for large |z|
            g = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)) - diag
        g = tl.where(valid[None, :], g, 0.0)
        if WANT_SUMS:
            gdot += tl.sum(g * dot, axis=1)
            gsum += tl.sum(g, axis=1)
        y = tl.load(y_ptr + cols[:, None] * stride_y + dout[None, :],
                    mask=valid[:, None] & (dout[None, :] < D), other=0.0)  # (BN, BDO)
        if UPCAST:
            y = y.to(tl.float32)
        acc += tl.dot(g.to(y.dtype), y, input_precision=PRECISION)
    c = tl.load(coef_ptr).to(tl.float32)
    dx = acc * (c * s)
    tl.store(dx_ptr + rows[:, None] * stride_dx + dout[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=rmask[:, None] & (dout[None, :] < D))
    if WANT_SUMS:
        if pid_d == 0:
            tl.store(gdot_ptr + rows, gdot, mask=rmask)
            tl.store(gsum_ptr + rows, gsum, mask=rmask)


# GPU autotuning candidates. Compiled for sm_90 without a GPU (bench/gpu_contrastive.py --compile-only)
# but never timed on one: they keep registers in bounds rather than being tuned.
FWD_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
               for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 4),
                                     (64, 64, 4, 2)]]
BWD_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=bn, D_SPLITS=sp, num_warps=w, num_stages=2)
               for bm, bn, w, splits in [(64, 64, 8, (1, 2, 4, 8)), (128, 64, 8, (2, 4, 8)),
                                         (128, 32, 8, (2, 4, 8)), (64, 128, 8, (2, 4))]
               for sp in splits]
# Interpreter: one fixed config; small blocks that still exercise every loop and mask.
INTERPRET_FWD = dict(BLOCK_M=64, BLOCK_N=64)
INTERPRET_BWD = dict(BLOCK_M=64, BLOCK_N=64, D_SPLITS=2)


def bwd_config_fits(config: dict, meta: dict) -> bool:
    """Whether the per-program output slice, BLOCK_D / D_SPLITS, is at most 256 wide (a
    (BLOCK_M, 512) fp32 accumulator spills) and, when split, at least 64 wide."""
    width = meta["BLOCK_D"] // config["D_SPLITS"]
    return width <= 256 and (config["D_SPLITS"] == 1 or width >= 64)


_fwd_tuned = autotuned(fwd_kernel, FWD_CONFIGS, key=["D", "KIND"])
_bwd_tuned = autotuned(bwd_kernel, BWD_CONFIGS, key=["D", "KIND", "HAS_LSE_X", "HAS_LSE_Y"], fits=bwd_config_fits)


def _kernel_flags(x: torch.Tensor, D: int) -> tuple[dict, int]:
    """Compile-time flags shared by both kernels, and BLOCK_D (>= 64: the interpreter's 2 splits
    and the tl.dot minimum of 16 both fit)."""
    block_d = max(64, triton.next_power_of_2(D))
    return dict(BLOCK_K=32 if INTERPRET else 64, UPCAST=INTERPRET, PRECISION=dot_precision(x.dtype)), block_d


def triton_fwd(x, y, scale, bias, kind, off, want_col_lse=False):
    """Row LSEs and row loss terms; column LSEs come from the transposed call (returns None)."""
    M, D = x.shape
    K = y.shape[0]
    flags, _ = _kernel_flags(x, D)
    lse = torch.empty((M,), dtype=torch.float32, device=x.device)
    rowloss = torch.empty((M,), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    launch, meta = (fwd_kernel, INTERPRET_FWD) if _fwd_tuned is None else (_fwd_tuned, {})
    launch[grid](x, y, scale, scale if bias is None else bias, lse, rowloss, M, K, D,
                 x.stride(0), y.stride(0), off, KIND=kind, **flags, **meta)
    return (lse if kind == CLIP else None), rowloss, None


def triton_bwd(x, y, scale, bias, kind, off, lse_x, lse_y, diag_w, coef, want_sums):
    """dx of one problem; dy (None here) comes from the transposed call."""
    M, D = x.shape
    K = y.shape[0]
    flags, block_d = _kernel_flags(x, D)
    dx = torch.empty((M, D), dtype=x.dtype, device=x.device)
    gdot = torch.empty((M,), dtype=torch.float32, device=x.device) if want_sums else coef
    gsum = torch.empty((M,), dtype=torch.float32, device=x.device) if want_sums else coef
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), meta["D_SPLITS"])  # noqa: E731
    launch, meta = (bwd_kernel, INTERPRET_BWD) if _bwd_tuned is None else (_bwd_tuned, {})
    launch[grid](x, y, scale, scale if bias is None else bias,
                 coef if lse_x is None else lse_x, coef if lse_y is None else lse_y, coef,
                 dx, gdot, gsum, M, K, D, x.stride(0), y.stride(0), dx.stride(0), off,
                 float(diag_w), KIND=kind, HAS_LSE_X=lse_x is not None,
                 HAS_LSE_Y=lse_y is not None, WANT_SUMS=want_sums, BLOCK_D=block_d, **flags, **meta)
    return dx, (gdot if want_sums else None), (gsum if want_sums else None), None
