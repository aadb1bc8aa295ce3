"""A minimal contrastive trainer for CLIP / SigLIP models (natural-language supervision).

AdamW (no weight decay on gains, biases and the logit scale/bias, as OpenCLIP), linear warm-up then
cosine decay, logit_scale clamped at ln(100) after every step, gradient accumulation, bf16/fp16
autocast on CUDA, a tqdm progress bar, and checkpoints written as Hugging Face folders
(`save_pretrained`) that transformers loads as CLIPModel / SiglipModel.

Gradient accumulation follows OpenCLIP's `accum_freq`: a global batch is split into micro-batches;
their features are first computed without gradients, then each micro-batch is recomputed with
gradients and its loss is taken against the features of the WHOLE global batch, so every pair
still sees all global-batch negatives and the summed gradient equals that of one big batch.
The loss itself is `mmfuse.kernels.clip_loss` / `siglip_loss` (never holding the N x N logits).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmfuse.kernels import clip_loss, siglip_loss

from ..optim import OptimConfig, lr_at, make_optimizer
from .clip import ClipModel


@dataclass
class TrainConfig(OptimConfig):
    accum_steps: int = 1              # micro-batches per optimizer step
    max_logit_scale: float = math.log(100.0)  # logit_scale (a log) is clamped to [0, ln 100]
    precision: str = "auto"           # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    save_every: int = 0               # checkpoint every N steps (0: only at the end)
    out_dir: Optional[str] = None     # where checkpoints go (step-XXXXXX/ and final/)
    assets_from: Optional[str] = None # folder whose tokenizer/preprocessor files each checkpoint gets


def contrastive_loss(model: ClipModel, img: torch.Tensor, txt: torch.Tensor, live_scale: bool = True):
    """The model family's loss on normalised features; `live_scale=False` detaches scale and bias."""
    scale = model.logit_scale.exp()
    bias = model.logit_bias
    if not live_scale:
        scale = scale.detach()
        bias = None if bias is None else bias.detach()
    if bias is None:
        return clip_loss(img, txt, scale.reshape(()))
    return siglip_loss(img, txt, scale.reshape(()), bias.reshape(()))


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), None
    if device.type != "cuda":
        raise ValueError(f"precision={precision!r} (mixed precision) needs a CUDA device; got {device}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"unknown precision {precision!r}: expected auto, fp32, bf16 or fp16")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


def _features(model, pixels, ids):
    img, txt = model(pixels, ids, normalize=False)
    return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)


def train_step(model: ClipModel, pixels: torch.Tensor, ids: torch.Tensor, cfg: TrainConfig, autocast,
               scaler=None) -> float:
    """Forward/backward of one global batch split into cfg.accum_steps micro-batches; returns the loss."""
    micro_px, micro_ids = pixels.chunk(cfg.accum_steps), ids.chunk(cfg.accum_steps)
    if cfg.accum_steps == 1:
        with autocast:
            loss = contrastive_loss(model, *_features(model, pixels, ids))
        (scaler.scale(loss) if scaler else loss).backward()
        return loss.item()
    with torch.no_grad(), autocast:
        cached = [_features(model, p, t) for p, t in zip(micro_px, micro_ids)]
    loss_value = 0.0
    for j, (p, t) in enumerate(zip(micro_px, micro_ids)):
        with autocast:
            img_j, txt_j = _features(model, p, t)
            img = torch.cat([c[0] if i != j else img_j for i, c in enumerate(cached)])
            txt = torch.cat([c[1] if i != j else txt_j for i, c in enumerate(cached)])
            loss = contrastive_loss(model, img, txt, live_scale=(j == 0))
        (scaler.scale(loss) if scaler else loss).backward()
        loss_value = loss.item()
    return loss_value


def tensor_batches(pixels: torch.Tensor, ids: torch.Tensor, batch_size: int, seed: int = 0) -> Iterator:
    """Endless shuffled (pixels, ids) batches over in-memory tensors (dropping the ragged tail)."""
    if len(pixels) != len(ids):
        raise ValueError(f"{len(pixels)} images but {len(ids)} captions")
    if batch_size > len(pixels):
        raise ValueError(f"batch_size={batch_size} exceeds the dataset size {len(pixels)}")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(pixels), generator=g)
        for s in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[s:s + batch_size]
            yield pixels[idx], ids[idx]


def train(model: ClipModel, batches: Iterable, cfg: TrainConfig) -> list[float]:
    """Train `model` in place on (pixels (B, 3, H, W), ids (B, T)) global batches; returns the losses."""
    if cfg.steps < 1 or cfg.accum_steps < 1:
        raise ValueError(f"steps={cfg.steps} and accum_steps={cfg.accum_steps} must be positive")
    device = next(model.parameters()).device
    autocast, scaler = _autocast(device, cfg.precision)
    opt = make_optimizer(model, cfg)
    model.train()
    losses = []
    it = iter(batches)
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc="train", dynamic_ncols=True)
    for step in bar:
        try:
            pixels, ids = next(it)
        except StopIteration:
            raise ValueError(f"the batch iterator ran out after {step} of {cfg.steps} steps") from None
        if len(pixels) % cfg.accum_steps:
            raise ValueError(f"batch of {len(pixels)} is not divisible by accum_steps={cfg.accum_steps}")
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss = train_step(model, pixels.to(device), ids.to(device), cfg, autocast, scaler)
        if scaler is not None:
            scaler.unscale_(opt)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, cfg.max_logit_scale)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if cfg.out_dir and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            model.save_pretrained(Path(cfg.out_dir) / f"step-{step + 1:06d}", assets_from=cfg.assets_from)
    model.eval()
    if cfg.out_dir:
        model.save_pretrained(Path(cfg.out_dir) / "final", assets_from=cfg.assets_from)
    return losses
