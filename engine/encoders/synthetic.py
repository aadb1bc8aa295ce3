"""Generated image/caption pairs (coloured shapes on a background) and a word-level tokenizer for
them: data for training smoke tests and demos without downloading anything."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from ..files import atomic_open, atomic_path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "<pad>"


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def draw(colour: str, shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 (size, size, 3) image: a shape of random scale and position on a grey noisy background."""
    img = rng.integers(90, 140, size=(size, size, 3), dtype=np.int64)
    r = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(r, size - r, size=2)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif shape == "square":
        inside = (abs(y - cy) <= r * 0.85) & (abs(x - cx) <= r * 0.85)
    else:  # upward triangle
        inside = (y <= cy + r * 0.8) & (abs(x - cx) <= (y - (cy - r)) * 0.6)
    img[inside] = COLOURS[colour]
    return img.astype(np.uint8)


def shapes_dataset(n: int, size: int, seed: int = 0):
    """n (uint8 image, caption) pairs, colour and shape drawn uniformly."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        out.append((draw(c, s, size, rng), caption(c, s)))
    return out


def write_word_tokenizer(folder, words, context_length: int) -> int:
    """A CLIP-style tokenizer.json over `words` (+ pad, bos, eos with eos the largest id). Returns the vocab size."""
    vocab = {PAD: 0, "[UNK]": 1}
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                       special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "tokenizer.json") as tmp:
        tok.save(str(tmp))
    with atomic_open(folder / "special_tokens_map.json", "w") as f:
        json.dump({"pad_token": PAD, "bos_token": BOS, "eos_token": EOS}, f)
    return len(vocab)
