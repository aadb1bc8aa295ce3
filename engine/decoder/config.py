"""DecoderConfig: one dataclass for every supported decoder family, built from a config.json.

The family is selected by fields, not by separate model classes: GPT-2 is learned positions +
LayerNorm + GELU(tanh) + fused Conv1D qkv + tied head; Llama/Mistral/Qwen2 are RoPE + RMSNorm +
SwiGLU + grouped-query attention (+ q/k/v bias for Qwen2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import ConfigError
from ..hf_config import (ACTIVATIONS, bool_field, check_sizes, float_field, int_field, screen_fields, token_ids,
                         with_defaults)

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
        check_sizes(self, ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff",
                           "max_seq_len"), "DecoderConfig")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"unsupported norm {self.norm!r}")
        if self.act not in set(ACTIVATIONS.values()):
            raise ConfigError(f"unsupported activation {self.act!r}")
        if not (isinstance(self.norm_eps, (int, float)) and math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise ConfigError(f"norm_eps={self.norm_eps!r} must be a finite number >= 0")
        if not self.learned_pos:
            if self.head_dim % 2:
                raise ConfigError(f"head_dim={self.head_dim} must be even for rotary position embeddings")
            if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 0):
                raise ConfigError(f"rope_theta={self.rope_theta!r} must be a finite number > 0")
            if self.rope_scaling is not None:
                _check_rope_scaling(self.rope_scaling)

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
        bos = token_ids(cfg, "bos_token_id", source)
        if len(bos) > 1:
            raise ConfigError(f"{source}: bos_token_id={cfg['bos_token_id']!r} must be one token id")
        common = dict(bos_token_id=bos[0] if bos else None, eos_token_ids=token_ids(cfg, "eos_token_id", source),
                      vocab_size=int_field(cfg, "vocab_size", source))
        try:
            if mt == "gpt2":
                return cls._from_gpt2(cfg, source, common)
            return cls._from_llama(cfg, source, mt, common)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None

    def to_hf(self) -> dict:
        """The config.json transformers builds this model from: model_type "gpt2", "llama" or
        "qwen2" (q/k/v bias without an output bias). Mistral is written as Llama (the same model
        once the window covers the context)."""
        act = next(hf for hf, ours in ACTIVATIONS.items() if ours == self.act)
        tokens = {"bos_token_id": self.bos_token_id,
                  "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else
                                   self.eos_token_ids[0] if self.eos_token_ids else None)}
        if self.family == "gpt2":
            gpt2 = dict(learned_pos=True, norm="layernorm", gated_mlp=False, qkv_bias=True, o_bias=True,
                        mlp_bias=True, n_kv_head=self.n_head, head_dim=self.d_model // self.n_head)
            odd = [k for k, v in gpt2.items() if getattr(self, k) != v]
            if odd:
                shown = ", ".join(f"{k}={getattr(self, k)}" for k in odd)
                raise ConfigError(f"a GPT-2 config.json cannot describe {shown}")
            return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": self.vocab_size,
                    "n_positions": self.max_seq_len, "n_embd": self.d_model, "n_layer": self.n_layer,
                    "n_head": self.n_head, "n_inner": self.d_ff, "activation_function": act,
                    "layer_norm_epsilon": self.norm_eps, "tie_word_embeddings": self.tie_embeddings, **tokens}
        llama = dict(learned_pos=False, norm="rmsnorm", gated_mlp=True)
        odd = [k for k, v in llama.items() if getattr(self, k) != v]
        qwen2 = self.qkv_bias and not self.o_bias
        if not qwen2 and self.qkv_bias != self.o_bias:
            odd.append(f"qkv_bias={self.qkv_bias} with o_bias={self.o_bias}")
        if qwen2 and self.mlp_bias:
            odd.append("mlp_bias=True with q/k/v bias only")
        if odd:
            raise ConfigError(f"a Llama/Qwen2 config.json cannot describe {odd}")
        out = {"model_type": "qwen2" if qwen2 else "llama",
               "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
               "vocab_size": self.vocab_size, "hidden_size": self.d_model, "intermediate_size": self.d_ff,
               "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
               "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim, "hidden_act": act,
               "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
               "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
               "tie_word_embeddings": self.tie_embeddings, **tokens}
        if qwen2:
            out["use_sliding_window"] = False
        else:
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return out

    @classmethod
    def _from_gpt2(cls, cfg, source, common):
        act = cfg.get("activation_function", "gelu_new")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported activation_function {act!r}")
        if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
            raise ConfigError(f"{source}: scale_attn_weights=false / scale_attn_by_inverse_layer_idx=true "
                              "are not supported")
        d = int_field(cfg, "n_embd", source)
        h = int_field(cfg, "n_head", source)
        if d % h:
            raise ConfigError(f"{source}: n_embd={d} is not divisible by n_head={h}")
        return cls(n_layer=int_field(cfg, "n_layer", source), n_head=h, n_kv_head=h, d_model=d, head_dim=d // h,
                   d_ff=int_field(cfg, "n_inner", source, default=4 * d),
                   max_seq_len=int_field(cfg, "n_positions", source), family="gpt2", norm="layernorm",
                   norm_eps=float_field(cfg, "layer_norm_epsilon", source, default=1e-5),
                   act=ACTIVATIONS[act], gated_mlp=False, learned_pos=True, qkv_bias=True, o_bias=True,
                   mlp_bias=True, tie_embeddings=bool_field(cfg, "tie_word_embeddings", source, True), **common)

    @classmethod
    def _from_llama(cls, cfg, source, mt, common):
        act = cfg.get("hidden_act", "silu")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}")
        if cfg.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"{source}: pretraining_tp={cfg['pretraining_tp']} is not supported (must be 1)")
        lt = cfg.get("layer_types")
        if lt is not None and (not isinstance(lt, list)
                               or any(t not in ("full_attention", "sliding_attention") for t in lt)):
            raise ConfigError(f"{source}: layer_types {lt!r}: only 'full_attention' and 'sliding_attention' "
                              "(with a window no shorter than the context) are supported")
        context = int_field(cfg, "max_position_embeddings", source, default=2048)
        window = _sliding_window(cfg, mt, source)
        if window is not None and window < context:
            raise ConfigError(f"{source}: sliding_window={window} is shorter than the context "
                              f"max_position_embeddings={context}; sliding-window attention is not supported")
        d = int_field(cfg, "hidden_size", source)
        h = int_field(cfg, "num_attention_heads", source)
        key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
        rope = cfg.get(key) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: {key} must be an object, got {type(rope).__name__}")
        rope = dict(rope)
        theta = float_field(cfg, "rope_theta", source, default=10000.0, strict=True)
        if "rope_theta" in rope:
            theta = float_field(rope, "rope_theta", f"{source}: {key}", strict=True)
            del rope["rope_theta"]
        rtype = rope.pop("rope_type", rope.pop("type", "default"))
        if rtype not in ("default", "linear", "llama3"):
            raise ConfigError(f"{source}: unsupported rope_type {rtype!r} (supported: default, linear, llama3)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"{source}: partial_rotary_factor is not supported")
        scaling = None if rtype == "default" else {"rope_type": rtype, **rope}
        head_dim = int_field(cfg, "head_dim", source, default=None)
        if head_dim is None:
            if d % h:
                raise ConfigError(f"{source}: hidden_size={d} is not divisible by num_attention_heads={h}")
            head_dim = d // h
        bias = bool_field(cfg, "attention_bias", source, False)
        return cls(n_layer=int_field(cfg, "num_hidden_layers", source), n_head=h,
                   n_kv_head=int_field(cfg, "num_key_value_heads", source, default=h), d_model=d,
                   head_dim=head_dim, d_ff=int_field(cfg, "intermediate_size", source),
                   max_seq_len=context, family="llama",
                   norm="rmsnorm", norm_eps=float_field(cfg, "rms_norm_eps", source, default=1e-6),
                   act=ACTIVATIONS[act], gated_mlp=True, learned_pos=False, rope_theta=theta, rope_scaling=scaling,
                   qkv_bias=bias or mt == "qwen2", o_bias=bias, mlp_bias=bool_field(cfg, "mlp_bias", source, False),
                   tie_embeddings=bool_field(cfg, "tie_word_embeddings", source, False), **common)


def _check_rope_scaling(scaling: dict) -> None:
    """The fields `nn.rope.rope_inv_freq` reads, present, finite and in range."""
    rtype = scaling.get("rope_type")
    if rtype not in ("linear", "llama3"):
        raise ConfigError(f"unsupported rope_type {rtype!r} (supported: default, linear, llama3)")
    names = ("factor",) if rtype == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")
    where = f"rope scaling {rtype!r}"
    for name in names:
        if scaling.get(name) is None:
            raise ConfigError(f"{where} needs field {name!r}")
        float_field(scaling, name, where, strict=True)
    if rtype == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ConfigError(f"{where}: high_freq_factor={scaling['high_freq_factor']} must be greater than "
                          f"low_freq_factor={scaling['low_freq_factor']}")


def _sliding_window(cfg: dict, mt: str, source: str) -> Optional[int]:
    """The attention window some layer uses, as transformers decides it, or None (all full)."""
    lt = cfg.get("layer_types")
    if mt == "mistral":
        uses = cfg.get("sliding_window") is not None
    elif lt is not None:
        uses = "sliding_attention" in lt
    elif mt == "qwen2":
        uses = bool_field(cfg, "use_sliding_window", source, False) and int_field(
            cfg, "max_window_layers", source, default=0, minimum=0) < int_field(cfg, "num_hidden_layers", source)
    else:
        uses = False
    return int_field(cfg, "sliding_window", source) if uses else None


# Built-in shapes for benchmarks and `mmfuse bench` (random weights, no download).
PRESETS = {
    "gpt2-124m": DecoderConfig(),
    "llama-1.1b": DecoderConfig(vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, d_model=2048,
                                head_dim=64, d_ff=5632, max_seq_len=2048, family="llama", norm="rmsnorm",
                                norm_eps=1e-5, act="silu", gated_mlp=True, learned_pos=False,
                                qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False),
}
