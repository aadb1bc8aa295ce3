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

    fwd: per row, the log-sum-exp of z (CLIP) and the row's loss term, in one pass over y;
    bwd: per row, dx = c * s * G @ y with G = dL/dz recomputed tile by tile from z and the saved
         log-sum-exps, plus the row sums of G * (x . y) and of G (for the scale and bias grads).

For CLIP the single-process backward fuses both softmax directions into one
G = P_row + P_col - 2I. The y side (column log-sum-exps, dy = c * s * G.T @ x) comes either from
the same pass (the "torch" backend: chunked row blocks, O(rows_per_chunk * K) scratch, the default
for CPU tensors) or from the same primitive on the transposed problem (y against x, offset -off:
the "triton" backend in contrastive_triton.py, imported on first use, for CUDA tensors or CPU
tensors under TRITON_INTERPRET=1; no atomics, deterministic). The "_reference" functions below
materialise the logits as OpenCLIP does. Backend "auto" picks triton on CUDA and torch otherwise;
the environment variable MMFUSE_CONTRASTIVE (mmfuse.envs) sets the default.

Distributed: `gather_features` gathers across ranks exactly as OpenCLIP does. With
`distributed=True`, `local_loss=True` each rank computes its local rows against all gathered
columns (labels offset by rank * n); averaging that loss over ranks equals the single-process
loss. OpenCLIP's SigLipLoss (neighbour exchange) equals
`siglip_loss(..., distributed=True, local_loss=True, gather_with_grad=True)`;
`mmfuse.kernels.testing.simulated_local_loss` runs that local path for several ranks in one process.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmfuse import envs
from mmfuse.errors import SettingError

from .backends import require_triton, triton_installed
from .contrastive_kinds import CLIP, SIGLIP

BACKENDS = envs.choices("MMFUSE_CONTRASTIVE")
CHUNK_ELEMENTS = 1 << 22  # torch backend: rows per chunk = this // K (16 MiB of fp32 per buffer),
MIN_CHUNK_ROWS = 512  # but at least this many (CPU GEMMs with fewer rows run 1.5-10x slower)


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


# ----------------------------------------------------------------------------- chunked torch


def _torch_tiles(x, y, scale, bias, kind, off):
    """Yield (row slice, z, (local row, column) index pair of the positives) for row blocks of x.

    z = s * x[rows] @ y.T (+ b) in fp32, (R, K); the caller may overwrite it.
    """
    M, K = x.shape[0], y.shape[0]
    xs = x.float() * float(scale.detach())  # (M, D): the scale folded into the rows, O(N * D)
    yf = y.float()  # (K, D)
    rows_per_chunk = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // K)
    for r0 in range(0, M, rows_per_chunk):
        rs = slice(r0, min(M, r0 + rows_per_chunk))
        z = xs[rs] @ yf.T  # (R, K)
        if kind == SIGLIP:
            z += float(bias.detach())
        rows = torch.arange(rs.start, rs.stop, device=x.device)
        keep = (rows + off >= 0) & (rows + off < K)
        yield rs, z, (rows[keep] - rs.start, rows[keep] + off)


def _positive_logits(z, pos) -> torch.Tensor:
    """(R,) logit of each row's positive pair; 0 for rows whose pair is not among the columns."""
    return torch.zeros(z.shape[0], device=z.device).index_put_((pos[0],), z[pos])


def _torch_fwd(x, y, scale, bias, kind, off, want_col_lse=False):
    """Row log-sum-exps (CLIP), row loss terms and, on request, column log-sum-exps (CLIP)."""
    M, K = x.shape[0], y.shape[0]
    lse = torch.empty((M,), dtype=torch.float32, device=x.device) if kind == CLIP else None
    rowloss = torch.empty((M,), dtype=torch.float32, device=x.device)
    col_max = torch.full((K,), float("-inf"), device=x.device) if want_col_lse else None
    col_sum = torch.zeros(K, device=x.device) if want_col_lse else None
    for rs, z, pos in _torch_tiles(x, y, scale, bias, kind, off):
        zpos = _positive_logits(z, pos)
        if kind == CLIP:
            lse[rs] = torch.logsumexp(z, dim=1)
            rowloss[rs] = lse[rs] - zpos
            if want_col_lse:  # online over row blocks, as the row LSE is over column tiles
                new_max = torch.maximum(col_max, z.amax(0))
                col_sum = col_sum * torch.exp(col_max - new_max) + z.sub_(new_max).exp_().sum(0)
                col_max = new_max
        else:
            rowloss[rs] = F.softplus(z).sum(1) - zpos
    return lse, rowloss, (col_max + torch.log(col_sum) if want_col_lse else None)


def _torch_bwd(x, y, scale, bias, kind, off, lse_x, lse_y, diag_w, coef, want_sums, rowloss=None):
    """dx (and dy = coef * s * G.T @ x, accumulated over the same row blocks) of one problem;
    SigLIP's row loss terms too when `rowloss` is given (forward and backward in one pass)."""
    M = x.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dy = torch.zeros(y.shape, dtype=torch.float32, device=y.device)  # (K, D)
    gdot = torch.empty((M,), dtype=torch.float32, device=x.device) if want_sums else None
    gsum = torch.empty((M,), dtype=torch.float32, device=x.device) if want_sums else None
    xf, yf = x.float(), y.float()
    cs = coef.float() * scale.detach().float()
    for rs, z, pos in _torch_tiles(x, y, scale, bias, kind, off):
        if kind == CLIP:
            g = (z - lse_x[rs, None]).exp_() if lse_x is not None else torch.zeros_like(z)
            if lse_y is not None:
                g += z.sub_(lse_y[None, :]).exp_()
        else:
            if rowloss is not None:
                rowloss[rs] = F.softplus(z).sum(1) - _positive_logits(z, pos)
            g = z.sigmoid_()
        g[pos] -= diag_w
        gy = g @ yf  # (R, D)
        if want_sums:
            gdot[rs] = (gy * xf[rs]).sum(1)  # = sum_j G_ij (x_i . y_j), in O(R * D)
            gsum[rs] = g.sum(1) if kind == SIGLIP else 0.0
        dx[rs] = gy.mul_(cs)
        dy.addmm_(g.T, xf[rs])
    return dx, gdot, gsum, dy.mul_(cs).to(y.dtype)


# ----------------------------------------------------------------------------- autograd


def _ops(backend: str, device: torch.device):
    """(fwd, bwd) primitives of a backend; the Triton module is imported on first use only."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_installed() else "torch"
    if backend == "torch":
        return _torch_fwd, _torch_bwd
    require_triton("contrastive loss backend 'triton'", device)
    from .contrastive_triton import triton_bwd, triton_fwd
    return triton_fwd, triton_bwd


def _grads(bwd, x, y, scale, bias, kind, off, lse_x, lse_y, diag_w, coef):
    """(dx, row sums of G * dot, row sums of G, dy) of one problem; dy from the transposed
    problem when the backend does not accumulate it in the same pass (Triton: no atomics)."""
    dx, gdot, gsum, dy = bwd(x, y, scale, bias, kind, off, lse_x, lse_y, diag_w, coef, True)
    if dy is None:
        dy = bwd(y, x, scale, bias, kind, -off, lse_y, lse_x, diag_w, coef, False)[0]
    return dx, gdot, gsum, dy


class ClipLossFunction(torch.autograd.Function):
    """CLIP loss of rows (img, txt) against columns (all_img, all_txt); None columns = the rows."""

    @staticmethod
    def forward(ctx, img, txt, all_img, all_txt, scale, off, backend):
        fwd, ctx.bwd = _ops(backend, img.device)
        if all_img is None:  # square: the text rows are the columns of the image rows
            lse_i, loss_i, lse_t = fwd(img, txt, scale, None, CLIP, off, True)
            if lse_t is None:
                lse_t, loss_t, _ = fwd(txt, img, scale, None, CLIP, off)
            else:
                loss_t = lse_t - (lse_i - loss_i)  # lse_i - loss_i is the diagonal logit
        else:
            lse_i, loss_i, _ = fwd(img, all_txt, scale, None, CLIP, off)  # images vs all texts
            lse_t, loss_t, _ = fwd(txt, all_img, scale, None, CLIP, off)  # texts vs all images
        ctx.save_for_backward(img, txt, all_img, all_txt, scale, lse_i, lse_t)
        ctx.off = off
        return (loss_i.sum() + loss_t.sum()) / (2 * img.shape[0])

    @staticmethod
    def backward(ctx, grad):
        img, txt, all_img, all_txt, scale, lse_i, lse_t = ctx.saved_tensors
        bwd, off = ctx.bwd, ctx.off
        coef = (grad.float() / (2 * img.shape[0])).reshape(())
        d_all_img = d_all_txt = None
        if all_img is None:  # square: one problem with G = P_row + P_col - 2I
            d_img, gdot, _, d_txt = _grads(bwd, img, txt, scale, None, CLIP, 0, lse_i, lse_t, 2.0,
                                           coef)
            gdot_sum = gdot.sum()
        else:  # local rows against gathered columns: two problems
            d_img, gdot_i, _, d_all_txt = _grads(bwd, img, all_txt, scale, None, CLIP, off, lse_i,
                                                 None, 1.0, coef)
            d_txt, gdot_t, _, d_all_img = _grads(bwd, txt, all_img, scale, None, CLIP, off, lse_t,
                                                 None, 1.0, coef)
            gdot_sum = gdot_i.sum() + gdot_t.sum()
        d_scale = (coef * gdot_sum).reshape(scale.shape).to(scale.dtype)
        return d_img, d_txt, d_all_img, d_all_txt, d_scale, None, None


class SiglipLossFunction(torch.autograd.Function):
    """SigLIP loss of image rows `img` against text columns `txt`, row i paired with column i + off."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, off, backend):
        fwd, ctx.bwd = _ops(backend, img.device)
        n = img.shape[0]
        ctx.eager = None
        if ctx.bwd is _torch_bwd and any(ctx.needs_input_grad[:4]):
            # dL/dz = sigmoid(z) - I needs no global statistic, so the torch backend forms the
            # gradients (for a unit output gradient) in the same pass: 3 matmuls, not 4.
            rowloss = torch.empty((n,), dtype=torch.float32, device=img.device)
            unit = torch.tensor(1.0 / n, device=img.device)
            ctx.eager = _torch_bwd(img, txt, scale, bias, SIGLIP, off, None, None, 1.0, unit, True,
                                   rowloss)
        else:
            _, rowloss, _ = fwd(img, txt, scale, bias, SIGLIP, off)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.off = off
        return rowloss.sum() / n

    @staticmethod
    def backward(ctx, grad):
        img, txt, scale, bias = ctx.saved_tensors
        coef = (grad.float() / img.shape[0]).reshape(())
        if ctx.eager is not None:
            d_img, gdot, gsum, d_txt = ctx.eager
            ctx.eager = None
            g = grad.reshape(())
            d_img, d_txt = d_img * g.to(d_img.dtype), d_txt * g.to(d_txt.dtype)
        else:
            d_img, gdot, gsum, d_txt = _grads(ctx.bwd, img, txt, scale, bias, SIGLIP, ctx.off,
                                              None, None, 1.0, coef)
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
    """The call's backend, else MMFUSE_CONTRASTIVE's; SettingError for an unknown name."""
    backend = backend or envs.MMFUSE_CONTRASTIVE
    if backend not in BACKENDS:
        raise SettingError(f"contrastive loss backend {backend!r}: expected one of {', '.join(BACKENDS)}")
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
