"""CLIP (symmetric InfoNCE) and SigLIP (pairwise sigmoid) losses that never hold the N x N logits.

Conventions (those of OpenCLIP's ClipLoss / SigLipLoss):

    logits = logit_scale * image_features @ text_features.T  (+ logit_bias for SigLIP)
    clip_loss   = (CE(logits, arange) + CE(logits.T, arange)) / 2                 (means over rows)
    siglip_loss = -sum(logsigmoid(labels * logits)) / n,  labels = +1 on the pairs, -1 elsewhere

`logit_scale` is the MULTIPLIER, not the log-parameter: models store the log (transformers'
`CLIPModel.logit_scale`, SigLIP's `logit_scale`) and callers pass `model.logit_scale.exp()`;
autograd flows through the `.exp()`. `logit_bias` is used as stored. Features are expected to be
L2-normalised already. The loss is returned in float32.

Implementation. Both losses reduce to two primitives over a rectangular problem x (M, D) against
y (K, D), z = s * x @ y.T (+ b), where row i of x is paired with column i + off of y:

    _fwd: per row, the log-sum-exp of z (CLIP) and the row's loss term, in one pass over y;
    _bwd: per row, dx = c * s * G @ y with G = dL/dz recomputed tile by tile from z and the saved
          log-sum-exps, plus the row sums of G * (x . y) and of G (for the scale and bias grads).

The gradient for y is the same `_bwd` on the transposed problem (y against x, offset -off), so no
atomics are needed and results are deterministic. For CLIP the single-process backward fuses both
softmax directions into one G = P_row + P_col - 2I, so each feature matrix costs one pass.
Backends: "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch" (chunked row blocks:
O(rows_per_chunk * K) scratch, used for CPU tensors), and the "_reference" functions below, which
materialise the logits as OpenCLIP does. "auto" picks triton on CUDA and torch otherwise; the
environment variable MMFUSE_CONTRASTIVE overrides the default.

Distributed: `gather_features` gathers across ranks exactly as OpenCLIP does. With
`distributed=True`, `local_loss=True` each rank computes its local rows against all gathered
columns (labels offset by rank * n); averaging that loss over ranks equals the single-process
loss. OpenCLIP's SigLipLoss (neighbour exchange) equals
`siglip_loss(..., distributed=True, local_loss=True, gather_with_grad=True)`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend still works
    triton = None

CLIP, SIGLIP = 0, 1
_BACKENDS = ("auto", "triton", "torch")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CHUNK_ELEMENTS = 1 << 22  # torch backend: rows per chunk = this // K (16 MiB of fp32 per buffer)


# ----------------------------------------------------------------------------- references


def _dist_info(group) -> tuple[int, int]:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True but torch.distributed is not initialised")
    return dist.get_rank(group), dist.get_world_size(group)


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, *,
                    local_loss: bool = False, gather_with_grad: bool = False, group=None):
    """All-gather (n, D) features from every rank into (world * n, D), as OpenCLIP's gather_features.

    With `gather_with_grad`, gradients flow back to every rank's features (all_gather backward sums
    them); otherwise only this rank's slice carries a gradient, and only when not `local_loss`.
    """
    import torch.distributed as dist
    import torch.distributed.nn as dist_nn
    rank, world = _dist_info(group)
    kw = {} if group is None else {"group": group}
    if gather_with_grad:
        return (torch.cat(dist_nn.all_gather(image_features, **kw), dim=0),
                torch.cat(dist_nn.all_gather(text_features, **kw), dim=0))
    out = []
    for f in (image_features, text_features):
        parts = [torch.zeros_like(f) for _ in range(world)]
        dist.all_gather(parts, f.contiguous(), **kw)
        if not local_loss:
            parts[rank] = f
        out.append(torch.cat(parts, dim=0))
    return out[0], out[1]


def _operands(image_features, text_features, distributed, local_loss, gather_with_grad, group):
    """(row images, row texts, column images, column texts, offset) of the loss to compute.

    Columns are None when they equal the rows (the square, single-matrix case).
    """
    if not distributed:
        return image_features, text_features, None, None, 0
    rank, world = _dist_info(group)
    if world == 1:
        return image_features, text_features, None, None, 0
    all_img, all_txt = gather_features(image_features, text_features, local_loss=local_loss,
                                       gather_with_grad=gather_with_grad, group=group)
    if local_loss:
        return image_features, text_features, all_img, all_txt, rank * image_features.shape[0]
    return all_img, all_txt, None, None, 0


def clip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
                        distributed: bool = False, local_loss: bool = False,
                        gather_with_grad: bool = False, group=None) -> torch.Tensor:
    """OpenCLIP's ClipLoss with the logits materialised; computes in the features' dtype."""
    img, txt, all_img, all_txt, off = _operands(image_features, text_features, distributed,
                                                local_loss, gather_with_grad, group)
    all_img = img if all_img is None else all_img
    all_txt = txt if all_txt is None else all_txt
    logits_per_image = logit_scale * img @ all_txt.T  # (n, N)
    logits_per_text = logit_scale * txt @ all_img.T  # (n, N)
    labels = torch.arange(img.shape[0], device=img.device) + off
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                          logit_bias, *, distributed: bool = False, local_loss: bool = False,
                          gather_with_grad: bool = False, group=None) -> torch.Tensor:
    """OpenCLIP's SigLipLoss with the logits materialised; computes in the features' dtype."""
    img, txt, _, all_txt, off = _operands(image_features, text_features, distributed, local_loss,
                                          gather_with_grad, group)
    txt = txt if all_txt is None else all_txt
    logits = logit_scale * img @ txt.T + logit_bias  # (n, N)
    labels = -torch.ones_like(logits)
    idx = torch.arange(img.shape[0], device=img.device)
    labels[idx, idx + off] = 1.0
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _dot_tile(x_ptr, y_ptr, rows, cols, M, K, D, stride_x, stride_y,
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
    def _fwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, lse_ptr, rowloss_ptr, M, K, D, stride_x,
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
            z = s * _dot_tile(x_ptr, y_ptr, rows, cols, M, K, D, stride_x, stride_y,
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
    def _bwd_kernel(x_ptr, y_ptr, scale_ptr, bias_ptr, lse_x_ptr, lse_y_ptr, coef_ptr, dx_ptr,
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
            dot = _dot_tile(x_ptr, y_ptr, rows, cols, M, K, D, stride_x, stride_y,
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
                g = 1.0 / (1.0 + tl.exp(-z)) - diag
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

    if _INTERPRET:  # one fixed config; small blocks that still exercise every loop and mask
        _fwd_launch, _bwd_launch = _fwd_kernel, _bwd_kernel
        _FWD_META = dict(BLOCK_M=32, BLOCK_N=32)
        _BWD_META = dict(BLOCK_M=32, BLOCK_N=32, D_SPLITS=2)
    else:  # GPU: autotuned; configs chosen for D = 256..1024 (untuned on real hardware)
        _fwd_launch = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=st)
                     for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                                           (128, 128, 8, 4), (64, 64, 4, 2)]],
            key=["D", "KIND"])(_fwd_kernel)
        _bwd_launch = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, D_SPLITS=sp), num_warps=w,
                                   num_stages=st)
                     for bm, bn, sp, w, st in [(64, 64, 1, 8, 2), (64, 64, 2, 4, 2),
                                               (128, 64, 2, 8, 2), (128, 32, 4, 8, 2),
                                               (64, 32, 1, 4, 3), (32, 64, 1, 4, 2)]],
            key=["D", "KIND", "HAS_LSE_X", "HAS_LSE_Y"])(_bwd_kernel)
        _FWD_META, _BWD_META = {}, {}


def _kernel_flags(x: torch.Tensor, D: int) -> tuple[dict, int]:
    """Compile-time flags shared by both kernels, and BLOCK_D (>= 64, so 4 splits stay >= 16)."""
    block_d = max(64, triton.next_power_of_2(D))
    return dict(BLOCK_K=32 if _INTERPRET else 64, UPCAST=_INTERPRET,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32"), block_d


def _new(shape, dtype, device) -> torch.Tensor:
    """Allocation of every kernel output (tests replace it with a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _triton_fwd(x, y, scale, bias, kind, off):
    M, D = x.shape
    K = y.shape[0]
    flags, _ = _kernel_flags(x, D)
    lse = _new((M,), torch.float32, x.device)
    rowloss = _new((M,), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
    _fwd_launch[grid](x, y, scale, scale if bias is None else bias, lse, rowloss, M, K, D,
                      x.stride(0), y.stride(0), off, KIND=kind, **flags, **_FWD_META)
    return (lse if kind == CLIP else None), rowloss


def _triton_bwd(x, y, scale, bias, kind, off, lse_x, lse_y, diag_w, coef, want_sums):
    M, D = x.shape
    K = y.shape[0]
    flags, block_d = _kernel_flags(x, D)
    dx = _new((M, D), x.dtype, x.device)
    gdot = _new((M,), torch.float32, x.device) if want_sums else coef
    gsum = _new((M,), torch.float32, x.device) if want_sums else coef
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), meta["D_SPLITS"])  # noqa: E731
    _bwd_launch[grid](x, y, scale, scale if bias is None else bias,
                      coef if lse_x is None else lse_x, coef if lse_y is None else lse_y, coef,
                      dx, gdot, gsum, M, K, D, x.stride(0), y.stride(0), dx.stride(0), off,
                      float(diag_w), KIND=kind, HAS_LSE_X=lse_x is not None,
                      HAS_LSE_Y=lse_y is not None, WANT_SUMS=want_sums, BLOCK_D=block_d,
                      **flags, **_BWD_META)
    return dx, (gdot if want_sums else None), (gsum if want_sums else None)


# ----------------------------------------------------------------------------- chunked torch


def _torch_tiles(x, y, scale, bias, kind, off):
    """Yield (row slice, dot, z, positive mask) for row blocks of x against all of y, in fp32."""
    M, K = x.shape[0], y.shape[0]
    xf, yf = x.float(), y.float()  # (M, D), (K, D): O(N * D) copies at most
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // K)
    cols = torch.arange(K, device=x.device)
    for r0 in range(0, M, rows_per_chunk):
        rs = slice(r0, min(M, r0 + rows_per_chunk))
        dot = xf[rs] @ yf.T  # (R, K)
        z = dot * scale.float()
        if kind == SIGLIP:
            z += bias.float()
        rows = torch.arange(rs.start, rs.stop, device=x.device)
        pos = cols[None, :] == (rows + off)[:, None]  # (R, K)
        yield rs, dot, z, pos, yf


def _torch_fwd(x, y, scale, bias, kind, off):
    M = x.shape[0]
    lse = torch.empty(M, dtype=torch.float32, device=x.device) if kind == CLIP else None
    rowloss = torch.empty(M, dtype=torch.float32, device=x.device)
    for rs, _, z, pos, _ in _torch_tiles(x, y, scale, bias, kind, off):
        zpos = (z * pos).sum(1)
        if kind == CLIP:
            lse[rs] = torch.logsumexp(z, dim=1)
            rowloss[rs] = lse[rs] - zpos
        else:
            rowloss[rs] = F.softplus(z).sum(1) - zpos
    return lse, rowloss


def _torch_bwd(x, y, scale, bias, kind, off, lse_x, lse_y, diag_w, coef, want_sums):
    M = x.shape[0]
    dx = torch.empty_like(x)
    gdot = torch.empty(M, dtype=torch.float32, device=x.device) if want_sums else None
    gsum = torch.empty(M, dtype=torch.float32, device=x.device) if want_sums else None
    cs = coef.float() * scale.float()
    for rs, dot, z, pos, yf in _torch_tiles(x, y, scale, bias, kind, off):
        if kind == CLIP:
            g = torch.zeros_like(z)
            if lse_x is not None:
                g += torch.exp(z - lse_x[rs, None])
            if lse_y is not None:
                g += torch.exp(z - lse_y[None, :])
        else:
            g = torch.sigmoid(z)
        g -= diag_w * pos
        if want_sums:
            gdot[rs] = (g * dot).sum(1)
            gsum[rs] = g.sum(1)
        dx[rs] = (cs * (g @ yf)).to(x.dtype)
    return dx, gdot, gsum


# ----------------------------------------------------------------------------- autograd


def _ops(backend: str, device: torch.device):
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "torch":
        return _torch_fwd, _torch_bwd
    if triton is None:
        raise ValueError("contrastive loss backend 'triton' requested but triton is not installed")
    if device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"contrastive loss backend 'triton' needs CUDA tensors (got {device}) "
                         "or TRITON_INTERPRET=1 set before triton is imported")
    return _triton_fwd, _triton_bwd


class ClipLossFunction(torch.autograd.Function):
    """CLIP loss of rows (img, txt) against columns (all_img, all_txt); None columns = the rows."""

    @staticmethod
    def forward(ctx, img, txt, all_img, all_txt, scale, off, backend):
        fwd, ctx.bwd = _ops(backend, img.device)
        cols_img = img if all_img is None else all_img
        cols_txt = txt if all_txt is None else all_txt
        lse_i, loss_i = fwd(img, cols_txt, scale, None, CLIP, off)  # rows: images vs texts
        lse_t, loss_t = fwd(txt, cols_img, scale, None, CLIP, off)  # rows: texts vs images
        ctx.save_for_backward(img, txt, all_img, all_txt, scale, lse_i, lse_t)
        ctx.off = off
        return (loss_i.sum() + loss_t.sum()) / (2 * img.shape[0])

    @staticmethod
    def backward(ctx, grad):
        img, txt, all_img, all_txt, scale, lse_i, lse_t = ctx.saved_tensors
        bwd, off = ctx.bwd, ctx.off
        coef = (grad.float() / (2 * img.shape[0])).reshape(())
        d_all_img = d_all_txt = None
        if all_img is None:  # square: one pass per matrix with G = P_row + P_col - 2I
            d_img, gdot, _ = bwd(img, txt, scale, None, CLIP, 0, lse_i, lse_t, 2.0, coef, True)
            d_txt, _, _ = bwd(txt, img, scale, None, CLIP, 0, lse_t, lse_i, 2.0, coef, False)
            gdot_sum = gdot.sum()
        else:  # local rows against gathered columns: rows and columns of both problems
            d_img, gdot_i, _ = bwd(img, all_txt, scale, None, CLIP, off, lse_i, None, 1.0, coef,
                                   True)
            d_all_txt, _, _ = bwd(all_txt, img, scale, None, CLIP, -off, None, lse_i, 1.0, coef,
                                  False)
            d_txt, gdot_t, _ = bwd(txt, all_img, scale, None, CLIP, off, lse_t, None, 1.0, coef,
                                   True)
            d_all_img, _, _ = bwd(all_img, txt, scale, None, CLIP, -off, None, lse_t, 1.0, coef,
                                  False)
            gdot_sum = gdot_i.sum() + gdot_t.sum()
        d_scale = (coef * gdot_sum).reshape(scale.shape).to(scale.dtype)
        return d_img, d_txt, d_all_img, d_all_txt, d_scale, None, None


class SiglipLossFunction(torch.autograd.Function):
    """SigLIP loss of image rows `img` against text columns `txt`, row i paired with column i + off."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, off, backend):
        fwd, ctx.bwd = _ops(backend, img.device)
        _, rowloss = fwd(img, txt, scale, bias, SIGLIP, off)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.off = off
        return rowloss.sum() / img.shape[0]

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, bias = ctx.saved_tensors
        bwd, off = ctx.bwd, ctx.off
        coef = (grad.float() / img.shape[0]).reshape(())
        d_img, gdot, gsum = bwd(img, txt, scale, bias, SIGLIP, off, None, None, 1.0, coef, True)
        d_txt, _, _ = bwd(txt, img, scale, bias, SIGLIP, -off, None, None, 1.0, coef, False)
        d_scale = (coef * gdot.sum()).reshape(scale.shape).to(scale.dtype)
        d_bias = (coef * gsum.sum()).reshape(bias.shape).to(bias.dtype)
        return d_img, d_txt, d_scale, d_bias, None, None


# ----------------------------------------------------------------------------- public API


def _check_features(image_features, text_features) -> None:
    for name, f in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(f, torch.Tensor) or f.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (N, D) tensor, got "
                             f"{tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__}")
        if f.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} dtype {f.dtype}: expected float32, bfloat16 or float16")
    if image_features.shape != text_features.shape or image_features.shape[0] == 0:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same non-empty (N, D) shape")
    if image_features.dtype != text_features.dtype or image_features.device != text_features.device:
        raise ValueError(f"image_features ({image_features.dtype}, {image_features.device}) and "
                         f"text_features ({text_features.dtype}, {text_features.device}) differ")


def _as_scalar(name: str, value, like: torch.Tensor) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), device=like.device)
    if t.numel() != 1 or not t.is_floating_point() or t.device != like.device:
        raise ValueError(f"{name} must be a one-element float tensor on {like.device}, "
                         f"got shape {tuple(t.shape)} {t.dtype} on {t.device}")
    return t


def _backend(backend: Optional[str]) -> str:
    backend = backend or os.environ.get("MMFUSE_CONTRASTIVE", "auto")
    if backend not in _BACKENDS:
        raise ValueError(f"contrastive loss backend {backend!r}: expected one of {_BACKENDS}")
    return backend


def _contiguous(*ts):
    return [None if t is None else t.contiguous() for t in ts]


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, *,
              distributed: bool = False, local_loss: bool = False, gather_with_grad: bool = False,
              group=None, backend: Optional[str] = None) -> torch.Tensor:
    """Symmetric InfoNCE of (N, D) normalised features; `logit_scale` is the multiplier (exp'd).

    `distributed`: gather features over `group` as OpenCLIP's ClipLoss does (see the module
    docstring for `local_loss` / `gather_with_grad`). `backend`: "auto", "triton" or "torch".
    """
    _check_features(image_features, text_features)
    scale = _as_scalar("logit_scale", logit_scale, image_features)
    img, txt, all_img, all_txt, off = _operands(image_features, text_features, distributed,
                                                local_loss, gather_with_grad, group)
    img, txt, all_img, all_txt = _contiguous(img, txt, all_img, all_txt)
    return ClipLossFunction.apply(img, txt, all_img, all_txt, scale, off, _backend(backend))


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                *, distributed: bool = False, local_loss: bool = False,
                gather_with_grad: bool = False, group=None,
                backend: Optional[str] = None) -> torch.Tensor:
    """Pairwise sigmoid loss of (N, D) normalised features, summed over pairs / rows (OpenCLIP).

    `logit_scale` is the multiplier (callers pass `log_scale.exp()`), `logit_bias` is added as is.
    """
    _check_features(image_features, text_features)
    scale = _as_scalar("logit_scale", logit_scale, image_features)
    bias = _as_scalar("logit_bias", logit_bias, image_features)
    img, txt, _, all_txt, off = _operands(image_features, text_features, distributed, local_loss,
                                          gather_with_grad, group)
    img, txt = _contiguous(img, txt if all_txt is None else all_txt)
    return SiglipLossFunction.apply(img, txt, scale, bias, off, _backend(backend))
