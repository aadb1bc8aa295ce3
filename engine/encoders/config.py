"""TowerConfig: the sizes of one encoder tower (ViT image tower, CLIP/SigLIP text tower, BERT).

It carries the fields `engine/layers.py` reads from `DecoderConfig` (so `Block`, `SelfAttention`,
`MLP` and `make_norm` build encoder layers unchanged) plus the encoder-specific ones. Built from
the sub-configs of a Hugging Face config.json by `clip_towers`, `siglip_towers` and `bert_tower`;
unknown fields and unsupported values are errors, as in `DecoderConfig.from_hf`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from ..hf_config import ACTIVATIONS, check_sizes, float_field, int_field, screen_fields, with_defaults


@dataclass
class TowerConfig:
    # --- fields read by engine/layers.py (same meaning as in DecoderConfig)
    d_model: int = 768
    n_head: int = 12
    n_kv_head: int = 12              # encoders never group heads: always n_head
    head_dim: int = 64
    d_ff: int = 3072
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    act: str = "quick_gelu"          # "gelu_tanh" | "gelu" | "quick_gelu" | "silu" | "relu"
    gated_mlp: bool = False
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    prenorm: bool = True             # CLIP/SigLIP are pre-LN, BERT is post-LN
    # --- encoder fields
    n_layer: int = 12
    max_positions: int = 77          # text: context length; image: number of patch (+ class) tokens
    vocab_size: int = 0              # text towers only
    type_vocab_size: int = 0         # BERT token type embeddings (0: none)
    image_size: int = 0              # image towers only: square input side in pixels
    patch_size: int = 0
    num_channels: int = 3
    causal: bool = False             # CLIP's text tower is causal
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        check_sizes(self, ("d_model", "n_head", "n_kv_head", "head_dim", "d_ff", "n_layer", "max_positions",
                           "num_channels"), "TowerConfig")
        if self.image_size or self.patch_size:
            check_sizes(self, ("image_size", "patch_size"), "TowerConfig")
        if self.n_head * self.head_dim != self.d_model:
            raise ConfigError(f"hidden size {self.d_model} is not divisible by {self.n_head} attention heads")
        if self.image_size and self.image_size % self.patch_size:
            raise ConfigError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.act not in set(ACTIVATIONS.values()):
            raise ConfigError(f"unsupported activation {self.act!r}")


# The fields transformers' tower classes read; all others go through hf_config.screen_fields.
_TOWER_FIELDS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act",
                 "layer_norm_eps"}
# (a CLIP tower's own projection_dim is unused: CLIPModel reads the top-level one)
_VIT_FIELDS = _TOWER_FIELDS | {"num_channels", "image_size", "patch_size", "projection_dim"}
_TEXT_FIELDS = _TOWER_FIELDS | {"vocab_size", "max_position_embeddings", "projection_dim"}
_BERT_FIELDS = _TOWER_FIELDS | {"vocab_size", "max_position_embeddings", "type_vocab_size", "position_embedding_type"}


def _act(cfg: dict, default: str, source: str) -> str:
    name = cfg.get("hidden_act", default)
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ConfigError(f"{source}: unsupported hidden_act {name!r}")
    return ACTIVATIONS[name]


def _common(cfg: dict, source: str, default_act: str, default_eps: float) -> dict:
    d, h = int_field(cfg, "hidden_size", source), int_field(cfg, "num_attention_heads", source)
    if d % h:
        raise ConfigError(f"{source}: hidden_size={d} is not divisible by num_attention_heads={h}")
    return dict(d_model=d, n_head=h, n_kv_head=h, head_dim=d // h, d_ff=int_field(cfg, "intermediate_size", source),
                n_layer=int_field(cfg, "num_hidden_layers", source), act=_act(cfg, default_act, source),
                norm_eps=float_field(cfg, "layer_norm_eps", source, default=default_eps))


def _side(cfg: dict, key: str, source: str) -> int:
    v = cfg.get(key)
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ConfigError(f"{source}: non-square {key}={v} is not supported")
        v = v[0]
    return int_field({key: v}, key, source)


def vision_tower(cfg: dict, source: str, default_act: str, default_eps: float, class_token: bool) -> TowerConfig:
    """ViT image tower of CLIP (class token) or SigLIP (no class token)."""
    screen_fields(cfg, _VIT_FIELDS | ({"vision_use_head"} if not class_token else set()), source)
    cfg = with_defaults(cfg, "clip_vision_model" if class_token else "siglip_vision_model")
    if not class_token and cfg.get("vision_use_head", True) is False:
        raise ConfigError(f"{source}: vision_use_head=false (no pooled image embedding) is not supported")
    size, patch = _side(cfg, "image_size", source), _side(cfg, "patch_size", source)
    n = (size // patch) ** 2 + int(class_token)
    if size % patch:
        raise ConfigError(f"{source}: image_size={size} is not a multiple of patch_size={patch}")
    channels = int_field(cfg, "num_channels", source, default=3)
    if channels != 3:
        raise ConfigError(f"{source}: num_channels={channels} is not supported (images are preprocessed to RGB)")
    return TowerConfig(image_size=size, patch_size=patch, num_channels=channels,
                       max_positions=n, **_common(cfg, source, default_act, default_eps))


def text_tower(cfg: dict, source: str, default_act: str, default_eps: float, causal: bool,
               extra: set = frozenset()) -> TowerConfig:
    """Transformer text tower of CLIP (causal, EOT pooling) or SigLIP (bidirectional, last token)."""
    screen_fields(cfg, _TEXT_FIELDS | extra, source)
    cfg = with_defaults(cfg, "clip_text_model" if causal else "siglip_text_model")
    vocab = int_field(cfg, "vocab_size", source)
    return TowerConfig(vocab_size=vocab, max_positions=int_field(cfg, "max_position_embeddings", source),
                       causal=causal, pad_token_id=_token_id(cfg, "pad_token_id", source, vocab, None),
                       eos_token_id=_token_id(cfg, "eos_token_id", source, vocab, None),
                       **_common(cfg, source, default_act, default_eps))


def bert_tower(cfg: dict, source: str) -> TowerConfig:
    """BERT-family text encoder: post-LN, token type embeddings, absolute positions."""
    if cfg.get("model_type") not in ("bert",):
        raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not a BERT encoder")
    screen_fields(cfg, _BERT_FIELDS, source)
    cfg = with_defaults(cfg, "bert")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{source}: position_embedding_type={cfg['position_embedding_type']!r} is not supported")
    vocab = int_field(cfg, "vocab_size", source)
    return TowerConfig(vocab_size=vocab, max_positions=int_field(cfg, "max_position_embeddings", source),
                       type_vocab_size=int_field(cfg, "type_vocab_size", source, default=2), prenorm=False,
                       pad_token_id=_token_id(cfg, "pad_token_id", source, vocab, 0),
                       **_common(cfg, source, "gelu", 1e-12))


def _token_id(cfg: dict, key: str, source: str, vocab: int, default):
    """A special token id of a text tower: absent/null gives `default`, else an int in [0, vocab)."""
    return int_field(cfg, key, source, default=default, minimum=0, maximum=vocab - 1)


def sub_config(cfg: dict, key: str, source: str) -> dict:
    sub = cfg.get(key)
    if not isinstance(sub, dict):
        raise ConfigError(f"{source}: missing {key!r} object")
    return sub
