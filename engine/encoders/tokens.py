"""Texts -> padded token id batches through a checkpoint's tokenizer.json.

Truncation to the model's context length keeps the special tokens the post-processor adds
(CLIP's end-of-text, BERT's [SEP]). Padding is on the right, to the longest text of the batch,
or to the full context for models trained that way (SigLIP pools the last position).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoint import read_json
from ..tokenizer import load_tokenizer


class TextTokenizer:
    def __init__(self, folder, context_length: int, pad_to_context: bool = False,
                 default_pad_id: Optional[int] = None):
        folder = Path(folder)
        self.tok = load_tokenizer(folder)
        self.context_length, self.pad_to_context = context_length, pad_to_context
        self.pad_id = self._pad_id(folder, default_pad_id)
        self.tok.no_padding()
        self.tok.enable_truncation(context_length)

    def _pad_id(self, folder: Path, default: Optional[int]) -> int:
        pad = self.tok.padding
        if pad is not None:
            return pad["pad_id"]
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            cfg = read_json(folder / name, required=False) or {}
            tok = cfg.get("pad_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str) and self.tok.token_to_id(tok) is not None:
                return self.tok.token_to_id(tok)
        return 0 if default is None else default

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids (B, T) int64 right-padded, lengths (B,) real tokens per text."""
        texts = check_texts(texts)
        enc = self.tok.encode_batch(texts)
        lengths = [len(e.ids) for e in enc]
        T = self.context_length if self.pad_to_context else max(lengths)
        ids = torch.full((len(texts), T), self.pad_id, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        return ids, torch.tensor(lengths, dtype=torch.long)


def check_texts(texts) -> list:
    """A non-empty list of str (one str is a list of one); anything else is a ValueError."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("empty text list: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"text {i} is a {type(t).__name__}, expected str")
    return texts
