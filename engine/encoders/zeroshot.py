"""Zero-shot classification from class names and prompt templates, as OpenCLIP's
`build_zero_shot_classifier`: per class, embed every template filled with the class name,
normalise, average, normalise again; the classifier is the (E, C) matrix of class embeddings."""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]

def fill(template: Template, name: str) -> str:
    return template(name) if callable(template) else template.format(name)


def build_zero_shot_classifier(encode_text: Callable[[list], torch.Tensor], classnames: Sequence[str],
                               templates: Sequence[Template] = ("a photo of a {}.",),
                               num_classes_per_batch: int = 10) -> torch.Tensor:
    """`encode_text(list of str) -> (n, E)` normalised embeddings. Returns the classifier (E, C)."""
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("no class names given")
    if not templates:
        raise ValueError("no prompt templates given")
    T, out = len(templates), []
    for start in range(0, len(classnames), num_classes_per_batch):
        names = classnames[start:start + num_classes_per_batch]
        emb = encode_text([fill(t, c) for c in names for t in templates])  # (n * T, E)
        emb = F.normalize(emb.float(), dim=-1).view(len(names), T, -1).mean(dim=1)  # (n, E)
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out).T  # (E, C)
