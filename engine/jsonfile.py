"""Reading the JSON files of a model folder (config.json, generation_config.json, ...) with errors
naming the file; torch-free, so the ONNX Runtime engine shares it."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from .errors import CheckpointError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name on the Hugging Face Hub


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
        raise CheckpointError(not_a_folder_message(folder))
    return read_json(folder / "config.json")


def not_a_folder_message(folder) -> str:
    """Why `folder` cannot be loaded; for a Hub id (owner/name), how to get a local folder."""
    text = str(folder)
    if HUB_ID.fullmatch(text) and not Path(text).exists():
        local = text.split("/")[-1]
        return (f"{text}: no such folder. mmfuse loads local checkpoint folders and never downloads on its "
                f"own; {text!r} looks like a Hugging Face Hub id. Get a folder with\n"
                f"    huggingface-cli download {text} --local-dir {local}\n"
                f"and pass {local}, or, with huggingface_hub installed, add --download to let mmfuse fetch it")
    return f"{folder}: not a checkpoint folder (no such directory)"
