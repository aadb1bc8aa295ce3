"""What every Hugging Face config.json reader shares: the fields that never change the computation,
the activation names, and reading a required field with an error naming it."""
from __future__ import annotations

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
