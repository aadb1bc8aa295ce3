"""The torch-free twin of `mmfuse.vlm.processor.VlmProcessor`, sharing its text handling
(`mmfuse.vlm.prompt`): (prompt or conversation, images) -> token ids with each `<image>`
placeholder expanded to `tokens_per_image` image tokens, and the images' pixels (N, 3, H, W) as
numpy, preprocessed by `mmfuse.encoders.preprocess.ImageProcessor`'s numpy pipeline.
tests/test_onnx_vlm.py checks it gives VlmProcessor's ids and pixels.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..encoders.preprocess import ImageProcessor
from ..errors import ConfigError, PromptError
from ..vlm.prompt import split_prompt


class ImagePrompt(list):
    """Token ids (image placeholders expanded) carrying the prompt's pixels (N, 3, H, W) or None."""

    def __init__(self, ids, pixels: Optional[np.ndarray]):
        super().__init__(ids)
        self.pixels = pixels


class VlmPrompter:
    def __init__(self, tokenizer, images: ImageProcessor, template, image_token_id: int, tokens_per_image: int):
        self.tokenizer, self.images, self.template = tokenizer, images, template
        self.image_token_id, self.tokens_per_image = image_token_id, tokens_per_image
        self.image_token = tokenizer.id_to_token(image_token_id)
        if self.image_token is None:
            raise ConfigError(f"image_token_id={image_token_id} is not a token of the tokenizer")

    def __call__(self, prompt, images=None) -> ImagePrompt:
        parts, images, special = split_prompt(prompt, images, self.template, self.image_token)
        pixels = np.stack([self.images.process_one(im, f"image {i}") for i, im in enumerate(images)]) if images else None
        text = (self.image_token * self.tokens_per_image).join(parts)  # each placeholder -> one token per feature
        ids = self.tokenizer.encode(text, add_special_tokens=special).ids
        n, want = ids.count(self.image_token_id), len(images) * self.tokens_per_image
        if n != want:
            raise PromptError(f"the prompt tokenizes to {n} image tokens {self.image_token!r} where its images "
                              f"need {want} (is the image token split or typed into the text?)")
        return ImagePrompt(ids, pixels)
