"""From (prompt or conversation, images) to the decoder's input: token ids with each image
placeholder expanded to the image's tokens, and the images' pixels.

As transformers' processors (LlavaProcessor, LlavaNextProcessor, Idefics3Processor): a
conversation is rendered by the folder's chat template, each image placeholder of the text stands
for one image in order and is replaced by the text of that image's tokens (a run of placeholders;
for idefics3 with tile headers), then the text is tokenized (without adding a BOS when the rendered
text already starts with it). The images are preprocessed as the folder's preprocessor_config.json
says: one tile (llava), a base image plus anyres tiles (llava_next), or tiles plus a global image
(idefics3). Every check (placeholders vs images, unreadable images, unsupported settings) happens
here, before any model work.
"""
from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..chat_template import ChatTemplate
from ..jsonfile import read_json
from ..encoders.preprocess import ImageError, ImageProcessor
from ..errors import CheckpointError, ConfigError, PromptError
from ..hf_config import bool_field, int_field
from ..tokenizer import load_tokenizer
from .anyres import AnyresTiler, feature_count
from .config import Idefics3Config, VlmConfig
from .image_splitting import ImageSplitter, prompt_text
from .prompt import split_prompt

# preprocessor_config.json settings mmfuse implements, per family (anything else is an error naming it).
_COMMON_KEYS = {"do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                "image_processor_type", "processor_class", "resample", "rescale_factor", "size",
                "feature_extractor_type"}
PREPROCESSOR_KEYS = {
    "llava": _COMMON_KEYS | {"crop_size", "do_center_crop", "do_pad"},
    # do_pad: llava_next and idefics3 pad a batch to one tile count / size, which changes no image
    "llava_next": _COMMON_KEYS | {"crop_size", "do_center_crop", "do_pad", "image_grid_pinpoints"},
    "idefics3": _COMMON_KEYS | {"do_pad", "do_image_splitting", "max_image_size", "video_sampling"},
}
PROCESSOR_TYPES = {
    "llava": {"CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor", "CLIPFeatureExtractor"},
    "llava_next": {"LlavaNextImageProcessor"},
    "idefics3": {"Idefics3ImageProcessor", "SmolVLMImageProcessor"},
}


@dataclass
class PreparedImage:
    """One image ready for the model: its tiles' pixels and what its placeholder becomes."""
    pixels: np.ndarray        # (tiles, 3, H, W) float32
    size: tuple               # (height, width) of the input image
    tokens: int               # image placeholder tokens (= projected features) it fills
    text: str                 # the text that replaces its placeholder in the prompt
    digest: str               # content hash of the pixels (prefix reuse, one tower run per distinct image)


class MultimodalPrompt(list):
    """A prompt's token ids (each image placeholder expanded to its image's tokens) carrying the
    images; the image tokens belong to the images in order, `images[j].tokens` of them each."""

    def __init__(self, ids: Sequence[int], images: Sequence[PreparedImage], image_token_id: int):
        super().__init__(ids)
        self.images = list(images)
        self.image_token_id = image_token_id
        self.ends = list(accumulate(im.tokens for im in self.images))  # image tokens up to each image's end

    @property
    def digests(self) -> list:
        return [im.digest for im in self.images]

    def image_tokens_before(self, start: int) -> int:
        return sum(1 for t in self[:start] if t == self.image_token_id)

    def keys(self) -> list:
        """One key per position for prefix matching: the token id, or (image digest, index) for an image token."""
        out, c, j = [], 0, 0
        for t in self:
            if t == self.image_token_id:
                while c >= self.ends[j]:
                    j += 1
                out.append((self.images[j].digest, c - (self.ends[j - 1] if j else 0)))
                c += 1
            else:
                out.append(t)
        return out

    def images_from(self, start: int) -> list:
        """Indices of the images with at least one token at position >= start."""
        c = self.image_tokens_before(start)
        return list(range(bisect.bisect_right(self.ends, c), len(self.images)))

    def first_image_token(self, j: int) -> int:
        """Image tokens before image j."""
        return self.ends[j - 1] if j else 0


def _read_preprocessor(folder) -> tuple:
    """(settings, path) of preprocessor_config.json, or of processor_config.json's "image_processor"
    object (where transformers >= 5 writes it)."""
    path = Path(folder) / "preprocessor_config.json"
    pc = read_json(path, required=False)
    if pc is None:
        outer = read_json(Path(folder) / "processor_config.json", required=False) or {}
        pc, path = outer.get("image_processor"), Path(folder) / "processor_config.json"
        if not isinstance(pc, dict):
            raise CheckpointError(f"{folder}: no preprocessor_config.json (nor an 'image_processor' object in "
                                  "processor_config.json): a vision-language model needs its image preprocessing settings")
    return pc, path


def _family(cfg) -> str:
    if isinstance(cfg, Idefics3Config):
        return "idefics3"
    return "llava" if cfg.grid_pinpoints is None else "llava_next"


def _checked(folder, cfg) -> tuple:
    """(settings, path, family) with the settings' keys and processor type checked."""
    pc, path = _read_preprocessor(folder)
    family = _family(cfg)
    unknown = sorted(set(pc) - PREPROCESSOR_KEYS[family])
    if unknown:
        raise ConfigError(f"{path}: unsupported image preprocessing setting(s): {unknown}")
    default = {"llava": "CLIPImageProcessor", "llava_next": "LlavaNextImageProcessor",
               "idefics3": "Idefics3ImageProcessor"}[family]
    kind = str(pc.get("image_processor_type", pc.get("feature_extractor_type", default)))
    if kind.removesuffix("Fast").removesuffix("Pil") not in PROCESSOR_TYPES[family]:
        raise ConfigError(f"{path}: image_processor_type {kind!r} is not supported for a {family} model "
                          f"(supported: {sorted(PROCESSOR_TYPES[family])})")
    return pc, path, family


def image_processor_for(folder, cfg: VlmConfig) -> ImageProcessor:
    """The per-tile image preprocessing of a llava / llava_next folder."""
    pc, path, family = _checked(folder, cfg)
    if family == "llava_next":
        pc = {k: v for k, v in pc.items() if k not in ("do_pad", "image_grid_pinpoints")}
    proc = ImageProcessor.from_config(pc, str(path))
    side = cfg.vision.image_size
    if proc.output_size != (side, side):
        raise ConfigError(f"{path}: images come out {proc.output_size}, but the vision tower takes {side}x{side}")
    return proc


class LlavaImages:
    """llava: one tile per image, `tokens_per_image` placeholders."""

    def __init__(self, proc: ImageProcessor, cfg: VlmConfig, image_token: str):
        self.proc, self.cfg, self.image_token = proc, cfg, image_token

    def __call__(self, image, where: str) -> PreparedImage:
        im = self.proc.load_rgb(image, where)
        pixels = self.proc.process_one(im, where)[None]
        k = self.cfg.tokens_per_image
        return _prepared(pixels, (im.height, im.width), k, self.image_token * k)


class AnyresImages:
    """llava_next: the base image and its anyres tiles; the unpadded feature grid's placeholders."""

    def __init__(self, proc: ImageProcessor, cfg: VlmConfig, image_token: str):
        self.cfg, self.image_token = cfg, image_token
        base = proc.size if "height" in proc.size else {"height": proc.size["shortest_edge"],
                                                        "width": proc.size["shortest_edge"]}
        tile = cfg.vision.image_size
        self.tiler = AnyresTiler(proc, cfg.grid_pinpoints, tile, (base["height"], base["width"]))

    def __call__(self, image, where: str) -> PreparedImage:
        pixels, (h, w) = self.tiler(image, where)
        cfg = self.cfg
        n = feature_count(h, w, cfg.grid_pinpoints, cfg.vision.image_size, cfg.grid_side, cfg.tokens_per_image)
        return _prepared(pixels, (h, w), n, self.image_token * n)


class SplitImages:
    """idefics3 / smolvlm: tiles plus a global image, each tile with its header tokens."""

    def __init__(self, splitter: ImageSplitter, cfg: Idefics3Config, image_token: str):
        self.splitter, self.cfg, self.image_token = splitter, cfg, image_token

    def __call__(self, image, where: str) -> PreparedImage:
        pixels, (rows, cols) = self.splitter(image, where)
        k = self.cfg.tokens_per_tile
        return _prepared(pixels, (rows, cols), k * len(pixels), prompt_text(rows, cols, k, self.image_token))


def _prepared(pixels: np.ndarray, size: tuple, tokens: int, text: str) -> PreparedImage:
    return PreparedImage(pixels, size, tokens, text, hashlib.sha1(pixels.tobytes()).hexdigest())


def images_for(folder, cfg, image_token: str):
    """The image preparation (an `image, where -> PreparedImage` callable) a folder's settings describe."""
    family = _family(cfg)
    if family != "idefics3":
        proc = image_processor_for(folder, cfg)
        if family == "llava":
            return LlavaImages(proc, cfg, image_token)
        pc, path = _read_preprocessor(folder)
        pins = pc.get("image_grid_pinpoints")
        if pins is not None and [list(p) for p in pins] != [list(p) for p in cfg.grid_pinpoints]:
            raise ConfigError(f"{path}: image_grid_pinpoints {pins} differ from config.json's "
                              f"{[list(p) for p in cfg.grid_pinpoints]}")
        return AnyresImages(proc, cfg, image_token)
    pc, path, _ = _checked(folder, cfg)

    def longest(key: str, default: int) -> int:
        v = pc.get(key, {"longest_edge": default})
        if not (isinstance(v, dict) and set(v) == {"longest_edge"}):
            raise ConfigError(f"{path}: {key}={v!r} is not supported (expected {{'longest_edge': n}})")
        return int_field(v, "longest_edge", f"{path}: {key}", maximum=2**14)

    tile = longest("max_image_size", 364)
    if tile != cfg.vision.image_size:
        raise ConfigError(f"{path}: max_image_size.longest_edge={tile} differs from the vision tower's image_size "
                          f"{cfg.vision.image_size} (tiles of another size are not supported)")
    common = {k: v for k, v in pc.items() if k in _COMMON_KEYS - {"size"}}
    common.setdefault("image_mean", [0.5, 0.5, 0.5])  # Idefics3ImageProcessor's defaults
    common.setdefault("image_std", [0.5, 0.5, 0.5])
    common.setdefault("resample", 1)
    proc = ImageProcessor.from_config({**common, "size": {"height": tile, "width": tile}}, str(path))
    splitter = ImageSplitter(proc, longest("size", 4 * 364), tile,
                             bool_field(pc, "do_image_splitting", str(path), True),
                             bool_field(pc, "do_resize", str(path), True))
    return SplitImages(splitter, cfg, image_token)


class VlmProcessor:
    def __init__(self, tokenizer, images, template: Optional[ChatTemplate], cfg):
        self.tokenizer, self.images, self.template, self.cfg = tokenizer, images, template, cfg
        self.image_token = tokenizer.id_to_token(cfg.image_token_id)
        if self.image_token is None:
            raise ConfigError(f"image_token_index={cfg.image_token_id} is not a token of the tokenizer")

    @classmethod
    def from_pretrained(cls, folder, cfg) -> "VlmProcessor":
        tok = load_tokenizer(folder)
        image_token = tok.id_to_token(cfg.image_token_id)
        if image_token is None:
            raise ConfigError(f"{folder}: image_token_id={cfg.image_token_id} is not a token of the tokenizer")
        return cls(tok, images_for(folder, cfg, image_token), ChatTemplate.from_folder(folder), cfg)

    def __call__(self, prompt, images=None, add_generation_prompt: bool = True) -> MultimodalPrompt:
        """A prompt string (with image placeholders) or a conversation, and its images (one, a list, or
        None) -> a `MultimodalPrompt`."""
        parts, images, special = split_prompt(prompt, images, self.template, self.image_token, add_generation_prompt)
        prepared = [self.images(im, f"image {i}") for i, im in enumerate(images)]
        text = parts[0] + "".join(p.text + rest for p, rest in zip(prepared, parts[1:]))
        ids = self.tokenizer.encode(text, add_special_tokens=special).ids
        n, want = sum(1 for t in ids if t == self.cfg.image_token_id), sum(p.tokens for p in prepared)
        if n != want:
            raise PromptError(f"the prompt tokenizes to {n} image tokens {self.image_token!r} where its images "
                              f"need {want} (is the image token split or typed into the text?)")
        return MultimodalPrompt(ids, prepared, self.cfg.image_token_id)


__all__ = ["MultimodalPrompt", "PreparedImage", "VlmProcessor", "ImageError", "image_processor_for", "images_for"]
