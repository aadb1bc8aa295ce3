"""`OrtVLM`: generation from images and text on an mmfuse vision-language ONNX export (llava,
llava_next, idefics3 / smolvlm), without torch.

A request is prepared by mmfuse.vlm's own torch-free `VlmProcessor` (chat template, tokens,
placeholder expansion, image preprocessing and tiling, every check) from the config and processor
files copied into the export, before any model work. Prefill: embedding.onnx gives the prompt's
token embeddings with the image tokens' rows replaced by the images' features: vision.onnx gives
the tiles' features (once for all images of the call), packed per image in placeholder order
(llava_next: `anyres.pack_order` with the graph's `image_newline`, as the PyTorch model packs
them); the decoder graph (inputs_embeds) fills
its KV cache through `DecoderSession`. Each decoded token goes through embedding.onnx again.
Sampling, stop handling, streaming and output objects are `GenerationFrontend`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import ExportFolderError, ImageError
from ..generation.frontend import Generation, GenerationFrontend
from ..generation.requests import defaults_from_generation_config
from ..generation.sampling_np import NumpySampler
from ..jsonfile import read_config
from ..vlm.anyres import pack_order
from ..vlm.config import vlm_config
from ..vlm.processor import MultimodalPrompt, VlmProcessor
from .decoder_session import GRAPH_FILE, RUNTIME_GRAPH, DecoderSession
from .engine import OrtModelConfig
from .manifest import read_manifest
from .session import make_session


class OrtVLM(GenerationFrontend):
    """A VLM export: `generate(prompt or messages, images=...)`, `stream()`, `image_features()`."""

    def __init__(self, vision, embedding, decoder, manifest: dict, decoder_manifest: dict, vlm_cfg,
                 processor: VlmProcessor, defaults: Optional[dict] = None):
        self.vision, self.embedding, self.decoder = vision, embedding, decoder  # InferenceSessions
        self.manifest, self.decoder_manifest, self.vlm_cfg = manifest, decoder_manifest, vlm_cfg
        self.processor, self.tokenizer = processor, processor.tokenizer
        c = decoder_manifest["config"]
        self.cfg = OrtModelConfig(c["vocab_size"], c["max_seq_len"], tuple(c["eos_token_ids"]))
        self.defaults = dict(defaults or {})

    @classmethod
    def from_pretrained(cls, onnx_dir, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                        graph_optimization_level: str = "all", spinning: bool = True) -> "OrtVLM":
        """Open an export folder of `mmfuse export onnx` on a vision-language checkpoint (options are
        checked before anything is read)."""
        make_session(None, threads, providers, graph_optimization_level)
        folder = Path(onnx_dir)
        manifest = read_manifest(folder, "vlm")
        dec_dir = folder / manifest["decoder"]
        dec = read_manifest(dec_dir, "decoder")
        if not dec.get("inputs_embeds"):
            raise ExportFolderError(f"{dec_dir}: the decoder of a vision-language export must take inputs_embeds")
        cfg = vlm_config(read_config(folder), str(folder / "config.json"))

        def session(path):
            return make_session(path, threads, providers, graph_optimization_level, spinning)

        graph = RUNTIME_GRAPH if RUNTIME_GRAPH in dec.get("files", {}) else GRAPH_FILE
        return cls(session(folder / manifest["vision"]["file"]), session(folder / manifest["embedding"]["file"]),
                   session(dec_dir / graph), manifest, dec, cfg, VlmProcessor.from_pretrained(folder, cfg),
                   defaults_from_generation_config(folder))

    # ---- requests
    def prepare(self, prompt, images=None) -> MultimodalPrompt:
        """Template, tokenize, expand placeholders and preprocess images; raises on bad input."""
        return prompt if isinstance(prompt, MultimodalPrompt) else self.processor(prompt, images)

    def encode(self, prompt, where: str = "prompt") -> list:
        return prompt if isinstance(prompt, MultimodalPrompt) else self.processor(prompt)

    def _batch(self, prompts, images) -> list:
        if isinstance(prompts, (str, MultimodalPrompt)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            return [self.prepare(prompts, images)]
        prompts = list(prompts)
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        return [self.prepare(p, im) for p, im in zip(prompts, images)]

    def generate(self, prompts, images=None, params=None, *, ignore_eos: bool = False, **overrides) -> list:
        """One request (a prompt string with `<image>` placeholders, or chat messages) with `images`
        (one or a list), or a batch of requests with `images` a list of per-request image lists.
        -> a list of `Completion`."""
        batch = self._batch(prompts, images)
        if not batch:
            raise ValueError("generate() got no prompts")
        return super().generate(batch, params, ignore_eos=ignore_eos, **overrides)

    def stream(self, prompt, images=None, params=None, *, ignore_eos: bool = False, **overrides) -> Iterator:
        """Yield a `StreamChunk` per generated token of one request."""
        (req,) = self._batch(prompt, images)
        yield from super().stream(req, params, ignore_eos=ignore_eos, **overrides)

    # ---- graphs
    def _vision(self, pixels: np.ndarray) -> list:
        S = self.manifest["image_size"]
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (3, S, S):
            raise ImageError(f"pixels of shape {tuple(pixels.shape)}: the vision graph takes (N, 3, {S}, {S})")
        return self.vision.run(None, {"pixel_values": np.ascontiguousarray(pixels, np.float32)})

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """Preprocessed tiles (N, 3, S, S) float32 -> projected features (N, tokens per tile, d)."""
        return self._vision(pixels)[0]

    def packed_features(self, images: list) -> list:
        """Prepared images -> the features of each image's placeholder tokens, in order: (tokens, d)."""
        tiles, *newline = self._vision(np.concatenate([im.pixels for im in images]))  # (N_all, T, d), [(d,)]
        out, used = [], 0
        for im in images:
            f = tiles[used: used + len(im.pixels)]
            used += len(im.pixels)
            flat = f.reshape(-1, f.shape[-1])
            if newline:  # llava_next: the graph's image_newline follows each row of the unpadded tile grid
                c = self.vlm_cfg
                order = pack_order(im.size[0], im.size[1], len(f), c.grid_pinpoints, c.vision.image_size, c.grid_side,
                                   f.shape[1])
                flat = np.concatenate([flat, newline[0][None].astype(flat.dtype)])[order]
            out.append(flat)
        return out

    def embed(self, ids: np.ndarray, features: Optional[np.ndarray] = None) -> np.ndarray:
        """Token ids (B, T) -> embeddings (B, T, d), the image tokens' rows replaced in order by the
        rows of `features` (.., d) (as many as there are image tokens)."""
        d = self.manifest["d_model"]
        features = np.zeros((0, 0, d), np.float32) if features is None else features.reshape(1, -1, d)
        return self.embedding.run(None, {"input_ids": np.ascontiguousarray(ids, np.int64),
                                         "image_features": np.ascontiguousarray(features, np.float32)})[0]

    def prompt_embeddings(self, prompts: list) -> list:
        """Each prompt's input embeddings (T, d): token embeddings, image-token rows replaced in order by
        its images' packed features (the vision graph runs once on all images of the call)."""
        images = [im for p in prompts for im in getattr(p, "images", ())]
        feats = iter(self.packed_features(images) if images else ())
        out = []
        for p in prompts:
            mine = [next(feats) for _ in getattr(p, "images", ())]
            out.append(self.embed(np.asarray(p, np.int64)[None], np.concatenate(mine) if mine else None)[0])
        return out

    def _start(self, prompts: list, params: list) -> Generation:
        s = DecoderSession(self.decoder, self.decoder_manifest)  # per call: concurrent calls share no cache
        s.allocate(len(prompts), max(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)))
        sampler = NumpySampler(params, self.cfg.vocab_size, prompts)
        logits = s.prefill([e.astype(s.dtype) for e in self.prompt_embeddings(prompts)])

        def step(tokens, active):  # (B,) -> logits (B, V)
            x = self.embed(np.asarray(tokens, np.int64).reshape(-1, 1)).astype(s.dtype)  # (B, 1, d)
            return s.extend(x, active)[:, 0]

        return Generation(sampler, logits, step)
