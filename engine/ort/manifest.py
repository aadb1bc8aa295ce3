"""`mmfuse_export.json`: what an export folder holds (kind, variant, sizes, and each file's byte
size), written by the exporter and checked by the runtime before any session is created, so a
missing, truncated or swapped file is an error naming it rather than a crash inside onnxruntime."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, ExportFolderError
from ..files import atomic_open
from ..jsonfile import read_json

MANIFEST = "mmfuse_export.json"
FORMAT = 1


def write_manifest(folder: Path, kind: str, files: list, **fields) -> dict:
    """Record `files` (names inside `folder`) with their sizes, plus `fields`; returns the manifest."""
    folder = Path(folder)
    data = {"format": FORMAT, "kind": kind, **fields, "files": {f: (folder / f).stat().st_size for f in files}}
    with atomic_open(folder / MANIFEST, encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    return data


def read_manifest(folder, kind: str) -> dict:
    """The manifest of an export folder of `kind`, after checking that every recorded file is there
    with its recorded size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportFolderError(f"{folder}: not an export folder (no such directory)")
    try:
        data = read_json(folder / MANIFEST)
    except CheckpointError as e:
        raise ExportFolderError(f"{e} (not an mmfuse ONNX export folder?)") from None
    if data.get("format") != FORMAT:
        raise ExportFolderError(f"{folder / MANIFEST}: format {data.get('format')!r}, this mmfuse reads {FORMAT}")
    if data.get("kind") != kind:
        raise ExportFolderError(f"{folder / MANIFEST}: an export of kind {data.get('kind')!r}, expected {kind!r}")
    for name, size in data.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ExportFolderError(f"{path}: file not found (listed in {MANIFEST})")
        if path.stat().st_size != size:
            raise ExportFolderError(f"{path}: {path.stat().st_size} bytes, but the export wrote {size} "
                                    f"(truncated or replaced; export again)")
    return data
