"""Reading Hugging Face checkpoint folders: config.json and (sharded) safetensors, memory-mapped.

Weights are only ever read from safetensors; nothing is unpickled. `Checkpoint.take()` loads one
tensor straight into the target dtype and device and records it, so that `Checkpoint.finish()`
can report tensors the model did not use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors import safe_open

from .errors import CheckpointError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """Accept a torch dtype or one of the names in DTYPES."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}") from None


def read_json(path: Path, required: bool = True) -> Optional[dict]:
    """Parse a JSON file of a checkpoint folder; a missing optional file gives None."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: file not found")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return data


def read_config(folder) -> dict:
    """config.json of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no such directory)")
    return read_json(folder / "config.json")


class Checkpoint:
    """The safetensors tensors of a checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if single.is_file():
            files = [single]
            key_file = None
        elif index.is_file():
            meta = read_json(index)
            wmap = meta.get("weight_map")
            if not isinstance(wmap, dict) or not wmap:
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted({self.folder / f for f in wmap.values()})
            key_file = {k: self.folder / f for k, f in wmap.items()}
        else:
            bins = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt")]
            hint = f" (found {bins}: pickled weights are not loaded; convert them to safetensors)" if bins else ""
            raise CheckpointError(f"{self.folder}: no model.safetensors or {index.name}{hint}")
        self._handles = {}
        self._where = {}  # key -> file
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            try:
                h = safe_open(str(f), framework="pt", device="cpu")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises its own error types for bad headers/truncation
                raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
            self._check_size(f, h, keys)
            self._handles[f] = h
            for k in keys:
                self._where[k] = f
        if key_file is not None:
            for k, f in key_file.items():
                if self._where.get(k) != f:
                    raise CheckpointError(f"{index}: key {k!r} is listed in {f.name} but that shard does not hold it")
        self._used: set[str] = set()

    @staticmethod
    def _check_size(f: Path, h, keys) -> None:
        """A truncated file can have an intact header; compare the data size it declares with the file."""
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = os.path.getsize(f)
        if 8 + n + end > size:
            raise CheckpointError(f"{f}: truncated: header declares {8 + n + end} bytes, file has {size}")

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple:
        h = self._handles[self._file(key)]
        return tuple(h.get_slice(key).get_shape())

    def _file(self, key: str) -> Path:
        try:
            return self._where[key]
        except KeyError:
            names = ", ".join(str(p.name) for p in self._handles)
            raise CheckpointError(f"{self.folder}: missing tensor {key!r} (looked in {names})") from None

    def take(self, key: str, shape: Optional[Sequence[int]] = None, dtype=None, device="cpu") -> torch.Tensor:
        """Load tensor `key`, checking its stored shape, cast straight to `dtype` on `device`."""
        f = self._file(key)
        stored = self.shape(key)
        if shape is not None and tuple(stored) != tuple(shape):
            raise CheckpointError(f"{f}: tensor {key!r} has shape {tuple(stored)}, expected {tuple(shape)}")
        try:
            t = self._handles[f].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {key!r} ({e})") from None
        self._used.add(key)
        if dtype is not None or device != "cpu":
            t = t.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else t.dtype)
        return t

    def unused(self, ignore: Iterable[str] = ()) -> list[str]:
        """Keys not taken so far, except those ending with one of `ignore`."""
        ignore = tuple(ignore)
        return sorted(k for k in self._where if k not in self._used and not (ignore and k.endswith(ignore)))

    def finish(self, ignore: Iterable[str] = ()) -> None:
        """Raise if the checkpoint holds tensors the model did not take (unexpected keys)."""
        extra = self.unused(ignore)
        if extra:
            shown = ", ".join(repr(k) for k in extra[:8]) + (" ..." if len(extra) > 8 else "")
            raise CheckpointError(f"{self.folder}: {len(extra)} unexpected tensor(s): {shown}")
