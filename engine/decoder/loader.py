"""Load a Hugging Face decoder checkpoint folder into `Decoder`, tensor by tensor, in the target dtype.

The model is built on the meta device (no memory), each checkpoint tensor is read from the
memory-mapped safetensors, cast to the target dtype and device, converted to our layout (GPT-2's
[in, out] Conv1D transposed; Llama's q/k/v and gate/up fused), and assigned.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, read_config, resolve_dtype
from ..device import check_device
from ..errors import CheckpointError
from .config import DecoderConfig
from .transformer import Decoder


def _gpt2_tensors(ck: Checkpoint, cfg: DecoderConfig, take):
    p = "transformer." if "transformer.wte.weight" in ck else ""
    d, V = cfg.d_model, cfg.vocab_size
    sd = {"embed.weight": take(p + "wte.weight", (V, d)),
          "pos_embed.weight": take(p + "wpe.weight", (cfg.max_seq_len, d)),
          "norm_f.weight": take(p + "ln_f.weight", (d,)), "norm_f.bias": take(p + "ln_f.bias", (d,))}
    for i in range(cfg.n_layer):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        for ours, theirs, (n_in, n_out) in (("attn.qkv", "attn.c_attn", (d, 3 * d)), ("attn.o", "attn.c_proj", (d, d)),
                                            ("mlp.up", "mlp.c_fc", (d, cfg.d_ff)), ("mlp.down", "mlp.c_proj", (cfg.d_ff, d))):
            sd[b + ours + ".weight"] = take(h + theirs + ".weight", (n_in, n_out)).t().contiguous()  # Conv1D is [in, out]
            sd[b + ours + ".bias"] = take(h + theirs + ".bias", (n_out,))
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            sd[b + ours + ".weight"] = take(h + theirs + ".weight", (d,))
            sd[b + ours + ".bias"] = take(h + theirs + ".bias", (d,))
    return sd, ("lm_head.weight" if not cfg.tie_embeddings else None)


def _llama_tensors(ck: Checkpoint, cfg: DecoderConfig, take):
    d, V, hd, F = cfg.d_model, cfg.vocab_size, cfg.head_dim, cfg.d_ff
    qo, kvo = cfg.n_head * hd, cfg.n_kv_head * hd
    sd = {"embed.weight": take("model.embed_tokens.weight", (V, d)), "norm_f.weight": take("model.norm.weight", (d,))}
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        sd[b + "attn.qkv.weight"] = torch.cat([take(a + "q_proj.weight", (qo, d)), take(a + "k_proj.weight", (kvo, d)),
                                               take(a + "v_proj.weight", (kvo, d))])
        if cfg.qkv_bias:
            sd[b + "attn.qkv.bias"] = torch.cat([take(a + "q_proj.bias", (qo,)), take(a + "k_proj.bias", (kvo,)),
                                                 take(a + "v_proj.bias", (kvo,))])
        sd[b + "attn.o.weight"] = take(a + "o_proj.weight", (d, qo))
        if cfg.o_bias:
            sd[b + "attn.o.bias"] = take(a + "o_proj.bias", (d,))
        m = h + "mlp."
        sd[b + "mlp.up.weight"] = torch.cat([take(m + "gate_proj.weight", (F, d)), take(m + "up_proj.weight", (F, d))])
        sd[b + "mlp.down.weight"] = take(m + "down_proj.weight", (d, F))
        if cfg.mlp_bias:
            sd[b + "mlp.up.bias"] = torch.cat([take(m + "gate_proj.bias", (F,)), take(m + "up_proj.bias", (F,))])
            sd[b + "mlp.down.bias"] = take(m + "down_proj.bias", (d,))
        sd[b + "norm1.weight"] = take(h + "input_layernorm.weight", (d,))
        sd[b + "norm2.weight"] = take(h + "post_attention_layernorm.weight", (d,))
    return sd, ("lm_head.weight" if not cfg.tie_embeddings else None)


def load_decoder(folder, dtype="auto", device="cpu") -> Decoder:
    """Build a `Decoder` from a checkpoint folder (config.json + safetensors). dtype "auto": the
    checkpoint's own (config.json `dtype`/`torch_dtype`)."""
    folder = Path(folder)
    device = check_device(device)
    hf = read_config(folder)
    cfg = DecoderConfig.from_hf(hf, source=str(folder / "config.json"))
    dtype = resolve_dtype(dtype, hf)
    ck = Checkpoint(folder)
    model = decoder_from_checkpoint(ck, cfg, dtype=dtype, device=device)
    ck.finish(ignore=DECODER_IGNORED[cfg.family])
    return model


# Checkpoint tensors a decoder family stores but never uses (buffers of old exports).
DECODER_IGNORED = {"gpt2": (".attn.bias", ".attn.masked_bias"), "llama": (".rotary_emb.inv_freq",)}


def decoder_from_checkpoint(ck: Checkpoint, cfg: DecoderConfig, dtype="fp32", device="cpu",
                            prefix: str = "", head_prefix: str = "") -> Decoder:
    """Take a decoder's tensors out of an open checkpoint (the caller reports unused tensors).

    `prefix` / `head_prefix` replace the leading "model." / "lm_head." of the Llama-family names
    when the decoder is part of a larger model (e.g. "model.language_model." and "lm_head." in
    a LLaVA folder)."""
    dtype = resolve_dtype(dtype)

    def name(key):
        if prefix and key.startswith("model."):
            return prefix + key[len("model."):]
        if head_prefix and key.startswith("lm_head."):
            return head_prefix + key[len("lm_head."):]
        return key

    def take(key, shape):
        return ck.take(name(key), shape, dtype=dtype, device=device)

    convert = _gpt2_tensors if cfg.family == "gpt2" else _llama_tensors
    sd, head_key = convert(ck, cfg, take)
    if head_key is not None:
        sd["lm_head.weight"] = take(head_key, (cfg.vocab_size, cfg.d_model))
    elif name("lm_head.weight") in ck:
        take("lm_head.weight", (cfg.vocab_size, cfg.d_model))  # a tied head stored twice: same values

    with torch.device("meta"):
        model = Decoder(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{ck.folder}: internal key mapping mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if not cfg.learned_pos:  # buffers created on meta: real (empty) ones, grown on use
        model.rope_cos = torch.zeros(0, cfg.head_dim // 2, device=device)
        model.rope_sin = torch.zeros(0, cfg.head_dim // 2, device=device)
    return model.eval()
