"""What every Hugging Face config.json reader shares: the decision table for fields a reader does
not read itself, the activation names, the reference library's defaults, and reading a required
field with an error naming it; the typed readers (int_field, float_field, bool_field, token_ids)
check types and ranges, so every bad value is a ConfigError naming the file and field.

The reference for what a field means is transformers: a checkpoint computes what transformers'
class for its `model_type` computes, and that class reads a fixed set of fields. Each reader
(decoder/config.py, encoders/config.py) reads those fields itself, implementing each value or
raising a ConfigError naming it. Every other field goes through `screen_fields`:

- NO_EFFECT (metadata, training-only, generation defaults): accepted silently;
- NEUTRAL (fields that change the computation where other architectures read them: a different
  attention, positions, scaling): accepted at the listed values that change nothing, otherwise
  a ConfigError naming field and value, since mmfuse does not implement them;
- anything else is not read by transformers for this model_type either, so it cannot change the
  result: accepted, with one warning per process per set of such fields (`IgnoredFieldsWarning`).
"""
from __future__ import annotations

import math
import warnings

from .errors import ConfigError

# Fields of a Hugging Face config.json that never change what the model computes at inference.
GENERIC_FIELDS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "initializer_range",
    "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "_name_or_path", "model_type", "tie_word_embeddings", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "task_specific_params", "finetuning_task", "prefix", "tokenizer_class", "torchscript",
    "pruned_heads", "tf_legacy_loss", "use_bfloat16", "cross_attention_hidden_size", "add_cross_attention",
    "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
}

# The decision table. NO_EFFECT: accepted silently. NEUTRAL: field -> the values that change
# nothing (anything else is refused by name). Other unread fields: accepted with a warning.
NO_EFFECT = GENERIC_FIELDS | {
    # training only: dropout, initialisation, checkpointing, sharding
    "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
    "initializer_factor", "gradient_checkpointing", "tie_encoder_decoder",
    "_attn_implementation", "_attn_implementation_autoset", "auto_map", "quantization_config_dict",
    # nanotron / trainer bookkeeping carried by published Llama-family configs (SmolLM2)
    "is_llama_config", "rope_interleaved",
}
NEUTRAL = {
    "sliding_window": (None,),            # readers that implement it read it themselves
    "use_sliding_window": (False, None),
    "attn_logit_softcapping": (None, 0, 0.0),
    "final_logit_softcapping": (None, 0, 0.0),
    "query_pre_attn_scalar": (None,),
    "partial_rotary_factor": (None, 1, 1.0),
    "rotary_pct": (None, 1, 1.0),
    "qk_layernorm": (False, None),
    "use_qk_norm": (False, None),
    "use_mrope": (False, None),
    "alibi": (False, None),
    "parallel_attn": (False, None),
    "use_parallel_residual": (False, None),
    "new_decoder_architecture": (False, None),
    "clip_qkv": (None,),
    "num_experts": (None, 0, 1),
    "num_local_experts": (None, 0, 1),
    "moe_intermediate_size": (None, 0),
    "kv_lora_rank": (None,),
    "q_lora_rank": (None,),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "logits_scaling": (None, 1, 1.0),
    "no_rope_layers": (None,),
    "quantization_config": (None,),
}

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}

# transformers' defaults of the fields the readers use, per model_type: a config.json holds only
# the fields that differ from them (SigLIP's and llava's sub-configs rely on them heavily).
HF_DEFAULTS = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=4096,
                    tie_word_embeddings=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, tie_word_embeddings=False),
    "clip_text_model": dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                            num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=49406, eos_token_id=49407),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_text_model": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=1e-6),  # (its token id defaults are CLIP's, unused by SigLIP)
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "idefics3_vision": dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                            layer_norm_eps=1e-6),  # (smolvlm_vision has the same defaults)
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, pad_token_id=0, position_embedding_type="absolute"),
}


class IgnoredFieldsWarning(UserWarning):
    """config.json fields that transformers does not read for this model_type: accepted, unused."""


_warned: set = set()


def with_defaults(cfg: dict, model_type: str) -> dict:
    """`cfg` over transformers' defaults for `model_type` (a config.json omits default values)."""
    return {**HF_DEFAULTS.get(model_type, {}), **cfg}


def screen_fields(cfg: dict, read: set, source: str) -> None:
    """Apply the decision table to the fields of `cfg` outside `read` (those the caller reads and
    checks itself): refuse a NEUTRAL field at a value that changes the computation; warn once per
    process per set of unknown fields."""
    unread = [k for k in cfg if k not in read and k not in NO_EFFECT]
    for k in unread:
        if k in NEUTRAL and not any(_same(cfg[k], v) for v in NEUTRAL[k]):
            raise ConfigError(f"{source}: {k}={cfg[k]!r} changes what the model computes and is not "
                              f"supported by mmfuse")
    ignored = tuple(sorted(k for k in unread if k not in NEUTRAL))
    if ignored and ignored not in _warned:
        _warned.add(ignored)
        warnings.warn(f"{source}: ignoring field(s) that do not change the computation: {list(ignored)}",
                      IgnoredFieldsWarning, stacklevel=3)


def _same(value, neutral) -> bool:
    return value is neutral if neutral is None or isinstance(neutral, bool) else (
        not isinstance(value, bool) and value == neutral)


def need(cfg: dict, key: str, source: str):
    """cfg[key], or a ConfigError naming `source` and the missing field."""
    if cfg.get(key) is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return cfg[key]


MAX_SIZE = 2**31 - 1  # sizes beyond this overflow the int32 index math of the kernels (and memory)
_REQUIRED = object()


def int_field(cfg: dict, key: str, source: str, default=_REQUIRED, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """cfg[key] (or `default` when absent or null) as an int in [minimum, maximum]; a string, a float,
    a bool or a value out of range is a ConfigError naming the field."""
    v = cfg.get(key)
    if v is None:
        if default is _REQUIRED:
            return need(cfg, key, source)  # raises, naming the missing field
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"{source}: {key}={v!r} must be an integer")
    if not minimum <= v <= maximum:
        raise ConfigError(f"{source}: {key}={v} must be in [{minimum}, {maximum}]")
    return v


def float_field(cfg: dict, key: str, source: str, default=_REQUIRED, minimum: float = 0.0,
                strict: bool = False) -> float:
    """cfg[key] (or `default` when absent or null) as a finite float >= minimum (> minimum if
    `strict`); anything else is a ConfigError naming the field."""
    v = cfg.get(key)
    if v is None:
        if default is _REQUIRED:
            return need(cfg, key, source)
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{source}: {key}={v!r} must be a finite number")
    if v < minimum or (strict and v == minimum):
        raise ConfigError(f"{source}: {key}={v} must be {'>' if strict else '>='} {minimum}")
    return float(v)


def bool_field(cfg: dict, key: str, source: str, default: bool) -> bool:
    """cfg[key] (or `default` when absent or null) as a bool; "false", 0 or 1 are ConfigErrors."""
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{source}: {key}={v!r} must be true or false")
    return v


def token_ids(cfg: dict, key: str, source: str) -> tuple:
    """cfg[key] as a tuple of token ids: null, one int >= 0, or a list of them."""
    v = cfg.get(key)
    items = () if v is None else tuple(v) if isinstance(v, list) else (v,)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_SIZE for t in items):
        raise ConfigError(f"{source}: {key}={v!r} must be a token id (int >= 0), a list of them, or null")
    return items


def check_sizes(obj, names, where: str) -> None:
    """Each named attribute of a config dataclass is an int in [1, MAX_SIZE] (configs built in
    code get the same checks as those read from config.json)."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SIZE:
            raise ConfigError(f"{where}: {name}={v!r} must be an integer in [1, {MAX_SIZE}]")
