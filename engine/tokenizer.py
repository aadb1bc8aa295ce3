"""Text <-> token ids through a checkpoint's tokenizer.json (the `tokenizers` library)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import CheckpointError, PromptError


def load_tokenizer(folder) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (text prompts need the checkpoint's tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None


def check_text(text: str, where: str = "prompt") -> str:
    """`text` if it is valid Unicode text; a lone surrogate (e.g. from a bad decode) cannot be
    tokenized, so it is a PromptError naming `where` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{where}: character {e.start} is a lone surrogate {text[e.start]!r}, "
                          "not valid Unicode text") from None
    return text
