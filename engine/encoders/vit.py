"""The ViT image tower shared by CLIP and SigLIP.

pixels (B, C, H, W) -> patch embedding (a strided conv, no bias in CLIP, computed as one linear
layer over the flattened patches so it shares the CPU GEMM path) -> [class token] +
learned positions -> [pre-LN] -> Transformer blocks (engine/layers.Block) -> pooled feature:
CLIP pools the class token and layer-norms it; SigLIP layer-norms every token and pools them
with a multi-head attention probe (`AttentionPool`, the "MAP head").
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse.kernels import attention
from mmfuse.kernels.cpu_linear import linear

from ..nn.layers import MLP, Block, make_norm
from .config import TowerConfig


class AttentionPool(nn.Module):
    """Multi-head attention pooling: one learned probe query attends over all tokens, then a
    residual MLP (SigLIP's MAP head). `in_proj` holds q, k, v stacked as in nn.MultiheadAttention."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x):  # x: (B, T, C) -> (B, C)
        B, T, C = x.shape
        w, b = self.in_proj.weight, self.in_proj.bias
        q = linear(self.probe, w[:C], b[:C]).view(1, self.n_head, 1, self.head_dim).expand(B, -1, -1, -1)
        kv = linear(x, w[C:], b[C:]).view(B, T, 2, self.n_head, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        y = attention(q, k, v, causal=False)  # (B, H, 1, D)
        y = self.out_proj(y.transpose(1, 2).reshape(B, 1, C))
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class VisionTower(nn.Module):
    """`class_token=True`: CLIP (class token, pre-LN, post-LN on the class token, no conv bias).
    `class_token=False`: SigLIP (conv bias, post-LN on all tokens, attention-pool head)."""

    def __init__(self, cfg: TowerConfig, class_token: bool):
        super().__init__()
        self.cfg, self.class_token = cfg, class_token
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, stride=cfg.patch_size, bias=not class_token)
        self.cls = nn.Parameter(torch.zeros(d)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_positions, d))
        self.norm_pre = make_norm(cfg) if class_token else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_post = make_norm(cfg)
        self.pool = None if class_token else AttentionPool(cfg)

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """The stride-p conv as a linear layer: (B, C, H, W) -> (B, h*w, d), patches in row-major
        order and each flattened as (c, kh, kw) like the conv weight; a remainder is cropped as the
        conv drops it."""
        p, conv = self.cfg.patch_size, self.patch_embed
        B, C, H, W = pixels.shape
        h, w = H // p, W // p
        patches = pixels[:, :, :h * p, :w * p].reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, p, p)
        return linear(patches.reshape(B, h * w, C * p * p), conv.weight.view(conv.out_channels, -1), conv.bias)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W), already preprocessed -> the first layer's input (B, [1 +] N, C)."""
        cfg = self.cfg
        if pixels.dim() != 4 or pixels.shape[1:] != (cfg.num_channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"pixel batch has shape {tuple(pixels.shape)}, expected "
                             f"(B, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size})")
        x = self.embed_patches(pixels.to(self.pos_embed.dtype))  # (B, N, C)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1)  # (B, 1 + N, C)
        x = x + self.pos_embed
        return self.norm_pre(x) if self.norm_pre is not None else x

    def hidden_states(self, pixels: torch.Tensor, layers) -> list:
        """The hidden states (B, T, C) at `layers`, numbered as transformers' `hidden_states` (0: the
        embeddings, i: after block i; negative from the end), running only the blocks needed."""
        n = self.cfg.n_layer
        idx = [i + n + 1 if i < 0 else i for i in layers]
        if any(not 0 <= i <= n for i in idx):
            raise ValueError(f"vision feature layers {list(layers)} are outside 0..{n} (or -{n + 1}..-1)")
        x, states = self.embed(pixels), {}
        states[0] = x
        for i in range(max(idx)):
            x = self.blocks[i](x, causal=False)
            states[i + 1] = x
        return [states[i] for i in idx]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, H, W), already preprocessed -> pooled features (B, d_model)."""
        x = self.embed(pixels)
        for block in self.blocks:
            x = block(x, causal=False)
        if self.pool is None:
            return self.norm_post(x[:, 0])
        return self.pool(self.norm_post(x))
