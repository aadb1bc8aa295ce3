"""Zero-shot classification from class names and prompt templates, as OpenCLIP's
`build_zero_shot_classifier`: per class, embed every template filled with the class name,
normalise, average, normalise again; the classifier is the (E, C) matrix of class embeddings.
numpy only, so the PyTorch `Encoder` and the ONNX Runtime `OrtEncoder` share it."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import numpy as np

Template = Union[str, Callable[[str], str]]


def fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm (at least eps), as torch.nn.functional.normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def build_zero_shot_classifier(encode_text: Callable[[list], object], classnames: Sequence[str],
                               templates: Sequence[Template] = ("a photo of a {}.",),
                               num_classes_per_batch: int = 10) -> np.ndarray:
    """`encode_text(list of str) -> (n, E)` embeddings (any array numpy can read). Returns the
    classifier (E, C) float32."""
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError("no prompt templates given")
    T, out = len(templates), []
    for start in range(0, len(classnames), num_classes_per_batch):
        names = classnames[start:start + num_classes_per_batch]
        emb = np.asarray(encode_text([fill(t, c) for c in names for t in templates]), dtype=np.float32)  # (n * T, E)
        emb = l2_normalize(emb).reshape(len(names), T, -1).mean(axis=1)  # (n, E)
        out.append(l2_normalize(emb))
    return np.ascontiguousarray(np.concatenate(out).T)  # (E, C)
