"""Quantize a loaded decoder in place, and save / load mmfuse's own quantized checkpoint folders.

A saved folder is a Hugging Face-style folder: config.json (the source model's config plus a
`quantization_config` with `quant_method: "mmfuse"`, which lists every quantized module), one
model.safetensors in mmfuse's own tensor names (`blocks.0.attn.qkv.qweight`, ...), and the
tokenizer / generation files copied over. Loading it builds the quantized modules from the
stored tensors: nothing is quantized again.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..checkpoint import Checkpoint, resolve_dtype
from ..errors import CheckpointError
from ..files import atomic_path, write_json
from .config import QuantConfig
from .linear import QuantizedEmbedding, QuantizedLinear, quantize_weight

METHOD = "mmfuse"
_BLOCK_LINEARS = ("attn.qkv", "attn.o", "mlp.up", "mlp.down")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "vocab.json", "merges.txt", "chat_template.jinja")


def quantized_linears(model: nn.Module) -> dict:
    """{module path: QuantizedLinear} of a model (the LM head's table once, also when tied)."""
    head = getattr(model, "lm_head", None)
    return {name: m for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, QuantizedLinear) and not (m is head and name != "lm_head")}


def quantize_decoder(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Replace the decoder's linear layers (and, by `qcfg`, its LM head and embeddings) with
    round-to-nearest `QuantizedLinear`s, in place. Norms, biases and position embeddings stay float."""
    dtype = model.norm_f.weight.dtype

    def q(lin: nn.Linear) -> QuantizedLinear:
        return quantize_weight(lin.weight, qcfg.bits, qcfg.group_size, qcfg.symmetric, lin.bias)

    for block in model.blocks:
        for path in _BLOCK_LINEARS:
            block.set_submodule(path, q(block.get_submodule(path)))
    tied = model.cfg.tie_embeddings
    if qcfg.lm_head:
        model.lm_head = q(model.lm_head)
        if tied:
            model.embed = QuantizedEmbedding(model.lm_head, dtype)
    if not tied and qcfg.embeddings:
        model.embed = QuantizedEmbedding(quantize_weight(model.embed.weight, qcfg.bits, qcfg.group_size,
                                                         qcfg.symmetric), dtype)
    model.quant_config = qcfg
    return model


def _describe(model: nn.Module) -> dict:
    qcfg = getattr(model, "quant_config", None)
    mods = {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features}
            for name, m in quantized_linears(model).items()}
    embed = model.embed
    return {"quant_method": METHOD, **({} if qcfg is None else asdict(qcfg)), "modules": mods,
            "embedding_table": (None if not isinstance(embed, QuantizedEmbedding) else
                                "lm_head" if embed.table is getattr(model, "lm_head", None) else "embed.table")}


def save_quantized(model: nn.Module, folder, source_config: dict, source_folder=None) -> Path:
    """Write `model` (quantized with `quantize_decoder` or loaded from GPTQ/AWQ) as an mmfuse folder.
    `source_config` is the config.json dict of the model it came from; tokenizer and generation
    files are copied from `source_folder` when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    desc = _describe(model)
    sd, seen = {}, set()
    for k, v in model.state_dict().items():
        if desc["embedding_table"] == "lm_head" and k.startswith("embed.table."):
            continue  # the tied table is stored once, as the LM head
        if (v.data_ptr(), v.shape) in seen:  # a tied float head: stored once
            continue
        seen.add((v.data_ptr(), v.shape))
        sd[k] = v.detach().contiguous()
    cfg = {k: v for k, v in source_config.items() if k != "quantization_config"}
    cfg["quantization_config"] = desc
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "quant_method": METHOD})
    write_json(folder / "config.json", cfg)
    if source_folder is not None:
        for name in _COPIED:
            src = Path(source_folder) / name
            if src.is_file() and src.resolve() != (folder / name).resolve():
                with atomic_path(folder / name) as tmp:
                    shutil.copyfile(src, tmp)
    return folder


def load_mmfuse(folder, cfg, qdesc: dict, dtype="fp32", device="cpu") -> nn.Module:
    """A `Decoder` from a folder `save_quantized` wrote (`cfg`: its DecoderConfig, `qdesc`: its quantization_config)."""
    from ..decoder.transformer import Decoder

    folder = Path(folder)
    src = folder / "config.json"
    dtype = resolve_dtype(dtype)
    mods = qdesc.get("modules")
    if not isinstance(mods, dict):
        raise CheckpointError(f"{src}: quantization_config has no 'modules' object")
    ck = Checkpoint(folder)
    with torch.device("meta"):
        model = Decoder(cfg)
    for name, spec in mods.items():
        try:
            bits, g, k = int(spec["bits"]), int(spec["group_size"]), int(spec["in_features"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{src}: quantization_config.modules[{name!r}] needs integer bits, "
                                  "group_size, in_features") from None

        def opt(key):
            return ck.take(f"{name}.{key}", device=device) if f"{name}.{key}" in ck else None

        bias = opt("bias")
        lin = QuantizedLinear(ck.take(f"{name}.qweight", device=device), ck.take(f"{name}.scales", device=device),
                              opt("zeros"), bits, g, k, None if bias is None else bias.to(dtype), opt("in_perm"),
                              name=f"{folder}: {name}")
        try:
            model.set_submodule(name, lin)
        except AttributeError:
            raise CheckpointError(f"{src}: quantization_config names module {name!r}, which the model has not") from None
    table = qdesc.get("embedding_table")
    if table == "lm_head":
        model.embed = QuantizedEmbedding(model.lm_head, dtype)
    elif table == "embed.table":
        model.embed = QuantizedEmbedding(model.get_submodule("embed.table"), dtype)
    sd = {key: ck.take(key, dtype=dtype, device=device) for key in ck.unused()}  # the float tensors
    quantized = tuple(n + "." for n in mods)
    ck.finish()
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(quantized + ("embed.table.",))
               and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: tensors missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.embed.weight
    qc = {k: qdesc[k] for k in QuantConfig.__dataclass_fields__ if k in qdesc}
    model.quant_config = QuantConfig(**qc) if qc else None
    return model.eval()


def quant_name(model: nn.Module) -> Optional[str]:
    """"int8", "int4-g128", "gptq-4bit-g128", ... for reports; None for a float model."""
    qcfg = getattr(model, "quant_config", None)
    return None if qcfg is None else getattr(qcfg, "name", str(qcfg))
