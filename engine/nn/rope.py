"""Rotary position embeddings: inverse frequencies (default, linear, llama3 scaling) and rotation."""
from __future__ import annotations

import math
from typing import Optional

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, as transformers computes them."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # on the CPU even under a meta-device context
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])  # fields checked by DecoderConfig
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(inv_freq: torch.Tensor, start: int, end: int):
    """cos, sin tables of positions [start, end), each (end - start, head_dim/2) fp32 on inv_freq's device."""
    pos = torch.arange(start, end, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq[None, :]  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by per-position angles; cos/sin are (B, 1, T, D/2) in x's dtype.
    Uses the half-split layout (rotate_half) of Llama checkpoints in transformers."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
