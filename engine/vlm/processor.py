"""From (prompt or conversation, images) to the decoder's input: token ids with each image
placeholder expanded to the image's feature count, and the images' pixels.

As transformers' LlavaProcessor: a conversation is rendered by the folder's chat template, the
text is tokenized (without adding a BOS when the rendered text already starts with it), each
`<image>` placeholder stands for one image in order, and the images are preprocessed as the
folder's preprocessor_config.json says. Every check (placeholders vs images, unreadable images,
unsupported settings) happens here, before any model work.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..chat_template import ChatTemplate
from ..checkpoint import read_json
from ..encoders.preprocess import ImageError, ImageProcessor
from ..errors import CheckpointError, ConfigError, PromptError
from ..tokenizer import load_tokenizer
from .config import VlmConfig

# preprocessor_config.json settings mmfuse implements (anything else is an error naming it).
PREPROCESSOR_KEYS = {"crop_size", "do_center_crop", "do_convert_rgb", "do_normalize", "do_rescale", "do_resize",
                     "image_mean", "image_std", "image_processor_type", "processor_class", "resample",
                     "rescale_factor", "size", "do_pad", "feature_extractor_type"}
PROCESSOR_TYPES = {"CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor", "CLIPFeatureExtractor"}


class MultimodalPrompt(list):
    """A prompt's token ids (each image placeholder expanded to `tokens_per_image` image tokens)
    carrying its images' pixels (N, 3, H, W); the c-th image token belongs to image c // tokens_per_image."""

    def __init__(self, ids: Sequence[int], pixels: Optional[torch.Tensor], digests: Sequence[str],
                 image_token_id: int, tokens_per_image: int):
        super().__init__(ids)
        self.pixels = pixels
        self.digests = list(digests)  # one content hash per image, in order
        self.image_token_id = image_token_id
        self.tokens_per_image = tokens_per_image

    def keys(self) -> list:
        """One key per position for prefix matching: the token id, or (image digest, index) for an image token."""
        out, c, k = [], 0, self.tokens_per_image
        for t in self:
            if t == self.image_token_id:
                out.append((self.digests[c // k], c % k))
                c += 1
            else:
                out.append(t)
        return out

    def images_from(self, start: int) -> list:
        """Indices of the images with at least one token at position >= start."""
        c = sum(1 for t in self[:start] if t == self.image_token_id)
        return list(range(c // self.tokens_per_image, len(self.digests))) if self.tokens_per_image else []


def image_processor_for(folder, cfg: VlmConfig) -> ImageProcessor:
    """The image preprocessing of preprocessor_config.json, or of processor_config.json's
    "image_processor" object (where transformers >= 5 writes it)."""
    path = Path(folder) / "preprocessor_config.json"
    pc = read_json(path, required=False)
    if pc is None:
        outer = read_json(Path(folder) / "processor_config.json", required=False) or {}
        pc, path = outer.get("image_processor"), Path(folder) / "processor_config.json"
        if not isinstance(pc, dict):
            raise CheckpointError(f"{folder}: no preprocessor_config.json (nor an 'image_processor' object in "
                                  "processor_config.json): a vision-language model needs its image preprocessing settings")
    unknown = sorted(set(pc) - PREPROCESSOR_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unsupported image preprocessing setting(s): {unknown}")
    kind = str(pc.get("image_processor_type", pc.get("feature_extractor_type", "CLIPImageProcessor")))
    if kind.removesuffix("Fast") not in PROCESSOR_TYPES:
        raise ConfigError(f"{path}: image_processor_type {kind!r} is not supported (supported: {sorted(PROCESSOR_TYPES)})")
    proc = ImageProcessor.from_config(pc, str(path))
    side = cfg.vision.image_size
    if proc.output_size != (side, side):
        raise ConfigError(f"{path}: images come out {proc.output_size}, but the vision tower takes {side}x{side}")
    return proc


class VlmProcessor:
    def __init__(self, tokenizer, images: ImageProcessor, template: Optional[ChatTemplate], cfg: VlmConfig):
        self.tokenizer, self.images, self.template, self.cfg = tokenizer, images, template, cfg
        self.image_token = tokenizer.id_to_token(cfg.image_token_id)
        if self.image_token is None:
            raise ConfigError(f"image_token_index={cfg.image_token_id} is not a token of the tokenizer")
        self.bos_token = template.special_tokens.get("bos_token") if template is not None else None

    @classmethod
    def from_pretrained(cls, folder, cfg: VlmConfig) -> "VlmProcessor":
        return cls(load_tokenizer(folder), image_processor_for(folder, cfg), ChatTemplate.from_folder(folder), cfg)

    def render(self, messages: list, add_generation_prompt: bool = True) -> tuple:
        """(prompt text, images found in the messages' content parts) of a conversation."""
        if self.template is None:
            raise PromptError("the checkpoint folder has no chat template (chat_template.json, chat_template.jinja "
                              "or tokenizer_config.json): pass a prompt string with image placeholders instead")
        found = []
        for m in messages if isinstance(messages, list) else []:
            content = m.get("content") if isinstance(m, dict) else None
            for part in content if isinstance(content, list) else []:
                if isinstance(part, dict) and part.get("type") == "image":
                    for key in ("image", "path", "url"):
                        if part.get(key) is not None:
                            if key == "url":
                                raise PromptError(f"image URLs are not fetched ({part['url']!r}): pass the image itself")
                            found.append(part[key])
        return self.template.render(messages, add_generation_prompt=add_generation_prompt), found

    def __call__(self, prompt, images=None, add_generation_prompt: bool = True) -> MultimodalPrompt:
        """A prompt string (with image placeholders) or a conversation, and its images (one, a list, or
        None) -> a `MultimodalPrompt`."""
        images = [] if images is None else ImageProcessor.as_list(images)
        if isinstance(prompt, str):
            text, special = prompt, True
        elif isinstance(prompt, list):
            text, found = self.render(prompt, add_generation_prompt)
            if found and images:
                raise PromptError("images are given both inside the messages and as images=: give them one way")
            images = images or found
            special = not (self.bos_token and text.startswith(self.bos_token))
        else:
            raise PromptError(f"a prompt is a string or a list of messages, not {type(prompt).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=special).ids
        n = sum(1 for t in ids if t == self.cfg.image_token_id)
        if n != len(images):
            raise PromptError(f"the prompt has {n} image placeholder(s) {self.image_token!r} but {len(images)} "
                              f"image(s) were given")
        k = self.cfg.tokens_per_image
        out = []
        for t in ids:
            out.extend([t] * k if t == self.cfg.image_token_id else [t])
        if not images:
            return MultimodalPrompt(out, None, [], self.cfg.image_token_id, k)
        pixels = torch.stack([torch.as_tensor(self.images.process_one(im, f"image {i}")) for i, im in enumerate(images)])
        digests = [hashlib.sha1(p.numpy().tobytes()).hexdigest() for p in pixels]
        return MultimodalPrompt(out, pixels, digests, self.cfg.image_token_id, k)


__all__ = ["MultimodalPrompt", "VlmProcessor", "ImageError", "image_processor_for"]
