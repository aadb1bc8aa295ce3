"""OrtEncoder: the encoder API of `mmfuse.encoders.Encoder` on an ONNX export, without torch.

    enc = OrtEncoder.from_pretrained("clip-onnx")                     # from mmfuse.export
    img = enc.encode_image(["cat.jpg", pil_image, uint8_array])      # (3, E) float32 numpy
    clf = enc.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
    probs = enc.classify(img, clf)                                    # (3, 2)

Same signatures and results as `Encoder`, numpy arrays in place of tensors. Preprocessing
(encoders/preprocess.py), tokenisation and batching (encoders/tokens.py) and zero-shot averaging
(encoders/zeroshot.py) are the PyTorch encoder's own torch-free code. Imports numpy, onnxruntime,
tokenizers and pillow only.

The export folder is checked when loaded: every file the manifest (`mmfuse_export.json`, `manifest.py`) lists
must be there with its recorded size, and each graph's inputs and outputs must match the manifest;
otherwise ExportFolderError names the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..encoders.preprocess import ImageProcessor
from ..encoders.tokens import TextTokenizer, check_texts, text_batches
from ..encoders.zeroshot import build_zero_shot_classifier, l2_normalize
from ..errors import ExportFolderError
from .manifest import manifest_path
from .manifest import read_manifest as read_export_manifest
from .session import make_session

ENCODER_KINDS = ("clip", "siglip", "bert")


class OrtEncoder:
    def __init__(self, folder, manifest: dict, vision, text, tokenizer: Optional[TextTokenizer],
                 processor: Optional[ImageProcessor]):
        self.folder, self.manifest = Path(folder), manifest
        self.vision, self.text, self.tokenizer, self.processor = vision, text, tokenizer, processor
        self.kind = manifest["kind"]

    @classmethod
    def from_pretrained(cls, onnx_dir, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                        optimization: str = "all") -> "OrtEncoder":
        """Load an export folder. `threads`: intra-op threads (None: onnxruntime's default, one per
        core); `providers`: execution providers in order of preference (default CPU); `optimization`:
        graph optimisation level ("disable", "basic", "extended", "all")."""
        folder = Path(onnx_dir)
        manifest = read_manifest(folder)
        options = dict(threads=threads, providers=providers, optimization=optimization)
        make_session(None, **options)  # option errors before any graph is loaded
        vision = text = None
        if "vision" in manifest:
            S, C = manifest["image_size"], manifest["num_channels"]
            vision = load_graph(folder, manifest["vision"], options, {"pixel_values": [None, C, S, S]},
                                manifest["embed_dim"])
        text = load_graph(folder, manifest["text"], options, {n: [None, None] for n in manifest["text"]["inputs"]},
                          manifest["embed_dim"])
        tok = None
        if (folder / "tokenizer.json").is_file():
            tok = TextTokenizer(folder, manifest["context_length"], pad_to_context=manifest["pad_to_context"],
                                default_pad_id=manifest["pad_id"])
        proc = None
        if vision is not None:
            proc = ImageProcessor.from_pretrained(folder, manifest["image_size"])
            if proc.output_size != (manifest["image_size"],) * 2:
                raise ExportFolderError(f"{folder / 'preprocessor_config.json'}: output size {proc.output_size} does "
                                        f"not match the exported image size {manifest['image_size']}")
        return cls(folder, manifest, vision, text, tok, proc)

    @property
    def has_images(self) -> bool:
        return self.vision is not None

    @property
    def embedding_dim(self) -> int:
        """E, the width of the embeddings."""
        return self.manifest["embed_dim"]

    def encode_image(self, images, batch_size: int = 32, normalize: bool = True) -> np.ndarray:
        """Images (PIL, paths, uint8 arrays; one or a batch) -> embeddings (N, E) float32. A float
        array (B, 3, H, W) or (3, H, W) is taken as already preprocessed pixels, as `Encoder` does."""
        if not self.has_images:
            raise ValueError(f"this {self.kind} export has no image tower: encode_image needs a CLIP or SigLIP export")
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            px = images[None] if images.ndim == 3 else images
            if len(px) == 0:
                raise ValueError("empty image batch: nothing to encode")
            return np.concatenate([self.encode_pixels(px[s:s + batch_size], normalize)
                                   for s in range(0, len(px), batch_size)])
        items = ImageProcessor.as_list(images)
        if not items:
            raise ValueError("empty image batch: nothing to encode")
        out = [self.run_vision(self.processor.pixels(items[s:s + batch_size]))
               for s in range(0, len(items), batch_size)]
        e = np.concatenate(out)
        return l2_normalize(e) if normalize else e

    def encode_pixels(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Already preprocessed pixels (B, 3, H, W) -> embeddings (B, E)."""
        if not self.has_images:
            raise ValueError(f"this {self.kind} export has no image tower")
        S, C = self.manifest["image_size"], self.manifest["num_channels"]
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (C, S, S):
            raise ValueError(f"pixel batch has shape {tuple(pixels.shape)}, expected (B, {C}, {S}, {S})")
        e = self.run_vision(pixels)
        return l2_normalize(e) if normalize else e

    def run_vision(self, pixels: np.ndarray) -> np.ndarray:
        session, spec = self.vision
        return session.run([spec["output"]], {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def encode_text(self, texts: Sequence[str], batch_size: int = 64, normalize: bool = True,
                    bucket: bool = True) -> np.ndarray:
        """Texts -> embeddings (N, E) float32, in input order, batched as `Encoder.encode_text`."""
        texts = check_texts(texts)
        if self.tokenizer is None:
            raise ExportFolderError(f"{self.folder / 'tokenizer.json'}: file not found (text needs the tokenizer)")
        seqs = self.tokenizer.encode(texts)
        session, spec = self.text
        out = np.empty((len(seqs), self.manifest["embed_dim"]), dtype=np.float32)
        for idx in text_batches(seqs, batch_size, bucket and not self.tokenizer.pad_to_context):
            ids, lengths = self.tokenizer.pad([seqs[i] for i in idx])
            feeds = {"input_ids": ids}
            if "attention_mask" in spec["inputs"]:
                feeds["attention_mask"] = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int64)
            if "token_type_ids" in spec["inputs"]:
                feeds["token_type_ids"] = np.zeros_like(ids)
            out[idx] = session.run([spec["output"]], feeds)[0]
        return l2_normalize(out) if normalize else out

    def zero_shot_classifier(self, classnames: Sequence[str], templates=("a photo of a {}.",)) -> np.ndarray:
        """(E, C) class embeddings: templates filled with each class name, averaged and normalised."""
        return build_zero_shot_classifier(self.encode_text, classnames, templates)

    def logits(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """Normalised embeddings (Ni, E), (Nt, E) -> logits_per_image (Ni, Nt), with the exported
        logit scale (and SigLIP's bias)."""
        if not self.has_images:
            raise ValueError("logits need a CLIP or SigLIP export")
        z = np.float32(np.exp(self.manifest["logit_scale"])) * (np.asarray(image_emb, np.float32)
                                                                 @ np.asarray(text_emb, np.float32).T)
        bias = self.manifest.get("logit_bias")
        return z + np.float32(bias) if bias is not None else z

    def classify(self, images, classifier: np.ndarray) -> np.ndarray:
        """Images (or their normalised embeddings (N, E)) and a classifier (E, C) -> scores (N, C):
        softmax probabilities for CLIP, independent sigmoid probabilities for SigLIP."""
        is_emb = isinstance(images, np.ndarray) and images.ndim == 2 and images.dtype.kind == "f"
        emb = images if is_emb else self.encode_image(images)
        classifier = np.asarray(classifier, np.float32)
        if emb.shape[1] != classifier.shape[0]:
            raise ValueError(f"embeddings of dimension {emb.shape[1]} do not match the classifier "
                             f"{tuple(classifier.shape)} (E, C)")
        z = self.logits(emb, classifier.T)
        if self.manifest["scores"] == "sigmoid":
            return 1 / (1 + np.exp(-z))
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


def read_manifest(folder: Path) -> dict:
    """The export's manifest (`manifest.read_manifest`: every file it lists present with its
    recorded size), with the keys the encoder reads."""
    manifest = read_export_manifest(folder, ENCODER_KINDS)
    for key in ("embed_dim", "text", "files", "context_length", "pad_to_context", "pad_id", "scores"):
        if key not in manifest:
            raise ExportFolderError(f"{manifest_path(folder)}: missing key {key!r}")
    return manifest


def load_graph(folder: Path, spec: dict, options: dict, inputs: dict, embed_dim: int):
    """(session, spec) for one graph, its inputs and output checked against the manifest."""
    path = folder / spec["file"]
    if not path.is_file():
        raise ExportFolderError(f"{path}: file not found")
    try:
        session = make_session(path, **options)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        raise ExportFolderError(f"{path}: onnxruntime cannot load the graph ({str(e).splitlines()[0]})") from None
    got = {i.name: i.shape for i in session.get_inputs()}
    if set(got) != set(inputs):
        raise ExportFolderError(f"{path}: graph inputs {sorted(got)}, the export recorded {sorted(inputs)}")
    for name, shape in inputs.items():
        fixed = [(d, s) for d, s in zip(got[name], shape) if s is not None]
        if len(got[name]) != len(shape) or any(d != s for d, s in fixed):
            raise ExportFolderError(f"{path}: input {name} has shape {got[name]}, expected {shape}")
    outs = {o.name: o.shape for o in session.get_outputs()}
    out = outs.get(spec["output"])
    if out is None or len(out) != 2 or out[1] != embed_dim:
        raise ExportFolderError(f"{path}: outputs {outs}, expected {spec['output']} of shape [batch, {embed_dim}]")
    return session, spec
