"""CLIP (Hugging Face `CLIPModel` checkpoints): ViT image tower with a class token, causal text
tower with end-of-text pooling, bias-free projections, softmax scores scaled by exp(logit_scale)."""
from __future__ import annotations

import math

import torch

from ..hf_config import int_field, screen_fields
from ..weight_map import module_keys
from .config import sub_config, text_tower, vision_tower
from .dual import DualEncoder

_TOP_FIELDS = {"projection_dim", "logit_scale_init_value", "text_config", "vision_config",
               "text_config_dict", "vision_config_dict", "initializer_factor"}


class ClipModel(DualEncoder):
    model_type = "clip"
    class_token = True

    @classmethod
    def parse_config(cls, cfg, source):
        screen_fields(cfg, _TOP_FIELDS, source)
        vision = vision_tower(sub_config(cfg, "vision_config", source), f"{source} vision_config",
                              "quick_gelu", 1e-5, class_token=True)
        text = text_tower(sub_config(cfg, "text_config", source), f"{source} text_config",
                          "quick_gelu", 1e-5, causal=True)
        return vision, text, int_field(cfg, "projection_dim", source, default=512)

    @classmethod
    def key_table(cls, vision, text):
        v = "vision_model."
        return [
            *cls.tower_keys(vision, text),
            ("image_tower.patch_embed.weight", [v + "embeddings.patch_embedding.weight"]),
            ("image_tower.cls", [v + "embeddings.class_embedding"]),
            *module_keys("image_tower.norm_pre", v + "pre_layrnorm"),
            ("image_proj.weight", ["visual_projection.weight"]),
            ("text_proj.weight", ["text_projection.weight"]),
            ("logit_scale", ["logit_scale"]),
        ]

    def init_logits(self) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(self.hf_config.get("logit_scale_init_value", math.log(1 / 0.07)))

    def scores(self, logits):
        return logits.softmax(dim=-1)


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
