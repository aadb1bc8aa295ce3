"""VisionLanguageModel: generation from images and text on the decoder's `Engine`.

A request is prepared (template, tokens, placeholder expansion, image preprocessing, every
check) before any model work. Prefill runs the tower once per distinct image of the call, splices
the projected features into the prompt's embeddings and writes them into the static KV cache
through the decoder's own forward; decoding, sampling, streaming, stop strings and speculative
decoding are the `Engine`'s, unchanged. Prefix reuse: a batch-1 request whose leading tokens and
images match what the cache already holds (a follow-up question in the same conversation) keeps
those positions and prefills only the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import torch

from mmfuse.kernels.cpu_linear import freeze

from ..decoder.generate import DecodeState, Engine
from ..generation.params import SamplingParams
from ..generation.requests import defaults_from_generation_config
from .loader import load_vlm
from .multimodal import MultimodalModel
from .processor import MultimodalPrompt, VlmProcessor


def common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class VisionLanguageModel(Engine):
    def __init__(self, model: MultimodalModel, processor: VlmProcessor, defaults: Optional[dict] = None,
                 prefix_reuse: bool = True):
        super().__init__(model.decoder, processor.tokenizer, defaults)
        self.vlm, self.processor = freeze(model), processor  # weights are constants: the CPU may pack them
        self.prefix_reuse = prefix_reuse
        self.reused_positions = 0         # positions the last prefill kept from the cache (for tests, benchmarks)

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu", prefix_reuse: bool = True) -> "VisionLanguageModel":
        folder = Path(folder)
        model = load_vlm(folder, dtype=dtype, device=device)
        return cls(model, VlmProcessor.from_pretrained(folder, model.cfg), defaults_from_generation_config(folder),
                   prefix_reuse=prefix_reuse)

    # ---- requests
    def prepare(self, prompt, images=None) -> MultimodalPrompt:
        """Template, tokenize, expand placeholders and preprocess images; raises on bad input."""
        if isinstance(prompt, MultimodalPrompt):
            return prompt
        return self.processor(prompt, images)

    def encode(self, prompt, where: str = "prompt") -> list:
        if isinstance(prompt, MultimodalPrompt):
            return prompt
        if isinstance(prompt, (str, list)) and (isinstance(prompt, str) or not prompt or isinstance(prompt[0], dict)):
            return self.processor(prompt)
        return super().encode(prompt, where)

    def _batch(self, prompts, images) -> tuple:
        """(list of MultimodalPrompt, single?) from one request or a batch of them."""
        single = isinstance(prompts, (str, MultimodalPrompt)) or (
            isinstance(prompts, list) and (not prompts or isinstance(prompts[0], dict)))
        if single:
            return [self.prepare(prompts, images)], True
        prompts = list(prompts)
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
        return [self.prepare(p, im) for p, im in zip(prompts, images)], False

    # ---- generation
    def generate(self, prompts, images=None, params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
                 **overrides) -> list:
        """Complete one request (a prompt string with image placeholders, or a list of chat messages)
        with `images` (one image or a list), or a batch: a list of requests with `images` a list of
        per-request image lists. Returns a list of `Completion`."""
        batch, _ = self._batch(prompts, images)
        if not batch:
            raise ValueError("generate() got no prompts")
        return super().generate(batch, params, ignore_eos=ignore_eos, **overrides)

    def stream(self, prompt, images=None, params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
               **overrides) -> Iterator:
        """Yield a `StreamChunk` per generated token of one request."""
        (req,), _ = self._batch(prompt, images)
        yield from super().stream(req, params, ignore_eos=ignore_eos, **overrides)

    def caption(self, image, prompt: str = "Describe this image.", **overrides) -> str:
        """A description of one image (the folder's chat template around `prompt`)."""
        return self.ask(image, prompt, **overrides)

    def ask(self, image, question: str, **overrides) -> str:
        """The answer to a question about one image."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.generate(messages, images=[image], **overrides)[0].text

    # ---- the model side
    def _take_state(self, batch: int, max_len: int) -> DecodeState:
        """Batch 1 keeps its cache across requests (for prefix reuse), growing it with its contents."""
        with self._idle_lock:
            s = self._idle
            if batch == 1 and s is not None and s.cache.batch == 1 and s.cache.max_len < max_len:
                s.cache.grow(min(self.model.cfg.max_seq_len, max(max_len, 2 * s.cache.max_len)))
        return super()._take_state(batch, max_len)

    def image_features(self, images: list) -> list:
        """Prepared images -> their projected features, each (tokens, d)."""
        return self.vlm.image_features(images)

    @torch.inference_mode()
    def prefill(self, state: DecodeState, prompts: list) -> torch.Tensor:
        single = len(prompts) == 1 and isinstance(prompts[0], MultimodalPrompt)
        keys = prompts[0].keys() if single else None
        start = [0] * len(prompts)
        if single and self.prefix_reuse and state.cache.tokens is not None:
            held = state.cache.tokens[: state.cache.filled[0]]  # the cache's own record: safe while this call owns it
            start = [min(common_prefix(held, keys), len(keys) - 1)]
        self.reused_positions = start[0] if single else 0
        # The tower runs once per distinct image that the prefill still needs.
        need = {}
        for p, s in zip(prompts, start):
            if isinstance(p, MultimodalPrompt):
                for i in p.images_from(s):
                    need.setdefault(p.images[i].digest, p.images[i])
        feats = dict(zip(need, self.image_features(list(need.values())))) if need else {}
        embeds = [self._row_embeddings(p, s, feats) if isinstance(p, MultimodalPrompt) else None
                  for p, s in zip(prompts, start)]
        logits = state.prefill([list(p[s:]) for p, s in zip(prompts, start)], embeds, start=start)
        state.cache.tokens = list(keys) if single and self.prefix_reuse else None
        return logits

    def _row_embeddings(self, p: MultimodalPrompt, start: int, feats: dict) -> Optional[torch.Tensor]:
        """Input embeddings (T - start, d) of positions >= start, or None when they hold no image token."""
        first = p.images_from(start)
        if not first:
            return None
        skip = p.image_tokens_before(start) - p.first_image_token(first[0])  # a cut first image
        f = torch.cat([feats[p.images[i].digest] for i in first])[skip:]  # (n_image_tokens_after_start, d)
        ids = torch.as_tensor(p[start:], device=self.model.lm_head.weight.device)
        return self.vlm.embed_prompt(ids, f)
