"""mmfuse.encoders: CLIP, SigLIP and BERT encoders in a joint embedding space, built from the
decoder's layers (engine/layers.py), with preprocessing, zero-shot classification, retrieval,
the `mmfuse embed` command and a contrastive training loop."""
from .api import Encoder, load_encoder
from .bert import BertEncoder, SentenceEncoder
from .clip import ClipModel, clip_config
from .config import TowerConfig
from .preprocess import ImageProcessor
from .search import search, search_reference
from .siglip import SiglipModel
from .tokens import TextTokenizer
from .zeroshot import build_zero_shot_classifier

__all__ = ["Encoder", "load_encoder", "BertEncoder", "SentenceEncoder", "ClipModel", "clip_config", "TowerConfig",
           "ImageProcessor", "search", "search_reference", "SiglipModel", "TextTokenizer",
           "build_zero_shot_classifier"]
