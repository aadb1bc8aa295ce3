"""A next-token training loop for mmfuse's `Decoder` (training small models from scratch and
fine-tuning), beside the contrastive loop of `mmfuse.encoders.train`, whose optimizer grouping
(AdamW, no decay on gains and biases) and warm-up + cosine schedule it shares.

A batch is whatever `loss_fn(model, batch)` reads; by default (ids (B, T), labels (B, T)) with
label -100 where no loss is taken (padding, prompts). Save the result with
`mmfuse.decoder.save.save_decoder` (a Hugging Face folder that mmfuse and transformers load).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..optim import OptimConfig, lr_at, make_optimizer
from .transformer import Decoder

IGNORE = -100  # label of positions without a loss


@dataclass
class DecoderTrainConfig(OptimConfig):
    desc: str = "train"               # the progress bar's label


def next_token_loss(model: Decoder, ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean cross-entropy of predicting labels[:, t + 1] at position t. ids (B, T); labels (B, T)
    (default: ids), IGNORE where no loss is taken; embeds (B, T, C) replace the token embeddings."""
    B, T = (ids if embeds is None else embeds).shape[:2]
    labels = ids if labels is None else labels
    positions = torch.arange(T, device=labels.device).expand(B, T)
    logits = model(ids, positions, embeds=embeds)  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def pad_batch(rows, pad_id: int, prompt_lens=None) -> tuple:
    """Token rows -> (ids (B, T) right-padded with pad_id, labels (B, T)): labels are the ids, IGNORE
    on padding and on each row's first prompt_lens[i] tokens."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
        start = prompt_lens[i] if prompt_lens is not None else 0
        labels[i, start:len(r)] = ids[i, start:len(r)]
    return ids, labels


def train_decoder(model: torch.nn.Module, batches: Iterable, cfg: DecoderTrainConfig,
                  loss_fn: Optional[Callable] = None) -> list:
    """Train `model` in place on `batches` for cfg.steps steps; returns the losses. `loss_fn(model,
    batch)` defaults to `next_token_loss(model, *batch)`."""
    if cfg.steps < 1:
        raise ValueError(f"steps={cfg.steps} must be positive")
    loss_fn = loss_fn or (lambda m, b: next_token_loss(m, *b))
    opt = make_optimizer(model, cfg)
    model.train()
    losses = []
    it = iter(batches)
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc=cfg.desc, dynamic_ncols=True)
    for step in bar:
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"the batch iterator ran out after {step} of {cfg.steps} steps") from None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses
