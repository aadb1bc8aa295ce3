"""Reading the JSON files of a model folder (config.json, generation_config.json, ...) with errors
naming the file; torch-free, so the ONNX Runtime engine shares it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import CheckpointError


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
