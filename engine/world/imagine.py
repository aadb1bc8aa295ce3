"""Text-to-image for the world: a caption -> image tokens -> pixels (the autoregressive recipe of
DALL-E / Chameleon-style models, at the world's scale).

A Llama-family `Decoder` reads <s> caption <boi> and writes the VQ codes of the image (`world.vq`)
as tokens <img0> ... <imgK-1>, in raster order; the VQ decoder turns them into pixels. Sampling
is the engine's (`Engine.generate`: KV cache, temperature / top-k / top-p, seeds), with optional
classifier-free guidance: the unconditional prompt is <s> <boi> (the model saw it through caption
dropout), the conditional and unconditional rows run in one batch and a logits processor mixes
them (`generation.processors`). Outside the image tokens nothing is sampled.

The model folder is a Hugging Face decoder folder (config.json, model.safetensors, tokenizer.json:
transformers' LlamaForCausalLM loads it) plus the VQ tokenizer's vq.json and vq.safetensors.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..decoder.generate import Engine
from ..jsonfile import read_json
from ..generation.processors import AllowedTokens, ClassifierFreeGuidance, chain, guidance_params
from .language import VOCABULARY
from .models import BOS, chat_tokenizer
from .vq import VQTokenizer

BOI = "<boi>"                                  # begin of image: the last prompt token


def image_token(i: int) -> str:
    return f"<img{i}>"


def imagine_tokenizer(codebook_size: int):
    """The world's chat tokenizer plus <boi> and one token per VQ code (contiguous ids)."""
    tok = chat_tokenizer(extra=(BOI, *(image_token(i) for i in range(codebook_size))))
    first = tok.token_to_id(image_token(0))
    assert tok.token_to_id(image_token(codebook_size - 1)) == first + codebook_size - 1
    return tok


def prompt_ids(tok, caption: Optional[str]) -> list:
    """<s> caption <boi> (caption None or "": the unconditional prompt <s> <boi>)."""
    words = VOCABULARY.check(caption, "caption").split() if caption else []
    return [tok.token_to_id(BOS), *(tok.token_to_id(w) for w in words), tok.token_to_id(BOI)]


class Imaginer:
    """A caption-to-image-token `Engine` and the `VQTokenizer` that turns the tokens into pixels."""

    def __init__(self, engine: Engine, vq: VQTokenizer, guidance: float = 1.0):
        self.engine, self.vq = engine, vq
        self.guidance = guidance  # default classifier-free guidance scale (generation_config.json guidance_scale)
        self.first_image_id = engine.tokenizer.token_to_id(image_token(0))
        self.codebook_size = vq.cfg.codebook_size

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> "Imaginer":
        folder = Path(folder)
        vq = VQTokenizer.load(folder, device=device)
        gc = read_json(folder / "generation_config.json", required=False) or {}
        return cls(Engine.from_pretrained(folder, dtype="float32", device=device), vq, gc.get("guidance_scale", 1.0))

    def prompt(self, caption: Optional[str]) -> list:
        return prompt_ids(self.engine.tokenizer, caption)

    def tokens(self, captions: list, guidance: float = 1.0, params=None, **overrides) -> torch.Tensor:
        """VQ codes (B, tokens) of each caption; `params`: one SamplingParams or one per caption.
        guidance != 1 runs an unconditional row beside each caption, in the same batch."""
        prompts = [self.prompt(c) for c in captions]  # VocabularyError before any model work
        plist = params if isinstance(params, list) else [params] * len(prompts)
        plist = [self.engine.params(p, **overrides, max_new_tokens=self.vq.cfg.tokens) for p in plist]
        proc = AllowedTokens(self.first_image_id, self.first_image_id + self.codebook_size)
        if guidance != 1.0:
            prompts = prompts + [self.prompt(None)] * len(prompts)
            plist = guidance_params(plist)
            proc = chain(ClassifierFreeGuidance(guidance), proc)
        out = self.engine.generate(prompts, plist, ignore_eos=True, logits_processor=proc)[:len(captions)]
        return torch.tensor([c.token_ids for c in out]) - self.first_image_id

    def imagine(self, caption, guidance: Optional[float] = None, seed: Optional[int] = 0, **sampling) -> np.ndarray:
        """uint8 image (64, 64, 3) of a caption, or (B, 64, 64, 3) of a list of captions (caption b
        seeded seed + b). `guidance` and `sampling` (temperature, top_k, top_p, ...: SamplingParams
        fields) default to the model's (generation_config.json); words outside the world's
        vocabulary raise VocabularyError."""
        single = isinstance(caption, str)
        captions = [caption] if single else list(caption)
        if not captions:
            raise ValueError("imagine() got no captions")
        base = self.engine.params(**{k: v for k, v in sampling.items() if v is not None})
        params = [replace(base, seed=None if seed is None else seed + b) for b in range(len(captions))]
        images = self.vq.decode(self.tokens(captions, self.guidance if guidance is None else guidance, params))
        return images[0] if single else images
