"""Quality metrics on the world's held-out scenes (reported by `mmfuse demo`, never asserted).

- VQA: exact match of the answer's words, overall and per question type.
- Captions: attribute precision (of the size / colour / shape / position words a caption states,
  the fraction true of the scene) and object recall (the fraction of the scene's objects the
  caption mentions at their position).
- Retrieval: R@1 of image-to-text similarities.
- Zero-shot classification: accuracy.
- Text-to-image: the fraction of generated images whose parsed objects equal the caption's.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .language import parse_caption, scene_from_caption
from .parse import parse_image
from .scene import POSITIONS, Scene


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def vqa_accuracy(records) -> dict:
    """records: (question type, predicted answer, true answer) -> {"overall", "by_type", "n"}."""
    hits, totals = defaultdict(int), defaultdict(int)
    for kind, pred, true in records:
        totals[kind] += 1
        hits[kind] += normalise(pred) == normalise(true)
    n = sum(totals.values())
    return {"overall": sum(hits.values()) / n if n else float("nan"),
            "by_type": {k: hits[k] / totals[k] for k in sorted(totals)}, "n": n}


def caption_counts(text: str, scene: Scene) -> tuple:
    """(attributes stated and true, attributes stated, objects mentioned at their position, objects)."""
    true = stated = 0
    mentioned = set()
    for clause in parse_caption(text):
        stated += len(clause)
        pos = clause.get("position")
        obj = scene.at(POSITIONS.index(pos)) if pos else None
        if obj is None:
            continue  # no object there: every attribute of the clause is false
        mentioned.add(obj.cell)
        true += 1 + sum(clause[k] == getattr(obj, k) for k in ("size", "colour", "shape") if k in clause)
    return true, stated, len(mentioned), len(scene.objects)


def caption_metrics(pairs) -> dict:
    """pairs: (generated caption, scene) -> {"attribute_precision", "object_recall", "n"}."""
    t = s = m = n = 0
    for text, scene in pairs:
        a, b, c, d = caption_counts(text, scene)
        t, s, m, n = t + a, s + b, m + c, n + d
    return {"attribute_precision": t / s if s else 0.0, "object_recall": m / n if n else float("nan"),
            "n": len(pairs) if hasattr(pairs, "__len__") else None}


def recall_at_1(similarity, targets) -> float:
    """similarity (N_queries, N_items), targets (N_queries,) the right item of each query: the fraction
    whose highest-scoring item is the right one (a tie with another item counts as a miss)."""
    sim = np.asarray(similarity, dtype=np.float64)
    targets = np.asarray(targets)
    right = sim[np.arange(len(sim)), targets]
    beaten = (sim >= right[:, None]).sum(1) > 1
    return float((~beaten).mean())


def accuracy(predicted, truth) -> float:
    predicted, truth = list(predicted), list(truth)
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} labels")
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def parse_matches(images, captions) -> list:
    """Per generated image: do its parsed objects equal the ones its caption describes?"""
    return [parse_image(img) == scene_from_caption(c).objects for img, c in zip(images, captions)]
