"""One key table per model maps our parameter names to Hugging Face checkpoint keys, both ways.

A table is a list of (ours, [theirs, ...]); several HF tensors map to one of ours by
concatenation along dim 0 (q/k/v -> `qkv`). Loading builds the model on the meta device, reads
each tensor with the shape the model expects (checked by `Checkpoint.take`), assigns it, and
reports tensors nobody took; saving splits ours back, so saved folders load in transformers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..checkpoint import Checkpoint, read_config, resolve_dtype
from ..device import check_device
from ..errors import CheckpointError, OutputError
from ..files import atomic_open, atomic_path

KeyTable = list  # list[tuple[str, list[str]]]


def block_keys(ours: str, theirs: str, n_layer: int, style: str) -> KeyTable:
    """Keys of n_layer `engine.layers.Block`s: "clip" (CLIP/SigLIP encoder layers) or "bert" names."""
    if style == "clip":
        names = {"attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                 "attn.o": ["self_attn.out_proj"], "mlp.up": ["mlp.fc1"], "mlp.down": ["mlp.fc2"],
                 "norm1": ["layer_norm1"], "norm2": ["layer_norm2"]}
    elif style == "bert":
        names = {"attn.qkv": ["attention.self.query", "attention.self.key", "attention.self.value"],
                 "attn.o": ["attention.output.dense"], "mlp.up": ["intermediate.dense"],
                 "mlp.down": ["output.dense"], "norm1": ["attention.output.LayerNorm"],
                 "norm2": ["output.LayerNorm"]}
    else:
        raise ValueError(f"unknown block key style {style!r}")
    table = []
    for i in range(n_layer):
        for o, t in names.items():
            for p in ("weight", "bias"):
                table.append((f"{ours}.{i}.{o}.{p}", [f"{theirs}.{i}.{n}.{p}" for n in t]))
    return table


def module_keys(ours: str, theirs: str, params=("weight", "bias")) -> KeyTable:
    return [(f"{ours}.{p}", [f"{theirs}.{p}"]) for p in params]


def named_keys(params: dict, modules: dict) -> KeyTable:
    """Table entries from {our parameter: theirs} and {our module: theirs} (its weight and bias)."""
    return [(o, [t]) for o, t in params.items()] + [e for o, t in modules.items() for e in module_keys(o, t)]


def load_weights(build: Callable[[], nn.Module], folder, table: KeyTable, dtype="auto", device="cpu",
                 ignore=()) -> nn.Module:
    """Build `build()` on the meta device and fill it from the checkpoint folder through `table`."""
    dtype = resolve_dtype(dtype, read_config(folder) if dtype == "auto" else None)
    device = check_device(device)
    with torch.device("meta"):
        model = build()
    expected = dict(model.state_dict())
    ck = Checkpoint(folder)
    sd = {}
    for ours, theirs in table:
        if ours not in expected:
            raise CheckpointError(f"{folder}: internal key table names unknown parameter {ours!r}")
        shape = list(expected[ours].shape)
        if len(theirs) > 1:
            shape[0] //= len(theirs)
        parts = [ck.take(t, tuple(shape), dtype=dtype, device=device) for t in theirs]
        sd[ours] = parts[0] if len(parts) == 1 else torch.cat(parts)
    ck.finish(ignore=ignore)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise CheckpointError(f"{folder}: internal key table misses parameters {missing[:8]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def save_weights(model: nn.Module, folder, table: KeyTable, config: dict) -> Path:
    """Write config.json and model.safetensors with Hugging Face key names (fp32 or the model dtype),
    each atomically: a crash or a full disk leaves the previous file in place."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the checkpoint folder ({e.strerror or e})") from None
    state = model.state_dict()
    out = {}
    for ours, theirs in table:
        t = state[ours].detach()
        for name, part in zip(theirs, t.chunk(len(theirs)) if len(theirs) > 1 else [t]):
            out[name] = part.contiguous().cpu()
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(out, str(tmp), metadata={"format": "pt"})
    with atomic_open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder
