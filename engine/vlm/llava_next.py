"""The LLaVA-NeXT model: LLaVA's tower and projector run over the base image and the anyres tiles;
each image's features are the base tile's, then the tiles' patch grid with the padding-only rows or
columns cut off and an `image_newline` embedding after each row (transformers' pack_image_features
with "spatial_unpad")."""
from __future__ import annotations

import torch
import torch.nn as nn

from .anyres import pack_order
from .config import VlmConfig
from .llava import LlavaModel


class LlavaNextModel(LlavaModel):
    def __init__(self, cfg: VlmConfig):
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.d_model))

    def pack(self, features: torch.Tensor, size: tuple) -> torch.Tensor:
        """(1 + rows * cols, T, d) tile features of an image of `size` (h, w) -> (tokens, d)."""
        cfg = self.cfg
        table = torch.cat([features.flatten(0, 1), self.image_newline[None].to(features.dtype)])
        order = pack_order(size[0], size[1], len(features), cfg.grid_pinpoints, cfg.vision.image_size, cfg.grid_side,
                           features.shape[1])
        return table[torch.from_numpy(order).to(table.device)]
