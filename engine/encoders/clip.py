"""CLIP (Hugging Face `CLIPModel` checkpoints), read like open_clip's `CLIP`: an image tower and a
text tower projected into one embedding space, compared by cosine similarity scaled by
exp(logit_scale).

    model = ClipModel.from_pretrained("path/to/clip")
    img, txt = model(pixels, ids)                  # L2-normalised (B, E) each
    probs = model.scores(model.logits(img, txt))   # softmax over the texts

The towers are vit.py (ViT with a class token, pre- and post-LN) and text.py (causal, pooled at
the end-of-text token); their sizes come from the checkpoint's config.json (config.py). SigLIP
(siglip.py) is this model with other tower options, a biased text projection, a learned logit
bias and sigmoid scores, as in open_clip. Weights load and save through one declarative key table
per family (weights.py), so saved folders load in transformers.
"""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..jsonfile import read_config
from ..errors import ConfigError
from ..files import atomic_path
from ..hf_config import int_field, screen_fields
from ..nn.layers import init_weights
from ..weight_map import KeyTable, load_weights, named_keys, save_weights
from .config import TowerConfig, sub_config, text_tower, vision_tower
from .text import TextTower
from .vit import VisionTower
from .weights import block_keys

# Files of a checkpoint folder besides the weights that a saved model carries along.
ASSETS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
          "preprocessor_config.json")

# Hugging Face keys that CLIP and SigLIP checkpoints name alike, beside the encoder layers:
# our parameter -> theirs, and our module -> theirs (its weight and bias).
SHARED_PARAMS = {"image_tower.pos_embed": "vision_model.embeddings.position_embedding.weight",
                 "text_tower.tok_embed.weight": "text_model.embeddings.token_embedding.weight",
                 "text_tower.pos_embed": "text_model.embeddings.position_embedding.weight",
                 "logit_scale": "logit_scale"}
SHARED_MODULES = {"image_tower.norm_post": "vision_model.post_layernorm",
                  "text_tower.norm_final": "text_model.final_layer_norm"}
# CLIP's own keys.
CLIP_PARAMS = {"image_tower.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
               "image_tower.cls": "vision_model.embeddings.class_embedding",
               "image_proj.weight": "visual_projection.weight", "text_proj.weight": "text_projection.weight"}
CLIP_MODULES = {"image_tower.norm_pre": "vision_model.pre_layrnorm"}

# config.json fields CLIPModel reads at the top level; others are screened by hf_config.
_TOP_FIELDS = {"projection_dim", "logit_scale_init_value", "text_config", "vision_config",
               "text_config_dict", "vision_config_dict", "initializer_factor"}


class ClipModel(nn.Module):
    model_type = "clip"      # config.json model_type this class loads
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

    # ---- embedding and scoring
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, C, H, W) -> projected, unnormalised features (B, E)."""
        return self.image_proj(self.image_tower(pixels))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> projected, unnormalised features (B, E)."""
        return self.text_proj(self.text_tower(ids))

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, normalize: bool = True):
        """(image_emb, text_emb), L2-normalised unless normalize=False."""
        img, txt = self.image_features(pixels), self.text_features(ids)
        if normalize:
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        return img, txt

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (Ni, E), (Nt, E) -> logits_per_image (Ni, Nt)."""
        z = self.logit_scale.exp() * (image_emb @ text_emb.T)
        return z + self.logit_bias if self.logit_bias is not None else z

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-image class probabilities from logits_per_image: a softmax over the classes."""
        return logits.softmax(dim=-1)

    # ---- configuration and weights
    @classmethod
    def parse_config(cls, cfg: dict, source: str) -> tuple[TowerConfig, TowerConfig, int]:
        """The two towers' sizes and the embedding width from a CLIPConfig dict."""
        screen_fields(cfg, _TOP_FIELDS, source)
        vision = vision_tower(sub_config(cfg, "vision_config", source), f"{source} vision_config",
                              "quick_gelu", 1e-5, class_token=True)
        text = text_tower(sub_config(cfg, "text_config", source), f"{source} text_config",
                          "quick_gelu", 1e-5, causal=True)
        return vision, text, int_field(cfg, "projection_dim", source, default=512)

    @classmethod
    def key_table(cls, vision: TowerConfig, text: TowerConfig) -> KeyTable:
        return cls.layer_keys(vision, text) + named_keys(CLIP_PARAMS, CLIP_MODULES)

    @staticmethod
    def layer_keys(vision: TowerConfig, text: TowerConfig) -> KeyTable:
        """The encoder layers' keys and SHARED_*, named alike in CLIP and SigLIP checkpoints."""
        return [*block_keys("image_tower.blocks", "vision_model.encoder.layers", vision.n_layer, "clip"),
                *block_keys("text_tower.blocks", "text_model.encoder.layers", text.n_layer, "clip"),
                *named_keys(SHARED_PARAMS, SHARED_MODULES)]

    def init_logits(self) -> None:
        """The logit scale a model trained from scratch starts with (config's logit_scale_init_value)."""
        with torch.no_grad():
            self.logit_scale.fill_(self.hf_config.get("logit_scale_init_value", math.log(1 / 0.07)))

    @classmethod
    def checked_config(cls, cfg: dict, source: str) -> tuple[TowerConfig, TowerConfig, int]:
        if cfg.get("model_type") != cls.model_type:
            raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not {cls.model_type!r}")
        return cls.parse_config(cfg, source)

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> "ClipModel":
        return cls(cfg, *cls.checked_config(cfg, source))

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu") -> "ClipModel":
        """Load a Hugging Face checkpoint folder (config.json + safetensors)."""
        folder = Path(folder)
        cfg = read_config(folder)
        vision, text, dim = cls.checked_config(cfg, str(folder / "config.json"))
        model = load_weights(lambda: cls(cfg, vision, text, dim), folder, cls.key_table(vision, text),
                             dtype=dtype, device=device)
        return model.eval()

    @classmethod
    def random(cls, cfg: dict, seed: int = 0, dtype=torch.float32, device="cpu") -> "ClipModel":
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


def clip_config(embed_dim: int = 512, image_size: int = 224, patch_size: int = 32, vision_width: int = 768,
                vision_layers: int = 12, vision_heads: int = 12, text_width: int = 512, text_layers: int = 12,
                text_heads: int = 8, vocab_size: int = 49408, context_length: int = 77,
                eos_token_id: int = 49407, pad_token_id: int = 1, act: str = "quick_gelu") -> dict:
    """A Hugging Face CLIPConfig dict (defaults: ViT-B/32) for models trained from scratch."""
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": embed_dim,
        "logit_scale_init_value": math.log(1 / 0.07),
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": vision_width,
                          "intermediate_size": 4 * vision_width, "num_hidden_layers": vision_layers,
                          "num_attention_heads": vision_heads, "image_size": image_size,
                          "patch_size": patch_size, "num_channels": 3, "hidden_act": act, "layer_norm_eps": 1e-5},
        "text_config": {"model_type": "clip_text_model", "hidden_size": text_width,
                        "intermediate_size": 4 * text_width, "num_hidden_layers": text_layers,
                        "num_attention_heads": text_heads, "vocab_size": vocab_size,
                        "max_position_embeddings": context_length, "hidden_act": act, "layer_norm_eps": 1e-5,
                        "bos_token_id": eos_token_id - 1, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id},
    }
