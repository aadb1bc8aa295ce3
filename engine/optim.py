"""What the training loops share (`encoders.train` contrastive, `decoder.train` next-token): the
optimisation settings, AdamW with OpenCLIP's decay rule, and warm-up + cosine learning rates."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class OptimConfig:
    steps: int = 1000                 # optimizer steps
    lr: float = 5e-4                  # peak learning rate
    warmup_steps: int = 100           # linear warm-up from 0 to lr, then cosine to min_lr
    min_lr: float = 0.0
    weight_decay: float = 0.2         # on weight matrices only
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: Optional[float] = 1.0  # max global grad norm; None: no clipping
    progress: bool = True             # tqdm bar


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Warm-up then cosine: the learning rate for optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on gains, biases, logit scale/bias: OpenCLIP's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith("logit_") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
