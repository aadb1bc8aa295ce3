"""Transformer building blocks shared by the decoder and the encoders.

Each module reads its sizes from a config object with the fields of `DecoderConfig` (d_model,
n_head, n_kv_head, head_dim, d_ff, norm, norm_eps, act, gated_mlp, qkv_bias, o_bias, mlp_bias,
prenorm), so encoders reuse them with configs of their own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from mmfuse.kernels import attention
from mmfuse.kernels.activations import activation
from mmfuse.kernels.cpu_linear import linear

from .rope import apply_rope


def project(lin: nn.Module, x: torch.Tensor, act: Optional[str] = None) -> torch.Tensor:
    """act(lin(x)): an `nn.Linear` through the CPU kernels, any other module (a quantized linear)
    through its own `forward(x, act)`."""
    if isinstance(lin, nn.Linear):
        return linear(x, lin.weight, lin.bias, act)
    return lin(x, act=act)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg, dim: Optional[int] = None) -> nn.Module:
    dim = cfg.d_model if dim is None else dim
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


class MLP(nn.Module):
    """up -> act -> down, or SwiGLU-style act(gate) * up -> down with gate and up fused in one matmul."""

    def __init__(self, cfg):
        super().__init__()
        self.act, self.gated = cfg.act, cfg.gated_mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff * (2 if cfg.gated_mlp else 1), bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            gate, up = project(self.up, x).chunk(2, dim=-1)
            h = activation(self.act, gate) * up
        else:
            h = project(self.up, x, act=self.act)  # fused on the CPU where it can be
        return project(self.down, h)


class SelfAttention(nn.Module):
    """Multi-head / grouped-query self-attention with one fused q/k/v projection.

    With a KV cache, the cache writes the new keys/values of layer `layer` at `positions` and
    attention runs over what it returns (`kv_len` says how much of it is valid); without one it runs
    over this call's keys only (encoders, cache-free scoring).
    """

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.o_bias)

    def forward(self, x, *, causal: bool, rope=None, cache=None, layer: int = 0, positions=None, kv_len=None,
                q_start=None):
        B, T, _ = x.shape
        qkv = project(self.qkv, x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, positions)  # (B, Hkv, T_max, D) each
        y = attention(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len)  # (B, Hq, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return project(self.o, y)


class Block(nn.Module):
    """One Transformer layer: pre-LN (x + attn(norm(x))) or post-LN (norm(x + attn(x))), BERT-style."""

    def __init__(self, cfg):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1 = make_norm(cfg)
        self.attn = SelfAttention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, **attn_kwargs):
        if self.prenorm:
            x = x + self.attn(self.norm1(x), **attn_kwargs)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_kwargs))
        return self.norm2(x + self.mlp(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2-style random init for benchmarks and tests of the engine itself."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


__all__ = ["project", "RMSNorm", "make_norm", "activation", "MLP", "SelfAttention", "Block", "init_weights"]
