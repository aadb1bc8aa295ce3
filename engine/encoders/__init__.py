"""mmfuse.encoders: CLIP, SigLIP and BERT encoders in a joint embedding space, built from the
decoder's layers (engine/nn/layers.py), with preprocessing, zero-shot classification, retrieval,
the `mmfuse embed` command and a contrastive training loop.

The names are loaded on first use (PEP 562), so that the CLI can register `mmfuse embed` without
importing torch, and the torch-free modules (preprocess, tokens, zeroshot) serve the ONNX Runtime
encoder (mmfuse.ort) too."""
import importlib

_WHERE = {"Encoder": "api", "load_encoder": "api", "BertEncoder": "bert", "SentenceEncoder": "bert",
          "ClipModel": "clip", "clip_config": "clip", "TowerConfig": "config",
          "ImageProcessor": "preprocess", "search": "retrieval", "search_reference": "retrieval",
          "SiglipModel": "siglip", "TextTokenizer": "tokens", "build_zero_shot_classifier": "zeroshot"}

__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'mmfuse.encoders' has no attribute {name!r}")
