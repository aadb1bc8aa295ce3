"""Load a Hugging Face decoder checkpoint folder into `Decoder`, tensor by tensor, in the target dtype.

The model is built on the meta device (no memory), each checkpoint tensor is read from the
memory-mapped safetensors, cast to the target dtype and device, converted to our layout through
the family's key table (`weights`: GPT-2's [in, out] Conv1D transposed; Llama's q/k/v and gate/up
fused), and assigned.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, resolve_dtype
from ..jsonfile import read_config
from ..device import check_device
from ..errors import CheckpointError, ConfigError
from ..weight_map import read_state
from .config import DecoderConfig
from .transformer import Decoder
from .weights import decoder_table


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
    head = head_prefix or "lm_head."
    if cfg.family == "gpt2":
        body = "transformer." if "transformer.wte.weight" in ck else ""
    else:
        body = prefix or "model."
    table = decoder_table(cfg, body, head)
    with torch.device("meta"):
        model = Decoder(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # A published quantized checkpoint stores some linears as packed integers: those become
    # quantized modules (their parts concatenated like the float ones) instead of entries.
    modules = {}
    for e in table if spec is not None else ():
        mod, _, param = e.ours.rpartition(".")
        prefixes = [t.removesuffix(".weight") for t in e.theirs]
        if param == "weight" and prefixes[0] + ".qweight" in ck:
            n_in = shapes[e.ours][1]
            parts = [read_linear(ck, spec, p, w, n_in, dtype) for p, w in zip(prefixes, e.rows(shapes[e.ours]))]
            modules[mod] = (QuantizedLinear.concat(parts, name=f"{ck.folder}: {prefixes}") if len(parts) > 1
                            else parts[0])
    table = [e for e in table if e.ours.rpartition(".")[0] not in modules]
    sd = read_state(ck, table, shapes, dtype, device)
    if cfg.tie_embeddings and head + "weight" in ck:
        ck.take(head + "weight", shapes["embed.weight"])  # a tied head stored twice: same values

    for key, mod in modules.items():
        model.set_submodule(key, mod.to(device))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    quantized = tuple(n + "." for n in modules)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight") and not k.startswith(quantized)]
    if missing or unexpected:
        raise CheckpointError(f"{ck.folder}: internal key mapping mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.quant_config = spec
    return model.eval()
