"""The LLaVA-NeXT model: LLaVA's tower and projector run over the base image and the anyres tiles;
each image's features are the base tile's, then the tiles' patch grid with the padding-only rows or
columns cut off and an `image_newline` embedding after each row (transformers' pack_image_features
with "spatial_unpad")."""
from __future__ import annotations

import torch
import torch.nn as nn

from .anyres import tile_grid, unpad_box
from .config import VlmConfig
from .llava import LlavaModel


class LlavaNextModel(LlavaModel):
    def __init__(self, cfg: VlmConfig):
        super().__init__(cfg)
        self.image_newline = nn.Parameter(torch.zeros(cfg.text.d_model))

    def pack(self, features: torch.Tensor, size: tuple) -> torch.Tensor:
        """(1 + rows * cols, T, d) tile features of an image of `size` (h, w) -> (tokens, d)."""
        cfg = self.cfg
        base, tiles = features[0], features[1:]
        if not len(tiles):
            return torch.cat([base, self.image_newline[None].to(base.dtype)])
        s = cfg.grid_side
        rows, cols = tile_grid(size[0], size[1], cfg.grid_pinpoints, cfg.vision.image_size)
        grid = tiles.view(rows, cols, s, s, -1).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, -1)  # (R, C, d)
        top, bottom, left, right = unpad_box(size[0], size[1], rows * s, cols * s)
        grid = grid[top:bottom, left:right]
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([base, torch.cat([grid, newline], dim=1).flatten(0, 1)])
