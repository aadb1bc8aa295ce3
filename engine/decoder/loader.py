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
from ..errors import CheckpointError, ConfigError
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
    return sd, ("lm_head.weight" if not cfg.tie_embeddings else None), {}


def _llama_tensors(ck: Checkpoint, cfg: DecoderConfig, take, fused=None):
    """State dict in our names; `fused(prefixes, widths, n_in)` may return a quantized module for a
    (fused) linear, which is then kept out of the dict and returned in the last item."""
    d, V, hd, F = cfg.d_model, cfg.vocab_size, cfg.head_dim, cfg.d_ff
    qo, kvo = cfg.n_head * hd, cfg.n_kv_head * hd
    sd = {"embed.weight": take("model.embed_tokens.weight", (V, d)), "norm_f.weight": take("model.norm.weight", (d,))}
    modules = {}

    def linear(ours, prefixes, widths, n_in, has_bias):
        q = fused(prefixes, widths, n_in) if fused is not None else None
        if q is not None:
            modules[ours] = q
            return
        sd[ours + ".weight"] = torch.cat([take(p + ".weight", (w, n_in)) for p, w in zip(prefixes, widths)])
        if has_bias:
            sd[ours + ".bias"] = torch.cat([take(p + ".bias", (w,)) for p, w in zip(prefixes, widths)])

    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        a, m = h + "self_attn.", h + "mlp."
        linear(b + "attn.qkv", [a + "q_proj", a + "k_proj", a + "v_proj"], (qo, kvo, kvo), d, cfg.qkv_bias)
        linear(b + "attn.o", [a + "o_proj"], (d,), qo, cfg.o_bias)
        linear(b + "mlp.up", [m + "gate_proj", m + "up_proj"], (F, F), d, cfg.mlp_bias)
        linear(b + "mlp.down", [m + "down_proj"], (d,), F, cfg.mlp_bias)
        sd[b + "norm1.weight"] = take(h + "input_layernorm.weight", (d,))
        sd[b + "norm2.weight"] = take(h + "post_attention_layernorm.weight", (d,))
    return sd, ("lm_head.weight" if not cfg.tie_embeddings else None), modules


def load_decoder(folder, dtype="auto", device="cpu", quantize=None) -> Decoder:
    """Build a `Decoder` from a checkpoint folder (config.json + safetensors). dtype "auto": the
    checkpoint's own (config.json `dtype`/`torch_dtype`).

    Quantized checkpoints (GPTQ, AWQ, mmfuse's own) load as such; `quantize` (a `QuantConfig` or
    "int8" / "int4" ...) quantizes a float checkpoint's weights at load time."""
    from ..quant import QuantConfig, quantize_decoder
    from ..quant.quantize_model import METHOD, load_mmfuse
    from ..quant.published import parse_published, published_quant

    folder = Path(folder)
    device = check_device(device)
    hf = read_config(folder)
    qc = published_quant(folder, hf)
    config = {k: v for k, v in hf.items() if k != "quantization_config"}
    cfg = DecoderConfig.from_hf(config, source=str(folder / "config.json"))
    dtype = resolve_dtype(dtype, hf)
    qcfg = QuantConfig.parse(quantize)
    if qc is not None and qcfg is not None:
        raise ConfigError(f"{folder}: the checkpoint is already quantized ({qc.get('quant_method')}); "
                          "drop quantize=")
    if qc is not None and qc.get("quant_method") == METHOD:
        return load_mmfuse(folder, cfg, qc, dtype=dtype, device=device)
    spec = None if qc is None else parse_published(qc, str(folder / "config.json"))
    if spec is not None and cfg.family == "gpt2":
        raise ConfigError(f"{folder}: {spec.method} checkpoints are read for the Llama and Qwen2 families, not GPT-2")
    ck = Checkpoint(folder)
    model = decoder_from_checkpoint(ck, cfg, dtype=dtype, device=device, spec=spec)
    ck.finish(ignore=DECODER_IGNORED[cfg.family])
    if qcfg is not None:
        quantize_decoder(model, qcfg)
    return model


# Checkpoint tensors a decoder family stores but never uses (buffers of old exports).
DECODER_IGNORED = {"gpt2": (".attn.bias", ".attn.masked_bias"), "llama": (".rotary_emb.inv_freq",)}


def decoder_from_checkpoint(ck: Checkpoint, cfg: DecoderConfig, dtype="fp32", device="cpu",
                            prefix: str = "", head_prefix: str = "", spec=None) -> Decoder:
    """Take a decoder's tensors out of an open checkpoint (the caller reports unused tensors).

    `prefix` / `head_prefix` replace the leading "model." / "lm_head." of the Llama-family names
    when the decoder is part of a larger model (e.g. "model.language_model." and "lm_head." in
    a LLaVA folder). `spec`: the parsed GPTQ/AWQ quantization of a published quantized checkpoint."""
    from ..quant.linear import QuantizedLinear
    from ..quant.published import read_linear

    dtype = resolve_dtype(dtype)

    def name(key):
        if prefix and key.startswith("model."):
            return prefix + key[len("model."):]
        if head_prefix and key.startswith("lm_head."):
            return head_prefix + key[len("lm_head."):]
        return key

    def take(key, shape):
        return ck.take(name(key), shape, dtype=dtype, device=device)

    def fused(prefixes, widths, n_in):
        prefixes = [name(p) for p in prefixes]
        if spec is None or prefixes[0] + ".qweight" not in ck:
            return None
        parts = [read_linear(ck, spec, p, w, n_in, dtype) for p, w in zip(prefixes, widths)]
        return QuantizedLinear.concat(parts, name=f"{ck.folder}: {prefixes}") if len(parts) > 1 else parts[0]

    if cfg.family == "gpt2":
        sd, head_key, modules = _gpt2_tensors(ck, cfg, take)
    else:
        sd, head_key, modules = _llama_tensors(ck, cfg, take, fused)
    if head_key is not None:
        head = fused(["lm_head"], (cfg.vocab_size,), cfg.d_model)
        if head is not None:
            modules["lm_head"] = head
        else:
            sd["lm_head.weight"] = take(head_key, (cfg.vocab_size, cfg.d_model))
    elif name("lm_head.weight") in ck:
        take("lm_head.weight", (cfg.vocab_size, cfg.d_model))  # a tied head stored twice: same values

    with torch.device("meta"):
        model = Decoder(cfg)
    for key, mod in modules.items():
        model.set_submodule(key, mod.to(device))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    quantized = tuple(n + "." for n in modules)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight") and not k.startswith(quantized)]
    if missing or unexpected:
        raise CheckpointError(f"{ck.folder}: internal key mapping mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if not cfg.learned_pos:  # buffers created on meta: real (empty) ones, grown on use
        model.rope_cos = torch.zeros(0, cfg.head_dim // 2, device=device)
        model.rope_sin = torch.zeros(0, cfg.head_dim // 2, device=device)
    model.quant_config = spec
    return model.eval()
