"""A next-token training loop for mmfuse's `Decoder` (training small models from scratch and
fine-tuning), beside the contrastive loop of `mmfuse.encoders.train`, whose optimizer grouping
(AdamW, no decay on gains and biases) and warm-up + cosine schedule it shares.

A batch is whatever `loss_fn(model, batch)` reads; by default (ids (B, T), labels (B, T)) with
label -100 where no loss is taken (padding, prompts). Save the result with
`Decoder.save_pretrained` (a Hugging Face folder that mmfuse and transformers load).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..optim import OptimConfig, lr_at, make_optimizer
from .config import DecoderConfig
from .transformer import Decoder

IGNORE = -100  # label of positions without a loss


def llama_decoder_config(vocab_size: int, d_model: int, n_layer: int, n_head: int, d_ff: int, max_seq_len: int,
                         bos_token_id=None, eos_token_id=None, tie_embeddings: bool = True) -> DecoderConfig:
    """A small bias-free Llama `DecoderConfig` for training from scratch."""
    return DecoderConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, d_model=d_model,
                         head_dim=d_model // n_head, d_ff=d_ff, max_seq_len=max_seq_len, family="llama",
                         norm="rmsnorm", norm_eps=1e-6, act="silu", gated_mlp=True, learned_pos=False,
                         qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=tie_embeddings,
                         bos_token_id=bos_token_id, eos_token_ids=() if eos_token_id is None else (eos_token_id,))


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
