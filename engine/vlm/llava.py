"""The LLaVA model: vision tower -> selected hidden states -> MLP projector -> decoder embeddings.

The decoder is the plain text `Decoder`; a multimodal prompt is its token embeddings with the
rows of image placeholder tokens replaced by projected image features (`embed_prompt`), run
through the same forward as text (prefill into the KV cache), so decoding is unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse.kernels.cpu_linear import linear

from ..decoder.transformer import Decoder
from ..encoders.vit import VisionTower
from .config import VlmConfig
from .multimodal import MultimodalModel


class Projector(nn.Module):
    """linear_1 -> act -> linear_2 (LlavaMultiModalProjector)."""

    def __init__(self, d_in: int, d_out: int, act: str, bias: bool):
        super().__init__()
        self.act = act
        self.linear_1 = nn.Linear(d_in, d_out, bias=bias)
        self.linear_2 = nn.Linear(d_out, d_out, bias=bias)

    def forward(self, x):  # (N, T, d_in) -> (N, T, d_out)
        h = linear(x, self.linear_1.weight, self.linear_1.bias, act=self.act)
        return linear(h, self.linear_2.weight, self.linear_2.bias)


class LlavaModel(MultimodalModel):
    def __init__(self, cfg: VlmConfig):
        super().__init__()
        self.cfg = cfg
        tower = VisionTower(cfg.vision, class_token=cfg.class_token)
        n = cfg.vision.n_layer
        depth = max(i + n + 1 if i < 0 else i for i in cfg.feature_layers)
        tower.blocks = tower.blocks[:depth]  # later blocks, the post-norm and the pooling head are unused
        tower.norm_post = tower.pool = None
        self.tower = tower
        self.projector = Projector(cfg.vision.d_model * len(cfg.feature_layers), cfg.text.d_model,
                                   cfg.projector_act, cfg.projector_bias)
        self.decoder = Decoder(cfg.text)

    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed tiles (N, 3, H, W) -> projected features (N, tokens_per_image, d_text).
        Differentiable (training calls it directly); `image_features` runs it in inference mode."""
        states = self.tower.hidden_states(pixels, self.cfg.feature_layers)  # each (N, T, C_v)
        if self.cfg.drop_first:
            states = [s[:, 1:] for s in states]
        return self.projector(torch.cat(states, dim=-1))
