"""Save a Llama-family `Decoder` as a Hugging Face folder (config.json + model.safetensors) that
mmfuse and transformers' LlamaForCausalLM load: the key table of `encoders.weights` (our fused
q/k/v and gate/up weights are split into the checkpoint's tensors)."""
from __future__ import annotations

from pathlib import Path

from ..encoders.weights import KeyTable, save_weights
from ..errors import ConfigError
from .config import DecoderConfig
from .transformer import Decoder


def llama_key_table(cfg: DecoderConfig, ours: str = "", body: str = "model.", head: str = "lm_head.") -> KeyTable:
    """(our state-dict name, [checkpoint names]) of a Llama-family decoder whose names start with
    `ours`; `body` / `head` are the checkpoint prefixes (e.g. "model.language_model." in LLaVA)."""
    if cfg.family != "llama" or cfg.n_kv_head != cfg.n_head or cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        raise ConfigError("saving is implemented for bias-free Llama decoders with n_kv_head == n_head "
                          f"(got family={cfg.family!r}, n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head})")
    table = [(ours + "embed.weight", [body + "embed_tokens.weight"]), (ours + "norm_f.weight", [body + "norm.weight"])]
    for i in range(cfg.n_layer):
        b, h = f"{ours}blocks.{i}.", f"{body}layers.{i}."
        table += [(b + "attn.qkv.weight", [h + f"self_attn.{n}_proj.weight" for n in "qkv"]),
                  (b + "attn.o.weight", [h + "self_attn.o_proj.weight"]),
                  (b + "mlp.up.weight", [h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"]),
                  (b + "mlp.down.weight", [h + "mlp.down_proj.weight"]),
                  (b + "norm1.weight", [h + "input_layernorm.weight"]),
                  (b + "norm2.weight", [h + "post_attention_layernorm.weight"])]
    if not cfg.tie_embeddings:
        table.append((ours + "lm_head.weight", [head + "weight"]))
    return table


def llama_config(cfg: DecoderConfig) -> dict:
    """The config.json dict of a Llama decoder (transformers' LlamaConfig fields)."""
    eos = list(cfg.eos_token_ids)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "torch_dtype": "float32"}


def llama_decoder_config(vocab_size: int, d_model: int, n_layer: int, n_head: int, d_ff: int, max_seq_len: int,
                         bos_token_id=None, eos_token_id=None, tie_embeddings: bool = True) -> DecoderConfig:
    """A small bias-free Llama `DecoderConfig` for training from scratch."""
    return DecoderConfig(vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_kv_head=n_head, d_model=d_model,
                         head_dim=d_model // n_head, d_ff=d_ff, max_seq_len=max_seq_len, family="llama",
                         norm="rmsnorm", norm_eps=1e-6, act="silu", gated_mlp=True, learned_pos=False,
                         qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=tie_embeddings,
                         bos_token_id=bos_token_id, eos_token_ids=() if eos_token_id is None else (eos_token_id,))


def save_decoder(model: Decoder, folder) -> Path:
    """Write `model` (a Llama-family Decoder) as a Hugging Face checkpoint folder."""
    return save_weights(model, folder, llama_key_table(model.cfg), llama_config(model.cfg))
