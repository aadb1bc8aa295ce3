"""DecoderConfig: one dataclass for every supported decoder family, built from a config.json.

The family is selected by fields, not by separate model classes: GPT-2 is learned positions +
LayerNorm + GELU(tanh) + fused Conv1D qkv + tied head; Llama/Mistral/Qwen2 are RoPE + RMSNorm +
SwiGLU + grouped-query attention (+ q/k/v bias for Qwen2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from ..hf_config import ACTIVATIONS, need, screen_fields, with_defaults

# The fields transformers' class for each model_type reads; the readers below implement each one or
# refuse its value by name. Every other field goes through hf_config.screen_fields.
_GPT2_FIELDS = {
    "activation_function", "n_embd", "n_head", "n_inner", "n_layer", "n_positions", "n_ctx",
    "layer_norm_epsilon", "reorder_and_upcast_attn", "scale_attn_by_inverse_layer_idx",
    "scale_attn_weights", "summary_activation", "summary_first_dropout", "summary_proj_to_labels",
    "summary_type", "summary_use_proj", "vocab_size",
}

_LLAMA_FIELDS = {
    "attention_bias", "head_dim", "hidden_act", "hidden_size", "intermediate_size",
    "max_position_embeddings", "mlp_bias", "num_attention_heads", "num_hidden_layers",
    "num_key_value_heads", "pretraining_tp", "rms_norm_eps", "rope_parameters", "rope_scaling",
    "rope_theta", "vocab_size", "layer_types",
}

_FAMILY_FIELDS = {"gpt2": _GPT2_FIELDS, "llama": _LLAMA_FIELDS, "mistral": _LLAMA_FIELDS | {"sliding_window"},
                  "qwen2": _LLAMA_FIELDS | {"sliding_window", "use_sliding_window", "max_window_layers"}}

# Multimodal checkpoints whose config.json wraps a decoder: not loadable as a text decoder.
_WRAPPERS = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm",
             "mllama", "paligemma"}


@dataclass
class DecoderConfig:
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12                 # query heads
    n_kv_head: int = 12              # key/value heads (< n_head: grouped-query attention)
    d_model: int = 768
    head_dim: int = 64               # usually d_model // n_head; Llama-family configs may set it
    d_ff: int = 3072                 # MLP hidden width
    max_seq_len: int = 1024          # the model's context (positions table or RoPE range)
    family: str = "gpt2"             # "gpt2" | "llama": checkpoint key layout
    norm: str = "layernorm"          # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    act: str = "gelu_tanh"           # "gelu_tanh" | "gelu" | "quick_gelu" | "silu" | "relu"
    gated_mlp: bool = False          # SwiGLU-style gate * up (Llama) vs plain up -> act -> down (GPT-2)
    learned_pos: bool = True         # GPT-2 position table; False means RoPE
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear"|"llama3", "factor": ..., ...}
    qkv_bias: bool = True            # bias on the q/k/v projection
    o_bias: bool = True              # bias on the attention output projection
    mlp_bias: bool = True
    prenorm: bool = True             # decoders are pre-LN; encoders such as BERT are post-LN
    tie_embeddings: bool = True      # lm_head shares the token embedding
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = field(default_factory=tuple)

    def __post_init__(self):
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"unsupported norm {self.norm!r}")
        if self.act not in set(ACTIVATIONS.values()):
            raise ConfigError(f"unsupported activation {self.act!r}")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache per token per sequence, at 1 byte per element (multiply by itemsize)."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "DecoderConfig":
        """Build from a Hugging Face config dict. Fields are decided by `hf_config.screen_fields`;
        unsupported values are ConfigErrors naming the field."""
        mt = cfg.get("model_type")
        if mt in _WRAPPERS:
            raise ConfigError(f"{source}: model_type {mt!r} is a vision-language model, not a text decoder "
                              f"(its text_config describes the decoder inside it)")
        if mt not in _FAMILY_FIELDS:
            raise ConfigError(f"{source}: unknown or unsupported model_type {mt!r} "
                              f"(supported: {sorted(_FAMILY_FIELDS)})")
        screen_fields(cfg, _FAMILY_FIELDS[mt], source)
        cfg = with_defaults(cfg, mt)
        if cfg.get("add_cross_attention"):
            raise ConfigError(f"{source}: add_cross_attention=true is not supported")
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        common = dict(bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos,
                      vocab_size=need(cfg, "vocab_size", source))
        if mt == "gpt2":
            return cls._from_gpt2(cfg, source, common)
        return cls._from_llama(cfg, source, mt, common)

    @classmethod
    def _from_gpt2(cls, cfg, source, common):
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported activation_function {act!r}")
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
            raise ConfigError(f"{source}: scale_attn_weights=false / scale_attn_by_inverse_layer_idx=true "
                              "are not supported")
        d = need(cfg, "n_embd", source)
        h = need(cfg, "n_head", source)
        if d % h:
            raise ConfigError(f"{source}: n_embd={d} is not divisible by n_head={h}")
        return cls(n_layer=need(cfg, "n_layer", source), n_head=h, n_kv_head=h, d_model=d, head_dim=d // h,
                   d_ff=cfg.get("n_inner") or 4 * d, max_seq_len=need(cfg, "n_positions", source),
                   family="gpt2", norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                   act=ACTIVATIONS[act], gated_mlp=False, learned_pos=True, qkv_bias=True, o_bias=True,
                   mlp_bias=True, tie_embeddings=cfg.get("tie_word_embeddings", True), **common)

    @classmethod
    def _from_llama(cls, cfg, source, mt, common):
        act = cfg.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}")
        if cfg.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported (must be 1)")
        lt = cfg.get("layer_types")
        if lt is not None and any(t not in ("full_attention", "sliding_attention") for t in lt):
            raise ConfigError(f"{source}: layer_types {sorted(set(lt) - {'full_attention'})} are not supported")
        context = cfg.get("max_position_embeddings", 2048)
        window = _sliding_window(cfg, mt, source)
        if window is not None and window < context:
            raise ConfigError(f"{source}: sliding_window={window} is shorter than the context "
                              f"max_position_embeddings={context}; sliding-window attention is not supported")
        d = need(cfg, "hidden_size", source)
        h = need(cfg, "num_attention_heads", source)
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rtype = rope.pop("rope_type", rope.pop("type", "default"))
        if rtype not in ("default", "linear", "llama3"):
            raise ConfigError(f"{source}: unsupported rope_type {rtype!r} (supported: default, linear, llama3)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor is not supported")
        scaling = None if rtype == "default" else {"rope_type": rtype, **rope}
        bias = bool(cfg.get("attention_bias", False))
        return cls(n_layer=need(cfg, "num_hidden_layers", source), n_head=h,
                   n_kv_head=cfg.get("num_key_value_heads") or h, d_model=d,
                   head_dim=cfg.get("head_dim") or d // h, d_ff=need(cfg, "intermediate_size", source),
                   max_seq_len=context, family="llama", norm="rmsnorm",
                   norm_eps=cfg.get("rms_norm_eps", 1e-6), act=ACTIVATIONS[act], gated_mlp=True,
                   learned_pos=False, rope_theta=float(theta), rope_scaling=scaling,
                   qkv_bias=bias or mt == "qwen2", o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
                   tie_embeddings=cfg.get("tie_word_embeddings", False), **common)


def _sliding_window(cfg: dict, mt: str, source: str) -> Optional[int]:
    """The attention window some layer uses, as transformers decides it, or None (all full)."""
    lt = cfg.get("layer_types")
    if mt == "mistral":
        uses = cfg.get("sliding_window") is not None
    elif lt is not None:
        uses = "sliding_attention" in lt
    elif mt == "qwen2":
        uses = bool(cfg.get("use_sliding_window")) and cfg.get("max_window_layers", 0) < need(
            cfg, "num_hidden_layers", source)
    else:
        uses = False
    return need(cfg, "sliding_window", source) if uses else None


# Built-in shapes for benchmarks and `mmfuse bench` (random weights, no download).
PRESETS = {
    "gpt2-124m": DecoderConfig(),
    "llama-1.1b": DecoderConfig(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048,
                                head_dim=64, d_ff=5632, max_seq_len=2048, family="llama", norm="rmsnorm",
                                norm_eps=1e-5, act="silu", gated_mlp=True, learned_pos=False,
                                qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False),
}
