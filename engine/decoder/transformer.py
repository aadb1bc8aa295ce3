"""The Transformer decoder: one implementation whose config selects GPT-2 or Llama-family behaviour."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import CapacityError
from ..nn.layers import Block, init_weights, make_norm, project
from ..nn.rope import rope_inv_freq, rope_tables
from .config import DecoderConfig
from .kv_cache import KVCache
from .weights import save_decoder


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.learned_pos else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if not cfg.learned_pos:
            # RoPE tables grow on demand (`ensure_positions`) to what the KV caches in use hold:
            # a context of 10^8 positions would otherwise cost gigabytes per table up front. They
            # start empty on the CPU, real even when the model is built on the meta device by a
            # loader, and move to the weights' device as they grow.
            self.rope_inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # (D/2,) CPU
            empty = torch.zeros(0, cfg.head_dim // 2, device="cpu")  # (T, D/2) fp32
            self.register_buffer("rope_cos", empty, persistent=False)
            self.register_buffer("rope_sin", empty.clone(), persistent=False)
            self._rope_lock = threading.Lock()

    @classmethod
    def random(cls, cfg: DecoderConfig, dtype=torch.float32, device="cpu", seed: int = 0) -> "Decoder":
        """A randomly initialised model (benchmarks, `mmfuse bench`)."""
        torch.manual_seed(seed)
        model = cls(cfg)
        init_weights(model)
        return model.to(device=device, dtype=dtype).eval()

    def ensure_positions(self, n: int) -> None:
        """Extend the RoPE tables to cover positions [0, n) (at least doubling them, at most to the
        context). Rows once built never change, so readers on other threads stay correct."""
        if self.pos_embed is not None or self.rope_cos.shape[0] >= n:
            return
        if n > self.cfg.max_seq_len:
            raise CapacityError(f"position {n - 1} is beyond the model's context of {self.cfg.max_seq_len} positions")
        with self._rope_lock:
            have = self.rope_cos.shape[0]
            if have >= n:
                return
            size = min(self.cfg.max_seq_len, max(n, 2 * have, 64))
            cos, sin = rope_tables(self.rope_inv_freq, have, size)  # (size - have, D/2) each, fp32
            dev = self.norm_f.weight.device
            self.rope_cos = torch.cat([self.rope_cos.to(dev, torch.float32), cos.to(dev)])
            self.rope_sin = torch.cat([self.rope_sin.to(dev, torch.float32), sin.to(dev)])

    def save_pretrained(self, folder) -> Path:
        """A Hugging Face checkpoint folder (config.json + model.safetensors, written atomically)
        that transformers' AutoModelForCausalLM and `load_decoder` load as this model."""
        return save_decoder(self, folder)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: Optional[KVCache] = None,
                kv_len: Optional[torch.Tensor] = None, logits_index: Optional[torch.Tensor] = None,
                embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits for token ids (B, T) at absolute positions (B, T).

        With a cache, each layer writes this call's keys/values at `positions` (`KVCache.update`)
        and attention covers the cache up to `kv_len` (B,); positions[:, 0] is each row's first
        query position. Prefill, decode and multi-token verification are the same call. `logits_index` (B,) picks one
        position per row for the LM head (e.g. the last prompt token), giving (B, 1, V). `embeds`
        (B, T, C), when given, replaces the token embeddings (e.g. image features spliced into a
        multimodal prompt); `ids` may then be None.
        """
        x = self.embed(ids) if embeds is None else embeds.to(self.embed.weight.dtype)  # (B, T, C)
        B, T = x.shape[:2]
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
            rope = None
        else:
            self.ensure_positions(cache.max_len if cache is not None else int(positions.max()) + 1)
            cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # (B, 1, T, D/2)
            sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
            rope = (cos, sin)
        q_start = positions[:, 0] if cache is not None else None
        for i, block in enumerate(self.blocks):
            x = block(x, causal=True, rope=rope, cache=cache, layer=i, positions=positions, kv_len=kv_len,
                      q_start=q_start)
        if logits_index is not None:
            x = x[torch.arange(B, device=x.device), logits_index].unsqueeze(1)  # (B, 1, C)
        return project(self.lm_head, self.norm_f(x))
