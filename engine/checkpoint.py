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

from .errors import CheckpointError, ConfigError
from .jsonfile import HUB_ID, read_json

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = ["auto", "fp32", "bf16", "fp16"]  # what --dtype offers


def resolve_dtype(dtype, config: Optional[dict] = None) -> torch.dtype:
    """A torch dtype or one of the names in DTYPES; "auto" is the dtype the checkpoint's config
    names (`dtype`, or the older `torch_dtype`; float32 where it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if config is None:
            raise ValueError("dtype='auto' needs the checkpoint's config.json")
        key = "dtype" if config.get("dtype") is not None else "torch_dtype"
        name = config.get(key) or "float32"
        if name not in DTYPES:
            raise ConfigError(f"config.json: {key}={name!r} is not a supported dtype "
                              f"(supported: float32, bfloat16, float16); pass an explicit dtype")
        return DTYPES[name]
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES) + ['auto']}") from None


def path_in_folder(folder, entry, source) -> Path:
    """`folder / entry` for a file name a checkpoint's own JSON gives (an index's `weight_map`,
    sentence-transformers' modules.json), refused with CheckpointError naming `source` and the
    entry when it is not a relative path that stays inside the folder: no absolute paths, no `..`
    out of it, no symlink resolving outside it. The one exception is the Hugging Face hub cache,
    whose snapshot files are symlinks into the repository's `blobs/` folder beside `snapshots/`."""
    folder = Path(folder)
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise CheckpointError(f"{source}: entry {entry!r} is not a file name")
    rel = Path(entry)
    if rel.is_absolute() or rel.drive or rel.root:
        raise CheckpointError(f"{source}: entry {entry!r} is an absolute path; it must stay inside {folder}")
    if ".." in rel.parts:
        raise CheckpointError(f"{source}: entry {entry!r} uses '..'; it must stay inside the checkpoint folder {folder}")
    path = folder / rel
    real, roots = path.resolve(), [folder.resolve()]
    if folder.resolve().parent.name == "snapshots":
        roots.append(folder.resolve().parent.parent / "blobs")
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise CheckpointError(f"{source}: entry {entry!r} resolves to {real}, outside the checkpoint folder {folder}")
    return path


def fetch_from_hub(repo_id: str) -> Path:
    """Download `repo_id` (config, tokenizer, safetensors only) with huggingface_hub; only called on
    the user's explicit request (--download / download=True)."""
    if not HUB_ID.fullmatch(repo_id):
        raise CheckpointError(f"{repo_id}: not a Hugging Face Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id}: downloading needs huggingface_hub (pip install huggingface_hub), "
                              f"or run: huggingface-cli download {repo_id} --local-dir DIR") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # network, authentication, unknown repository
        raise CheckpointError(f"{repo_id}: download failed ({type(e).__name__}: {e})") from None


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
            key_file = {k: path_in_folder(self.folder, f, f"{index}: weight_map[{k!r}]") for k, f in wmap.items()}
            files = sorted(set(key_file.values()))
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
