"""Declarative key tables: our parameter names <-> Hugging Face checkpoint keys, both ways.

A table is a list of `KeyEntry`s, one per parameter of ours, each with its own transform: several
checkpoint tensors concatenated along dim 0 (q/k/v -> `qkv`, gate/up -> `up`; `sizes` gives their
rows when they differ, as grouped-query q/k/v), and `transpose` for tensors stored [in, out]
(GPT-2's Conv1D). Loading builds the model on the meta device, reads each tensor with the shape
the model expects (`Checkpoint.take` checks it), assigns it and reports tensors nobody took;
saving applies each inverse, so saved folders load in transformers. Decoders, encoders and the
vision-language models all describe their checkpoints this way.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .checkpoint import Checkpoint, resolve_dtype
from .jsonfile import read_config
from .device import check_device
from .errors import CheckpointError, OutputError
from .files import atomic_path, write_json


@dataclass(frozen=True)
class KeyEntry:
    ours: str                        # our parameter name (a state_dict key)
    theirs: tuple                    # checkpoint key(s); several are concatenated along dim 0 into ours
    sizes: Optional[tuple] = None    # rows each of `theirs` gives ours (None: equal parts)
    transpose: bool = False          # stored as [in, out] (GPT-2's Conv1D): transposed both ways

    def rows(self, shape) -> tuple:
        """Rows of ours that each checkpoint tensor holds, for our parameter of `shape`."""
        n = len(self.theirs)
        sizes = self.sizes if self.sizes is not None else (shape[0] // n,) * n
        if sum(sizes) != shape[0] or len(sizes) != n:
            raise CheckpointError(f"internal key table: {self.ours} of shape {tuple(shape)} cannot hold parts "
                                  f"of {sizes} rows from {list(self.theirs)}")
        return sizes

    def their_shapes(self, shape) -> list:
        """The stored shape of each checkpoint tensor."""
        shape = tuple(shape)
        parts = [shape] if len(self.theirs) == 1 else [(n, *shape[1:]) for n in self.rows(shape)]
        return [tuple(reversed(s)) for s in parts] if self.transpose else parts

    def to_ours(self, parts: list) -> torch.Tensor:
        if self.transpose:
            parts = [p.t() for p in parts]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        return t.contiguous()

    def to_theirs(self, t: torch.Tensor) -> dict:
        chunks = t.split(list(self.rows(t.shape))) if len(self.theirs) > 1 else [t]
        return {name: (c.t() if self.transpose else c).contiguous() for name, c in zip(self.theirs, chunks)}


KeyTable = list  # list[KeyEntry]; a pair (ours, [theirs, ...]) is shorthand for KeyEntry(ours, (theirs, ...))


def entries(table: KeyTable) -> list:
    """The table's entries as `KeyEntry`s (pairs expanded)."""
    return [e if isinstance(e, KeyEntry) else KeyEntry(e[0], tuple(e[1])) for e in table]


def named_keys(params: dict, modules: dict) -> KeyTable:
    """Table entries from {our parameter: theirs} and {our module: theirs} (its weight and bias)."""
    return [(o, [t]) for o, t in params.items()] + [e for o, t in modules.items() for e in module_keys(o, t)]


def prefixed(table: KeyTable, prefix: str) -> KeyTable:
    """The table for a model that holds this one as a submodule: `prefix` before each of our names."""
    return [replace(e, ours=prefix + e.ours) for e in entries(table)]


def module_keys(ours: str, theirs: str, params=("weight", "bias"), transpose: bool = False) -> KeyTable:
    """One module's parameters under one checkpoint prefix (`transpose` applies to the weight)."""
    return [KeyEntry(f"{ours}.{p}", (f"{theirs}.{p}",), transpose=True) if transpose and p == "weight"
            else (f"{ours}.{p}", [f"{theirs}.{p}"]) for p in params]


def read_state(ck: Checkpoint, table: KeyTable, shapes: dict, dtype, device) -> dict:
    """Our state dict from an open checkpoint through `table`; `shapes` are our parameters' shapes."""
    sd = {}
    for e in entries(table):
        if e.ours not in shapes:
            raise CheckpointError(f"{ck.folder}: internal key table names unknown parameter {e.ours!r}")
        parts = [ck.take(t, s, dtype=dtype, device=device) for t, s in zip(e.theirs, e.their_shapes(shapes[e.ours]))]
        sd[e.ours] = e.to_ours(parts)
    return sd


def checkpoint_tensors(state: dict, table: KeyTable) -> dict:
    """Checkpoint tensors (CPU, contiguous) under their checkpoint names from our state dict."""
    out = {}
    for e in entries(table):
        out.update(e.to_theirs(state[e.ours].detach().cpu()))
    return out


def load_weights(build: Callable[[], nn.Module], folder, table: KeyTable, dtype="auto", device="cpu",
                 ignore=()) -> nn.Module:
    """Build `build()` on the meta device and fill it from the checkpoint folder through `table`."""
    dtype = resolve_dtype(dtype, read_config(folder) if dtype == "auto" else None)
    device = check_device(device)
    with torch.device("meta"):
        model = build()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ck = Checkpoint(folder)
    sd = read_state(ck, table, shapes, dtype, device)
    ck.finish(ignore=ignore)
    missing = sorted(set(shapes) - set(sd))
    if missing:
        raise CheckpointError(f"{folder}: internal key table misses parameters {missing[:8]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def write_checkpoint(folder, tensors: dict, config: dict) -> Path:
    """Write config.json and model.safetensors, each atomically: a crash or a full disk leaves the
    previous file in place."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot create the checkpoint folder ({e.strerror or e})") from None
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(folder / "config.json", config)
    return folder


def save_weights(model: nn.Module, folder, table: KeyTable, config: dict) -> Path:
    """A checkpoint folder with Hugging Face key names (the model's dtype) and `config` as config.json."""
    return write_checkpoint(folder, checkpoint_tensors(model.state_dict(), table), config)
