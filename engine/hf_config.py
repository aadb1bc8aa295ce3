"""What every Hugging Face config.json reader shares: the fields that never change the computation,
the activation names, and reading fields with their types and ranges checked: every bad value is a
ConfigError naming the file and field (never a ZeroDivisionError or TypeError later)."""
from __future__ import annotations

import math

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

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu": "gelu", "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}


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
