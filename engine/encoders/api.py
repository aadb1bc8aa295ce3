"""The user-facing encoder: one object per checkpoint folder (CLIP, SigLIP or a BERT sentence
encoder) that turns images and texts into L2-normalised embeddings, builds zero-shot
classifiers and classifies images.

    enc = load_encoder("path/to/checkpoint")
    img = enc.encode_image(["cat.jpg", pil_image, uint8_array])      # (3, E)
    clf = enc.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
    probs = enc.classify(img, clf)                                    # (3, 2)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mmfuse.kernels.cpu_linear import freeze

from ..checkpoint import resolve_dtype
from ..jsonfile import read_config, read_json
from ..device import check_device
from ..errors import ConfigError
from ..tokenizer import load_tokenizer
from .bert import SentenceEncoder
from .clip import ClipModel
from .preprocess import ImageProcessor
from .retrieval import search
from .siglip import SiglipModel
from .tokens import TextTokenizer, check_texts, text_batches
from .zeroshot import build_zero_shot_classifier

FAMILIES = {"clip": ClipModel, "siglip": SiglipModel}


class Encoder:
    def __init__(self, model, tokenizer: Optional[TextTokenizer], processor: Optional[ImageProcessor], folder,
                 device="cpu"):
        self.model, self.tokenizer, self.processor = freeze(model), tokenizer, processor  # CPU may pack weights
        self.folder, self.device = Path(folder), torch.device(device)
        self.dtype = next(model.parameters()).dtype

    @property
    def has_images(self) -> bool:
        return isinstance(self.model, ClipModel)  # SiglipModel too

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
        """Images (PIL, paths, uint8 arrays; one or a batch) -> embeddings (N, E) float32. A float
        tensor (B, 3, H, W) or (3, H, W) is taken as already preprocessed pixels, as OpenCLIP's
        encode_image takes them."""
        if not self.has_images:
            raise ValueError(f"{type(self.model).__name__} has no image tower: encode_image needs a CLIP or SigLIP checkpoint")
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            return self._encode_pixel_batches(images, batch_size, normalize)
        items = ImageProcessor.as_list(images)
        if not items:
            raise ValueError("empty image batch: nothing to encode")
        out = []
        for s in range(0, len(items), batch_size):
            px = torch.from_numpy(self.processor.pixels(items[s:s + batch_size])).to(self.device, self.dtype)
            out.append(self.model.image_features(px).float())
        e = torch.cat(out)
        return F.normalize(e, dim=-1) if normalize else e

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Already preprocessed pixels (B, 3, H, W) -> embeddings (B, E)."""
        e = self.model.image_features(pixels.to(self.device, self.dtype)).float()
        return F.normalize(e, dim=-1) if normalize else e

    def _encode_pixel_batches(self, pixels: torch.Tensor, batch_size: int, normalize: bool) -> torch.Tensor:
        if pixels.dim() == 3:
            pixels = pixels[None]
        side = self.model.vision_cfg.image_size
        channels = self.model.vision_cfg.num_channels
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (channels, side, side):
            raise ValueError(f"pixel tensor of shape {tuple(pixels.shape)}: expected (B, {channels}, {side}, {side}) "
                             "preprocessed pixels (or pass images: PIL, paths, uint8 arrays)")
        if pixels.shape[0] == 0:
            raise ValueError("empty image batch: nothing to encode")
        return torch.cat([self.encode_pixels(pixels[s:s + batch_size], normalize)
                          for s in range(0, pixels.shape[0], batch_size)])

    def encode(self, sentences, batch_size: int = 32, show_progress_bar: bool = False, convert_to_numpy: bool = True,
               convert_to_tensor: bool = False, normalize_embeddings: bool = False):
        """sentence-transformers' `encode`: texts (or one text) -> embeddings (N, E) (or (E,)), as the
        model outputs them (a checkpoint with a Normalize module is normalised anyway), unit
        length with `normalize_embeddings`; a float32 numpy array unless `convert_to_tensor`."""
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if not texts:
            out = torch.empty(0, self.embedding_dim)
        else:
            from tqdm import tqdm

            parts = []
            with tqdm(total=len(texts), desc="encode", disable=not show_progress_bar, leave=False) as bar:
                for s in range(0, len(texts), batch_size):
                    parts.append(self.encode_text(texts[s:s + batch_size], batch_size, normalize=normalize_embeddings))
                    bar.update(min(batch_size, len(texts) - s))
            out = torch.cat(parts)
        out = out[0] if single else out
        if convert_to_tensor or not convert_to_numpy:
            return out
        return out.numpy()

    @property
    def embedding_dim(self) -> int:
        """E, the width of the embeddings."""
        return self.model.embed_dim if self.has_images else self.model.encoder.cfg.d_model

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True,
                    bucket: bool = True) -> torch.Tensor:
        """Texts -> embeddings (N, E) float32, in input order. Texts are sorted by token count and
        split into batches of at most `batch_size`; with `bucket`, batches are further split where
        that saves padding (`length_buckets`)."""
        texts = check_texts(texts)
        if self.tokenizer is None:
            load_tokenizer(self.folder)  # raises CheckpointError naming the missing tokenizer.json
        seqs = self.tokenizer.encode(texts)
        out = None  # (SigLIP pads every batch to the context: bucketing would only shrink batches)
        for idx in text_batches(seqs, batch_size, bucket and not self.tokenizer.pad_to_context):
            ids, lengths = self.tokenizer.pad([seqs[i] for i in idx])
            ids, lengths = torch.from_numpy(ids).to(self.device), torch.from_numpy(lengths).to(self.device)
            e = self.model.text_features(ids) if self.has_images else self.model(ids, lengths)
            if out is None:
                out = torch.empty(len(seqs), e.shape[1])
            out[idx] = e.float().cpu()
        return F.normalize(out, dim=-1) if normalize else out

    def zero_shot_classifier(self, classnames: Sequence[str], templates=("a photo of a {}.",)) -> torch.Tensor:
        """(E, C) class embeddings: templates filled with each class name, averaged and normalised."""
        return torch.from_numpy(build_zero_shot_classifier(self.encode_text, classnames, templates))

    @torch.no_grad()
    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings (Ni, E), (Nt, E) -> the model's logits_per_image (Ni, Nt)."""
        if not self.has_images:
            raise ValueError("logits need a CLIP or SigLIP checkpoint")
        return self.model.logits(image_emb.to(self.device, self.dtype), text_emb.to(self.device, self.dtype)).float()

    def classify(self, images, classifier: torch.Tensor) -> torch.Tensor:
        """Images (or their normalised embeddings (N, E)) and a classifier (E, C) -> scores (N, C):
        softmax probabilities for CLIP, independent sigmoid probabilities for SigLIP."""
        emb = images if isinstance(images, torch.Tensor) and images.dim() == 2 and images.is_floating_point() \
            else self.encode_image(images)
        if emb.shape[1] != classifier.shape[0]:
            raise ValueError(f"embeddings of dimension {emb.shape[1]} do not match the classifier {tuple(classifier.shape)} (E, C)")
        with torch.no_grad():
            return self.model.scores(self.logits(emb, classifier.T)).float()

    @staticmethod
    def search(query_embeddings, index, k: int = 10, chunk_size: int = 65536):
        return search(query_embeddings, index, k, chunk_size)


def load_encoder(folder, dtype="auto", device="cpu") -> Encoder:
    """An `Encoder` for a CLIP, SigLIP or BERT (sentence-transformers layout) checkpoint folder.
    dtype "auto": the checkpoint's own (config.json `dtype`/`torch_dtype`)."""
    folder = Path(folder)
    cfg = read_config(folder)
    mt = cfg.get("model_type")
    dtype = resolve_dtype(dtype, cfg)
    device = check_device(device)
    if mt in FAMILIES:
        model = FAMILIES[mt].from_pretrained(folder, dtype=dtype, device=device)
        tok = None  # an image-only use needs no tokenizer.json; encode_text then says it is missing
        if (folder / "tokenizer.json").is_file():
            tok = TextTokenizer(folder, model.text_cfg.max_positions, pad_to_context=(mt == "siglip"),
                                default_pad_id=model.text_cfg.pad_token_id)
        proc = ImageProcessor.from_pretrained(folder, model.vision_cfg.image_size)
        if proc.output_size != (model.vision_cfg.image_size,) * 2:
            raise ConfigError(f"{folder}: preprocessor output {proc.output_size} does not match the model's "
                              f"image_size {model.vision_cfg.image_size}")
        return Encoder(model, tok, proc, folder, device)
    if mt == "bert":
        model = SentenceEncoder.from_pretrained(folder, dtype=dtype, device=device)
        st = read_json(folder / "sentence_bert_config.json", required=False) or {}
        ctx = min(st.get("max_seq_length", model.encoder.cfg.max_positions), model.encoder.cfg.max_positions)
        return Encoder(model, TextTokenizer(folder, ctx, default_pad_id=model.encoder.cfg.pad_token_id), None, folder,
                       device)
    raise ConfigError(f"{folder / 'config.json'}: model_type {mt!r} is not an encoder "
                      f"(supported: {sorted(FAMILIES) + ['bert']})")
