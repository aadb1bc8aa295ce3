"""Text <-> token ids through a checkpoint's tokenizer.json (the `tokenizers` library)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import CheckpointError


def load_tokenizer(folder) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (text prompts need the checkpoint's tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
