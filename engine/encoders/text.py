"""The Transformer text tower of CLIP and SigLIP.

ids (B, T) -> token + learned position embeddings -> pre-LN blocks (causal for CLIP,
bidirectional for SigLIP) -> final LayerNorm -> one pooled token per row:

- CLIP pools the end-of-text token. Exactly as transformers: with the legacy config value
  eos_token_id == 2 it takes the argmax of the ids (EOT has the largest id in CLIP's vocabulary);
  otherwise the first occurrence of the configured eos id. Right padding after EOT never reaches
  it through the causal mask, so no padding mask is needed.
- SigLIP pools the last position, padding included (it was trained with max-length padding and
  no attention mask), so its texts are always padded to the full context.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn.layers import Block, make_norm
from .config import TowerConfig


class TextTower(nn.Module):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_positions, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_final = make_norm(cfg)

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) index of the pooled token of each row (CLIP; SigLIP pools the last position)."""
        if self.cfg.eos_token_id == 2 or self.cfg.eos_token_id is None:
            return ids.argmax(dim=-1)
        return (ids == self.cfg.eos_token_id).int().argmax(dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) with T <= context length -> pooled features (B, d_model)."""
        B, T = ids.shape
        if T > self.cfg.max_positions:
            raise ValueError(f"text of {T} tokens exceeds the context length {self.cfg.max_positions}")
        x = self.tok_embed(ids) + self.pos_embed[:T]  # (B, T, C)
        for block in self.blocks:
            x = block(x, causal=self.cfg.causal)
        x = x[torch.arange(B, device=ids.device), self.pool_index(ids)] if self.cfg.causal else x[:, -1]  # (B, C)
        return self.norm_final(x)
