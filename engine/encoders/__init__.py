"""mmfuse.encoders: CLIP, SigLIP and BERT encoders in a joint embedding space, built from the
decoder's layers (engine/nn/layers.py), with preprocessing, zero-shot classification, retrieval,
the `mmfuse embed` command and a contrastive training loop.

Names load on first use (PEP 562), so the torch-free modules (preprocess, tokens, zeroshot) can be
imported by the ONNX Runtime encoder (mmfuse.ort) without importing torch."""
import importlib

_SOURCES = {
    "Encoder": "api", "load_encoder": "api", "BertEncoder": "bert", "SentenceEncoder": "bert",
    "ClipModel": "clip", "clip_config": "clip", "TowerConfig": "config", "ImageError": "preprocess",
    "ImageProcessor": "preprocess", "search": "retrieval", "search_reference": "retrieval", "SiglipModel": "siglip",
    "TextTokenizer": "tokens", "build_zero_shot_classifier": "zeroshot",
}

__all__ = list(_SOURCES)


def __getattr__(name):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
