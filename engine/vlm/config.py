"""VlmConfig: a LLaVA-style vision-language model from its config.json (`model_type: llava`).

A ViT tower (CLIP or SigLIP) gives per-patch hidden states at `feature_layers`; they are
concatenated along the channels, optionally stripped of their first token, and a two-layer MLP
projects them to the text model's width. The decoder (Llama / Mistral / Qwen2) reads them in
place of the image placeholder tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..decoder.config import DecoderConfig
from ..encoders.config import TowerConfig, sub_config, vision_tower
from ..errors import ConfigError
from ..hf_config import ACTIVATIONS, screen_fields

_LLAVA_FIELDS = {"vision_config", "text_config", "image_token_index", "image_token_id", "image_seq_length",
                 "projector_hidden_act", "vision_feature_select_strategy", "vision_feature_layer",
                 "multimodal_projector_bias", "ignore_index", "vocab_size"}
_TOWERS = {"clip_vision_model": (True, "quick_gelu", 1e-5), "siglip_vision_model": (False, "gelu_pytorch_tanh", 1e-6)}


@dataclass
class VlmConfig:
    vision: TowerConfig              # the ViT tower (its pooling head, if any, is not used)
    class_token: bool                # CLIP tower (class token first) vs SigLIP (patches only)
    text: DecoderConfig              # the language model
    image_token_id: int              # placeholder id whose embeddings the image features replace
    feature_layers: tuple            # tower hidden states used (transformers' numbering: 0 = embeddings)
    drop_first: bool                 # vision_feature_select_strategy "default": drop each state's first token
    projector_act: str               # activation between the projector's two linear layers
    projector_bias: bool

    @property
    def tokens_per_image(self) -> int:
        """Image placeholder tokens (and projected features) per image."""
        return self.vision.max_positions - int(self.drop_first)

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "VlmConfig":
        if cfg.get("model_type") != "llava":
            raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not a supported vision-language "
                              "model (supported: 'llava')")
        screen_fields(cfg, _LLAVA_FIELDS, source)
        vcfg = dict(sub_config(cfg, "vision_config", f"{source}"))
        vtype = vcfg.get("model_type", "clip_vision_model")
        if vtype not in _TOWERS:
            raise ConfigError(f"{source}: vision_config model_type {vtype!r} is not supported "
                              f"(supported: {sorted(_TOWERS)})")
        class_token, act, eps = _TOWERS[vtype]
        vcfg.pop("vision_use_head", None)  # the pooling head is never used by a VLM
        vision = vision_tower(vcfg, f"{source} vision_config", act, eps, class_token=class_token)
        tcfg = dict(sub_config(cfg, "text_config", source))
        tcfg.setdefault("model_type", "llama")
        if tcfg["model_type"] not in ("llama", "mistral", "qwen2"):
            raise ConfigError(f"{source}: text_config model_type {tcfg['model_type']!r} is not supported "
                              "(supported: llama, mistral, qwen2)")
        text = DecoderConfig.from_hf(tcfg, source=f"{source} text_config")
        layers = cfg.get("vision_feature_layer", -2)
        layers = tuple(layers) if isinstance(layers, list) else (layers,)
        n = vision.n_layer
        if not layers or any(not isinstance(i, int) or not -(n + 1) <= i <= n for i in layers):
            raise ConfigError(f"{source}: vision_feature_layer={cfg.get('vision_feature_layer')!r} must be layer "
                              f"indices in -{n + 1}..{n}")
        strategy = cfg.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ConfigError(f"{source}: vision_feature_select_strategy={strategy!r} is not supported "
                              "(supported: default, full)")
        act = cfg.get("projector_hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported projector_hidden_act {act!r}")
        image_token = cfg.get("image_token_id", cfg.get("image_token_index", 32000))
        if not isinstance(image_token, int) or image_token < 0:
            raise ConfigError(f"{source}: image_token_index={image_token!r} is not a token id")
        return cls(vision=vision, class_token=class_token, text=text, image_token_id=image_token,
                   feature_layers=layers, drop_first=strategy == "default", projector_act=ACTIVATIONS[act],
                   projector_bias=bool(cfg.get("multimodal_projector_bias", True)))
