"""The Idefics3 / SmolVLM model: a SigLIP-style tower (all layers, then the post-LN on every
token) -> pixel shuffle (each scale_factor x scale_factor block of patches becomes one token with
scale_factor^2 times the channels) -> one linear projection -> the Llama decoder's embeddings.

Tiles are always the tower's full image size (the processor makes them so), so the tower's
position ids are the plain 0..N-1 that transformers' bucketed NaViT positions reduce to."""
from __future__ import annotations

import torch
import torch.nn as nn

from mmfuse.kernels.cpu_linear import linear

from ..decoder.transformer import Decoder
from ..encoders.vit import VisionTower
from .config import Idefics3Config
from .multimodal import MultimodalModel


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(N, S*S, C) patch features on an S x S grid -> (N, S*S / scale^2, C * scale^2), each token the
    channels of a scale x scale block in transformers' order (Idefics3Connector.pixel_shuffle)."""
    n, seq, c = x.shape
    s = int(seq ** 0.5)
    x = x.view(n, s, s // scale, c * scale).permute(0, 2, 1, 3)
    x = x.reshape(n, s // scale, s // scale, c * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(n, seq // scale ** 2, c * scale * scale)


class Idefics3Model(MultimodalModel):
    def __init__(self, cfg: Idefics3Config):
        super().__init__()
        self.cfg = cfg
        tower = VisionTower(cfg.vision, class_token=False)
        tower.pool = None  # no pooling head
        self.tower = tower
        self.proj = nn.Linear(cfg.vision.d_model * cfg.scale_factor ** 2, cfg.text.d_model, bias=False)
        self.decoder = Decoder(cfg.text)

    @torch.inference_mode()
    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tiles (N, 3, H, W) -> projected features (N, tokens_per_tile, d_text)."""
        x = self.tower.hidden_states(pixels, (-1,))[0]  # (N, T, C_v)
        x = pixel_shuffle(self.tower.norm_post(x), self.cfg.scale_factor)
        return linear(x, self.proj.weight)
