"""DualEncoder: an image tower and a text tower projected into one embedding space (CLIP, SigLIP).

`ClipModel` and `SiglipModel` differ only in their towers' options, their checkpoint key table
and how similarities become scores (softmax over classes vs independent sigmoids); the rest
(embedding, logits, loading, saving) lives here once.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import read_config
from ..errors import ConfigError
from ..files import atomic_path
from ..nn.layers import init_weights
from ..weight_map import KeyTable, load_weights, module_keys, save_weights
from .config import TowerConfig
from .text import TextTower
from .vit import VisionTower
from .weights import block_keys

# Files of a checkpoint folder besides the weights that a saved model carries along.
ASSETS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
          "preprocessor_config.json")


class DualEncoder(nn.Module):
    model_type = ""          # config.json model_type this class loads
    class_token = True       # image tower flavour (see VisionTower)
    proj_bias = False        # bias on the text projection (SigLIP's text `head`)
    has_bias = False         # learned logit_bias (SigLIP)
    logit_scale_shape: tuple = ()

    def __init__(self, hf_config: dict, vision: TowerConfig, text: TowerConfig, embed_dim: int):
        super().__init__()
        self.hf_config = copy.deepcopy(hf_config)  # written back verbatim by save_pretrained
        self.vision_cfg, self.text_cfg, self.embed_dim = vision, text, embed_dim
        self.image_tower = VisionTower(vision, class_token=self.class_token)
        self.text_tower = TextTower(text)
        self.image_proj = nn.Linear(vision.d_model, embed_dim, bias=False) if self.class_token else nn.Identity()
        self.text_proj = nn.Linear(text.d_model, embed_dim, bias=self.proj_bias)
        self.logit_scale = nn.Parameter(torch.zeros(self.logit_scale_shape))  # log of the multiplier
        self.logit_bias = nn.Parameter(torch.zeros(1)) if self.has_bias else None

    # ---- configuration and weights (per family)
    @classmethod
    def parse_config(cls, cfg: dict, source: str) -> tuple[TowerConfig, TowerConfig, int]:
        raise NotImplementedError

    @classmethod
    def key_table(cls, vision: TowerConfig, text: TowerConfig) -> KeyTable:
        raise NotImplementedError

    @staticmethod
    def tower_keys(vision: TowerConfig, text: TowerConfig) -> KeyTable:
        """The keys CLIP and SigLIP checkpoints name alike: positions, encoder layers, final norms."""
        v, t = "vision_model.", "text_model."
        return [
            ("image_tower.pos_embed", [v + "embeddings.position_embedding.weight"]),
            *block_keys("image_tower.blocks", v + "encoder.layers", vision.n_layer, "clip"),
            *module_keys("image_tower.norm_post", v + "post_layernorm"),
            ("text_tower.tok_embed.weight", [t + "embeddings.token_embedding.weight"]),
            ("text_tower.pos_embed", [t + "embeddings.position_embedding.weight"]),
            *block_keys("text_tower.blocks", t + "encoder.layers", text.n_layer, "clip"),
            *module_keys("text_tower.norm_final", t + "final_layer_norm"),
        ]

    @classmethod
    def checked_config(cls, cfg: dict, source: str) -> tuple[TowerConfig, TowerConfig, int]:
        if cfg.get("model_type") != cls.model_type:
            raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not {cls.model_type!r}")
        return cls.parse_config(cfg, source)

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> "DualEncoder":
        return cls(cfg, *cls.checked_config(cfg, source))

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu") -> "DualEncoder":
        """Load a Hugging Face checkpoint folder (config.json + safetensors)."""
        folder = Path(folder)
        cfg = read_config(folder)
        vision, text, dim = cls.checked_config(cfg, str(folder / "config.json"))
        model = load_weights(lambda: cls(cfg, vision, text, dim), folder, cls.key_table(vision, text),
                             dtype=dtype, device=device)
        return model.eval()

    @classmethod
    def random(cls, cfg: dict, seed: int = 0, dtype=torch.float32, device="cpu") -> "DualEncoder":
        """A randomly initialised model for a Hugging Face-style config dict (training from scratch)."""
        torch.manual_seed(seed)
        model = cls.from_config(cfg)
        init_weights(model)
        for t in (model.image_tower, model.text_tower):
            nn.init.normal_(t.pos_embed, std=0.01)
        if model.image_tower.cls is not None:
            nn.init.normal_(model.image_tower.cls, std=model.vision_cfg.d_model ** -0.5)
        if model.image_tower.pool is not None:
            nn.init.normal_(model.image_tower.pool.probe, std=0.02)
        nn.init.normal_(model.image_tower.patch_embed.weight, std=0.02)
        model.init_logits()
        return model.to(device=device, dtype=dtype)

    def init_logits(self) -> None:
        raise NotImplementedError

    def save_pretrained(self, folder, assets_from=None) -> Path:
        """Write a Hugging Face checkpoint folder that transformers loads as CLIPModel / SiglipModel;
        tokenizer and preprocessor files are copied from `assets_from` when given."""
        folder = save_weights(self, folder, self.key_table(self.vision_cfg, self.text_cfg), self.hf_config)
        if assets_from is not None:
            for name in ASSETS:
                src = Path(assets_from) / name
                if src.is_file():
                    with atomic_path(folder / name) as tmp:
                        shutil.copyfile(src, tmp)
        return folder

    # ---- embedding and scoring
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, C, H, W) -> projected, unnormalised features (B, E)."""
        return self.image_proj(self.image_tower(pixels))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> projected, unnormalised features (B, E)."""
        return self.text_proj(self.text_tower(ids))

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (Ni, E), (Nt, E) -> logits_per_image (Ni, Nt)."""
        z = self.logit_scale.exp() * (image_emb @ text_emb.T)
        return z + self.logit_bias if self.logit_bias is not None else z

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-image class probabilities from logits_per_image."""
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, normalize: bool = True):
        """(image_emb, text_emb), L2-normalised unless normalize=False."""
        img, txt = self.image_features(pixels), self.text_features(ids)
        if normalize:
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        return img, txt
