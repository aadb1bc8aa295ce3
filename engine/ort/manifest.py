"""`mmfuse_export.json`: the one manifest of every mmfuse ONNX export folder (decoders, encoders, the
vision-language model's graphs). It records the export's `kind`, its settings and each file's byte
size; the exporter writes it last and the runtime checks it before any session is created, so a
missing, truncated or swapped file is an error naming it rather than a crash inside onnxruntime.

Kinds: "decoder" (mmfuse.ort.engine), "clip" / "siglip" / "bert" (mmfuse.ort.encoder), "vlm"
(mmfuse.ort.vlm). Encoder folders exported before the manifests were unified hold
`mmfuse_encoder.json` (format "mmfuse-onnx-encoder/1"): it is read as the same thing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from ..errors import CheckpointError, ExportFolderError
from ..files import write_json
from ..jsonfile import read_json

MANIFEST = "mmfuse_export.json"
FORMAT = 1
LEGACY = {"mmfuse_encoder.json": "mmfuse-onnx-encoder/1"}  # older name -> its format value


def write_manifest(folder: Path, kind: str, files: list, **fields) -> dict:
    """Record `files` (names inside `folder`) with their sizes, plus `fields`; returns the manifest."""
    folder = Path(folder)
    data = {"format": FORMAT, "kind": kind, **fields, "files": {f: (folder / f).stat().st_size for f in files}}
    write_json(folder / MANIFEST, data)
    return data


def publish(tmp: Path, out_dir: Path, files: list) -> None:
    """Move an export's `files` (and subfolders) from the folder `tmp` it was built in into
    `out_dir`, the manifest last: a folder without it is not a finished export."""
    for f in files:
        (Path(out_dir) / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(Path(tmp) / f, Path(out_dir) / f)
    os.replace(Path(tmp) / MANIFEST, Path(out_dir) / MANIFEST)


def manifest_path(folder: Path) -> Path:
    """The folder's manifest: MANIFEST, or an older name when only that one is there."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        for name in LEGACY:
            if (folder / name).is_file():
                return folder / name
    return folder / MANIFEST


def read_manifest(folder, kind: Union[str, Sequence[str]]) -> dict:
    """The manifest of an export folder of `kind` (or one of several kinds), after checking that
    every recorded file is there with its recorded size."""
    folder = Path(folder)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not folder.is_dir():
        raise ExportFolderError(f"{folder}: not an export folder (no such directory)")
    path = manifest_path(folder)
    try:
        data = read_json(path)
    except CheckpointError as e:
        raise ExportFolderError(f"{e} (not an mmfuse ONNX export folder? run `mmfuse export onnx` first)") from None
    expected = LEGACY.get(path.name, FORMAT)
    if data.get("format") != expected:
        raise ExportFolderError(f"{path}: format {data.get('format')!r}, this mmfuse reads {expected!r}")
    if data.get("kind") not in kinds:
        raise ExportFolderError(f"{path}: an export of kind {data.get('kind')!r}, expected "
                                f"{' or '.join(repr(k) for k in kinds)}")
    for name, size in data.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise ExportFolderError(f"{p}: file not found (listed in {path.name})")
        if p.stat().st_size != size:
            raise ExportFolderError(f"{p}: {p.stat().st_size} bytes, but the export wrote {size} "
                                    f"(truncated or replaced; export again)")
    return data
