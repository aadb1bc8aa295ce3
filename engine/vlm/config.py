"""Configs of the vision-language families, from their config.json.

VlmConfig (`model_type` llava, llava_next): a ViT tower (CLIP or SigLIP) gives per-patch hidden
states at `feature_layers`; they are concatenated along the channels, optionally stripped of their
first token, and a two-layer MLP projects them to the text model's width. The decoder (Llama /
Mistral / Qwen2) reads them in place of the image placeholder tokens. llava_next adds "anyres"
tiling over `grid_pinpoints` (see anyres.py).

Idefics3Config (`model_type` idefics3, smolvlm): a SigLIP-style tower without pooling head, a
pixel-shuffle connector (`scale_factor`) and one linear projection, a Llama text model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..decoder.config import DecoderConfig
from ..encoders.config import TowerConfig, sub_config, vision_tower
from ..errors import ConfigError
from ..hf_config import ACTIVATIONS, int_field, screen_fields, with_defaults

_LLAVA_FIELDS = {"image_grid_pinpoints", "vision_config", "text_config", "image_token_index", "image_token_id", "image_seq_length",
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
    grid_pinpoints: Optional[tuple] = None  # llava_next: the (height, width) tilings; None: plain llava

    @property
    def tokens_per_image(self) -> int:
        """Image placeholder tokens (and projected features) per image."""
        return self.vision.max_positions - int(self.drop_first)

    @property
    def grid_side(self) -> int:
        """Patches per side of one tile."""
        return self.vision.image_size // self.vision.patch_size

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "VlmConfig":
        if cfg.get("model_type") not in ("llava", "llava_next"):
            raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not a llava model")
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
        pinpoints = None
        if cfg["model_type"] == "llava_next":
            pinpoints = cfg.get("image_grid_pinpoints", DEFAULT_PINPOINTS)
            side = vision.image_size
            if not (isinstance(pinpoints, list) and pinpoints and all(
                    isinstance(p, (list, tuple)) and len(p) == 2 and all(
                        isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 2**14 and x % side == 0 for x in p)
                    for p in pinpoints)):
                raise ConfigError(f"{source}: image_grid_pinpoints={pinpoints!r} must be a list of [height, width] "
                                  f"pairs, multiples of the tower's image_size {side}")
            pinpoints = tuple(tuple(p) for p in pinpoints)
        return cls(vision=vision, class_token=class_token, text=text, image_token_id=image_token,
                   feature_layers=layers, drop_first=strategy == "default", projector_act=ACTIVATIONS[act],
                   projector_bias=bool(cfg.get("multimodal_projector_bias", True)), grid_pinpoints=pinpoints)


DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LlavaNextConfig's default
_IDEFICS3_TOWERS = {"idefics3_vision", "smolvlm_vision", "idefics3", "smolvlm"}
_IDEFICS3_FIELDS = {"vision_config", "text_config", "image_token_id", "scale_factor", "_pad_token_id", "vocab_size"}


@dataclass
class Idefics3Config:
    vision: TowerConfig              # the SigLIP-style tower (all layers, then the post-LN on every token)
    text: DecoderConfig              # the Llama text model
    image_token_id: int              # placeholder id whose embeddings the image features replace
    scale_factor: int                # pixel shuffle: scale_factor^2 neighbouring patches become one token

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens (and features) per tile: (image_size / patch_size)^2 / scale_factor^2."""
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.scale_factor ** 2

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "Idefics3Config":
        kind = cfg.get("model_type")
        if kind not in ("idefics3", "smolvlm"):
            raise ConfigError(f"{source}: model_type {kind!r} is not an idefics3 / smolvlm model")
        screen_fields(cfg, _IDEFICS3_FIELDS, source)
        vcfg = dict(sub_config(cfg, "vision_config", source))
        vtype = vcfg.pop("model_type", f"{kind}_vision")
        if vtype not in _IDEFICS3_TOWERS:  # published SmolVLM folders write the outer model_type here
            raise ConfigError(f"{source}: vision_config model_type {vtype!r} is not supported "
                              f"(supported: {sorted(_IDEFICS3_TOWERS)})")
        vision = vision_tower(with_defaults(vcfg, "idefics3_vision"), f"{source} vision_config", "gelu_pytorch_tanh",
                              1e-6, class_token=False)
        tcfg = dict(sub_config(cfg, "text_config", source))
        tcfg.setdefault("model_type", "llama")
        tcfg.setdefault("rms_norm_eps", 1e-5)  # Idefics3Config's default for its text model
        if tcfg["model_type"] != "llama":
            raise ConfigError(f"{source}: text_config model_type {tcfg['model_type']!r} is not supported "
                              "(supported: llama)")
        text = DecoderConfig.from_hf(tcfg, source=f"{source} text_config")
        scale = int_field(cfg, "scale_factor", source, default=2, minimum=1, maximum=64)
        side = vision.image_size // vision.patch_size
        if side % scale:
            raise ConfigError(f"{source}: scale_factor={scale} does not divide the {side}x{side} patch grid")
        image_token = int_field(cfg, "image_token_id", source, default=128257, minimum=0)
        return cls(vision=vision, text=text, image_token_id=image_token, scale_factor=scale)


def vlm_config(cfg: dict, source: str = "config.json"):
    """The config of a vision-language checkpoint, by its model_type."""
    kind = cfg.get("model_type")
    if kind in ("llava", "llava_next"):
        return VlmConfig.from_hf(cfg, source)
    if kind in ("idefics3", "smolvlm"):
        return Idefics3Config.from_hf(cfg, source)
    raise ConfigError(f"{source}: model_type {kind!r} is not a supported vision-language model "
                      "(supported: llava, llava_next, idefics3, smolvlm)")
