"""The decoder's key tables: our parameter names <-> Hugging Face checkpoint keys, per family.

GPT-2 stores its linear layers as Conv1D ([in, out]: transposed both ways) with q/k/v already
fused; Llama/Mistral/Qwen2 store q/k/v and gate/up separately (concatenated into our fused
`qkv` and `up`, q/k/v in unequal parts under grouped-query attention). A tied head has no entry:
it is the embedding. The same table loads a checkpoint (`loader`) and saves one (`save_decoder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.nn as nn

from ..errors import ConfigError
from ..weight_map import KeyEntry, KeyTable, checkpoint_tensors, entries, module_keys, write_checkpoint
from .config import DecoderConfig


def gpt2_table(cfg: DecoderConfig, body: str = "transformer.", head: str = "lm_head.") -> KeyTable:
    """GPT-2 names under `body` (e.g. "transformer." or "" in old exports) and `head`."""
    table = [KeyEntry("embed.weight", (body + "wte.weight",)), KeyEntry("pos_embed.weight", (body + "wpe.weight",)),
             *module_keys("norm_f", body + "ln_f")]
    for i in range(cfg.n_layer):
        h, b = f"{body}h.{i}.", f"blocks.{i}."
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.o", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            table += module_keys(b + ours, h + theirs, transpose=True)  # Conv1D is [in, out]
        table += module_keys(b + "norm1", h + "ln_1") + module_keys(b + "norm2", h + "ln_2")
    if not cfg.tie_embeddings:
        table.append(KeyEntry("lm_head.weight", (head + "weight",)))
    return table


def llama_table(cfg: DecoderConfig, body: str = "model.", head: str = "lm_head.") -> KeyTable:
    """Llama / Mistral / Qwen2 names under `body` (e.g. "model." or "model.language_model.") and `head`."""
    qo, kvo = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    table = [KeyEntry("embed.weight", (body + "embed_tokens.weight",)),
             KeyEntry("norm_f.weight", (body + "norm.weight",))]

    def linear(ours, theirs, sizes, bias):
        for p in ("weight", "bias") if bias else ("weight",):
            table.append(KeyEntry(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs), sizes))

    for i in range(cfg.n_layer):
        h, b = f"{body}layers.{i}.", f"blocks.{i}."
        a, m = h + "self_attn.", h + "mlp."
        linear(b + "attn.qkv", (a + "q_proj", a + "k_proj", a + "v_proj"), (qo, kvo, kvo), cfg.qkv_bias)
        linear(b + "attn.o", (a + "o_proj",), None, cfg.o_bias)
        linear(b + "mlp.up", (m + "gate_proj", m + "up_proj"), (cfg.d_ff, cfg.d_ff), cfg.mlp_bias)
        linear(b + "mlp.down", (m + "down_proj",), None, cfg.mlp_bias)
        table += [KeyEntry(b + "norm1.weight", (h + "input_layernorm.weight",)),
                  KeyEntry(b + "norm2.weight", (h + "post_attention_layernorm.weight",))]
    if not cfg.tie_embeddings:
        table.append(KeyEntry("lm_head.weight", (head + "weight",)))
    return table


def decoder_table(cfg: DecoderConfig, body: Optional[str] = None, head: str = "lm_head.") -> KeyTable:
    """The family's table as `KeyEntry`s; `body` defaults to transformers' own prefix ("transformer." / "model.")."""
    if cfg.family == "gpt2":
        return entries(gpt2_table(cfg, "transformer." if body is None else body, head))
    return entries(llama_table(cfg, "model." if body is None else body, head))


def save_decoder(model: nn.Module, folder) -> Path:
    """Write config.json and model.safetensors (transformers' names, the model's dtype) that
    transformers' AutoModelForCausalLM and mmfuse load as this model; each file atomically."""
    table, state = decoder_table(model.cfg), model.state_dict()
    quantized = [e.ours for e in table if e.ours not in state]  # a quantized module holds packed tensors instead
    if quantized:
        raise ConfigError(f"save_pretrained writes float checkpoints; this model has quantized modules "
                          f"({quantized[:3]}): use mmfuse.quant.save_quantized")
    config = model.cfg.to_hf()
    config["torch_dtype"] = str(state["embed.weight"].dtype).removeprefix("torch.")
    return write_checkpoint(folder, checkpoint_tensors(state, table), config)
