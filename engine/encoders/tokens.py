"""Texts -> padded token id batches through a checkpoint's tokenizer.json.

Truncation to the model's context length keeps the special tokens the post-processor adds
(CLIP's end-of-text, BERT's [SEP]). Padding is on the right, to the longest text of the batch,
or to the full context for models trained that way (SigLIP pools the last position).
`length_buckets` groups texts of similar length so that batches carry little padding, and
`text_batches` is the batching both encoders (PyTorch and ONNX Runtime) use. Torch-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import PromptError
from ..jsonfile import read_json
from ..tokenizer import check_text, load_tokenizer


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

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to the context length (special tokens kept)."""
        return [e.ids for e in self.tok.encode_batch(check_texts(texts))]

    def pad(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """-> ids (B, T) int64 right-padded (T = longest, or the context), lengths (B,) int64."""
        lengths = [len(s) for s in seqs]
        T = self.context_length if self.pad_to_context else max(lengths)
        ids = np.full((len(seqs), T), self.pad_id, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        return ids, np.asarray(lengths, dtype=np.int64)

    def __call__(self, texts: Sequence[str]):
        """Texts -> ids (B, T) int64 right-padded, lengths (B,) real tokens per text, as torch tensors."""
        import torch  # encode and pad above are all the torch-free runtime uses
        ids, lengths = self.pad(self.encode(texts))
        return torch.from_numpy(ids), torch.from_numpy(lengths)


def length_buckets(lengths: Sequence[int], max_rows: int, max_padding: float = 0.25, min_rows: int = 4) -> list:
    """Split lengths sorted longest first into consecutive groups (ranges) of at most `max_rows`,
    starting a new group when padding to the group's longest text would waste more than
    `max_padding` of the group's tokens (groups of fewer than `min_rows` always grow: tiny
    batches cost more in per-call overhead than padding does)."""
    groups, start, total = [], 0, 0
    for j, n in enumerate(lengths):
        rows = j - start + 1
        if rows > max_rows or (rows > min_rows and lengths[start] * rows > (1 + max_padding) * (total + n)):
            groups.append(range(start, j))
            start, total = j, 0
        total += n
    groups.append(range(start, len(lengths)))
    return groups


def text_batches(seqs: Sequence[Sequence[int]], batch_size: int, bucket: bool) -> list[list[int]]:
    """Batches of indices into `seqs` (token id lists): sorted longest first, at most `batch_size`
    each, and with `bucket` further split where that saves padding (`length_buckets`)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    if bucket:
        groups = length_buckets([len(seqs[i]) for i in order], batch_size)
    else:
        groups = [range(s, min(s + batch_size, len(seqs))) for s in range(0, len(seqs), batch_size)]
    return [[order[i] for i in g] for g in groups]


def check_texts(texts) -> list:
    """A non-empty list of str (one str is a list of one) of valid Unicode; anything else is a PromptError."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise PromptError("empty text list: nothing to encode")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PromptError(f"text {i} is a {type(t).__name__}, expected str")
        check_text(t, f"text {i}")
    return texts
