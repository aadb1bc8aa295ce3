"""What every vision-language model here shares: images -> per-image features (one tower pass
over all tiles of a call, in groups), and a prompt's token embeddings with the image placeholder
rows replaced by those features. A family defines `tile_features` (its tower and projection) and,
when an image's features are more than its tiles' in order, `pack`.

The tower runs over the tiles in groups of at most TOWER_ROWS tokens: its linears are row-wise, so
larger calls gain nothing in arithmetic, and their (rows, 4 * d) MLP activations no longer stay in
cache (bench/README.md, VLM section: 13 SmolVLM tiles in one call are slower per tile than in
groups of two)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

TOWER_ROWS = 2048  # most tokens (tiles x tokens per tile) in one tower call; at least one tile


class MultimodalModel(nn.Module):
    # set by each family: cfg (with image_token_id and text), tower (a VisionTower), decoder

    def tile_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed tiles (N, 3, H, W) -> projected features (N, tokens per tile, d_text)."""
        raise NotImplementedError

    def pack(self, features: torch.Tensor, size: tuple) -> torch.Tensor:
        """One image's tile features (tiles, T, d) -> the features its placeholder tokens take, in order."""
        return features.flatten(0, 1)

    @torch.inference_mode()
    def image_features(self, images: list) -> list:
        """Images (each with `.pixels` (tiles, 3, H, W) and `.size`) -> their features, each (tokens, d_text)."""
        pixels = torch.from_numpy(np.concatenate([im.pixels for im in images])).to(self.tower.pos_embed.device)  # (N, 3, H, W)
        cfg = self.tower.cfg
        per_tile = (cfg.image_size // cfg.patch_size) ** 2 + (self.tower.cls is not None)
        group = max(1, TOWER_ROWS // per_tile)
        tiles = torch.cat([self.tile_features(p) for p in pixels.split(group)])  # (N, T, d)
        return [self.pack(f, im.size) for f, im in zip(tiles.split([len(im.pixels) for im in images]), images)]

    def embed_prompt(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Token ids (T,) with image placeholders and the features (n_placeholders, d) that replace
        them, in order -> input embeddings (T, d)."""
        mask = ids == self.cfg.image_token_id
        safe = ids.masked_fill(mask, 0) if self.cfg.image_token_id >= self.cfg.text.vocab_size else ids
        x = self.decoder.embed(safe)  # (T, d)
        x[mask] = features.to(x.dtype)
        return x
