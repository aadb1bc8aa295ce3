"""The torch-free twin of `mmfuse.vlm.processor.VlmProcessor`: (prompt or conversation, images) ->
token ids with each `<image>` placeholder expanded to `tokens_per_image` image tokens, and the
images' pixels (N, 3, H, W) as numpy. Same rules and errors: a conversation is rendered by the
folder's chat template (no BOS added when the text already starts with it), placeholders and images
must match in number, images are preprocessed by `mmfuse.encoders.preprocess.ImageProcessor`'s
numpy pipeline. tests/test_onnx_vlm.py checks it gives VlmProcessor's ids and pixels.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..encoders.preprocess import ImageProcessor
from ..errors import ConfigError, PromptError


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


def render_messages(template, messages: list, add_generation_prompt: bool = True) -> tuple:
    """(text, images given inside the messages' content parts) of a conversation."""
    if template is None:
        raise PromptError("the folder has no chat template (chat_template.json, chat_template.jinja or "
                          "tokenizer_config.json): pass a prompt string with image placeholders instead")
    found = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                if part.get("url") is not None:
                    raise PromptError(f"image URLs are not fetched ({part['url']!r}): pass the image itself")
                found += [part[k] for k in ("image", "path") if part.get(k) is not None][:1]
    return template.render(messages, add_generation_prompt=add_generation_prompt), found


def split_prompt(prompt, images, template, image_token: str, add_generation_prompt: bool = True) -> tuple:
    """A prompt string (with image placeholders) or a conversation and its images (one, a list or None)
    -> (text pieces around the placeholders, the images, whether the tokenizer adds special tokens:
    not when the rendered conversation already starts with the BOS). The checks (prompt type, images
    given twice, placeholders vs images) happen here. Torch-free: mmfuse.vlm's processor can use it."""
    images = [] if images is None else ImageProcessor.as_list(images)
    if isinstance(prompt, str):
        text, special = prompt, True
    elif isinstance(prompt, list):
        text, found = render_messages(template, prompt, add_generation_prompt)
        if found and images:
            raise PromptError("images are given both inside the messages and as images=: give them one way")
        images = images or found
        bos = template.special_tokens.get("bos_token")
        special = not (bos and text.startswith(bos))
    else:
        raise PromptError(f"a prompt is a string or a list of messages, not {type(prompt).__name__}")
    parts = text.split(image_token)
    if len(parts) - 1 != len(images):
        raise PromptError(f"the prompt has {len(parts) - 1} image placeholder(s) {image_token!r} but "
                          f"{len(images)} image(s) were given")
    return parts, images, special
