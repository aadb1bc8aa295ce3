"""Image preprocessing with the semantics of a checkpoint's preprocessor_config.json.

The steps of transformers' CLIPImageProcessor / SiglipImageProcessor (PIL backend), in order:
convert to RGB (transparency composited onto white) -> [pad to a square, LLaVA's do_pad] -> resize (shortest side to `size.shortest_edge` keeping the aspect ratio with
truncated sizes, or to `size.height x size.width`; PIL resampling, bicubic for CLIP) -> center
crop (zero-padding images smaller than the crop) -> rescale (x * 1/255, in float64 then float32)
-> normalise ((x - mean) / std). Inputs: PIL images, file paths, uint8 arrays (H, W), (H, W, C)
with C in 1/3/4, or batches of these (lists, or one (N, H, W, C) array).

Bounded work: an image of more than `max_pixels` (MAX_IMAGE_PIXELS, 2**26 = 8192 x 8192 by default)
is refused with ImageError before it is decoded. Resizing the shortest edge of a thin image (1 x
200,000) would make a huge intermediate; when that intermediate exceeds MAX_RESIZE_PIXELS only the
part the center crop keeps is resampled (PIL's `box`), same filter and scale, so the work depends
on the output size. Normal images take the plain path and equal CLIPImageProcessor's output.

The pipeline is numpy and PIL only (`pixels`), so the torch-free ONNX Runtime encoder (mmfuse.ort)
runs the same code; calling the processor gives the same batch as a torch tensor.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, ImageError
from ..hf_config import bool_field, float_field, int_field
from ..jsonfile import read_json


MAX_IMAGE_PIXELS = 2**26  # default pixel budget of an input image (8192 x 8192)
MAX_RESIZE_PIXELS = 2**24  # larger resize intermediates are resampled only where the crop keeps them
MAX_SIDE = 2**14  # largest size / crop side a preprocessor config may ask for
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageProcessor:
    size: dict                                   # {"shortest_edge": s} or {"height": h, "width": w}
    crop_size: Optional[dict] = None             # {"height": h, "width": w}; None: no center crop
    resample: int = 3                            # PIL resampling filter (3 = bicubic)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    do_convert_rgb: bool = True
    max_pixels: int = MAX_IMAGE_PIXELS           # larger inputs are refused (ImageError) before decoding
    pad_to_square: bool = False                  # LLaVA's do_pad: pad to a square in the mean colour before resizing

    @classmethod
    def from_config(cls, cfg: dict, source: str = "preprocessor_config.json") -> "ImageProcessor":
        def as_hw(v, name):
            if isinstance(v, int) and not isinstance(v, bool):
                v = {"height": v, "width": v}
            if isinstance(v, dict) and (set(v) == {"height", "width"} or set(v) == {"shortest_edge"}):
                return {k: int_field(v, k, f"{source}: {name}", maximum=MAX_SIDE) for k in v}
            raise ConfigError(f"{source}: unsupported {name} {v!r}")

        size = cfg.get("size", {"shortest_edge": 224})
        size = as_hw({"shortest_edge": size} if isinstance(size, int) else size, "size")
        crop = as_hw(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", False) else None
        if crop is not None and "shortest_edge" in crop:
            raise ConfigError(f"{source}: crop_size must give height and width")
        llava = str(cfg.get("image_processor_type", "")).startswith("LlavaImageProcessor")
        for key in ("do_reduce_labels",) + (() if llava else ("do_pad",)):
            if cfg.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported")
        mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
        for name, v in (("image_mean", mean), ("image_std", std)):
            if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                raise ConfigError(f"{source}: {name} needs 3 finite numbers, got {v!r}")
        if not all(x > 0 for x in std):
            raise ConfigError(f"{source}: image_std={std!r} must be > 0")
        return cls(size=size, crop_size=crop, resample=int_field(cfg, "resample", source, default=3, minimum=0, maximum=5),
                   do_resize=bool_field(cfg, "do_resize", source, True), do_rescale=bool_field(cfg, "do_rescale", source, True),
                   rescale_factor=float_field(cfg, "rescale_factor", source, default=1 / 255),
                   do_normalize=bool_field(cfg, "do_normalize", source, True), image_mean=tuple(mean),
                   image_std=tuple(std), do_convert_rgb=bool_field(cfg, "do_convert_rgb", source, True),
                   pad_to_square=llava and bool_field(cfg, "do_pad", source, False))

    @classmethod
    def from_pretrained(cls, folder, image_size: int) -> "ImageProcessor":
        """preprocessor_config.json of the folder; without one, CLIP's defaults at `image_size`."""
        path = Path(folder) / "preprocessor_config.json"
        cfg = read_json(path, required=False)
        if cfg is None:
            cfg = {"size": {"shortest_edge": image_size}, "do_center_crop": True, "crop_size": image_size}
        return cls.from_config(cfg, str(path))

    def to_config(self) -> dict:
        """The preprocessor_config.json (CLIPImageProcessor fields) that `from_config` reads back as self."""
        cfg = {"image_processor_type": "CLIPImageProcessor", "do_resize": self.do_resize, "size": dict(self.size),
               "resample": self.resample, "do_center_crop": self.crop_size is not None, "do_rescale": self.do_rescale,
               "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
               "image_mean": list(self.image_mean), "image_std": list(self.image_std),
               "do_convert_rgb": self.do_convert_rgb}
        if self.crop_size is not None:
            cfg["crop_size"] = dict(self.crop_size)
        return cfg

    @property
    def output_size(self) -> tuple[int, int]:
        s = self.crop_size or self.size
        if "shortest_edge" in s:
            raise ConfigError("resizing the shortest edge without a center crop gives no fixed output size")
        return s["height"], s["width"]

    # ---- inputs
    def to_pil(self, image, where: str = "image") -> Image.Image:
        """One PIL image from a PIL image, a path or a uint8 array (H, W) / (H, W, C), within the pixel budget."""
        if isinstance(image, Image.Image):
            return self._check_pixels(image, where)
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as im:
                    self._check_pixels(im, str(image))  # the header is read: refuse before decoding
                    im.load()
                    return im.copy()
            except FileNotFoundError:
                raise ImageError(f"{image}: image file not found") from None
            except Image.DecompressionBombError as e:
                raise ImageError(f"{image}: refused as a decompression bomb ({e})") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
                raise ImageError(f"{image}: not a readable image ({e})") from None
        if is_torch_tensor(image):
            image = image.numpy()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ImageError(f"{where}: array of dtype {image.dtype}, expected uint8 (H, W, C) pixels")
            if image.ndim in (2, 3) and image.shape[0] * image.shape[1] > self.max_pixels:
                raise ImageError(f"{where}: {image.shape[1]} x {image.shape[0]} pixels exceed the budget of "
                                 f"{self.max_pixels} (ImageProcessor.max_pixels)")
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[:, :, 0]
            if image.ndim == 2:
                return self._check_pixels(Image.fromarray(image, mode="L"), where)
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise ImageError(f"{where}: array of shape {image.shape}, expected (H, W) or (H, W, C) "
                                 "with C = 1, 3 or 4 channels")
            return self._check_pixels(Image.fromarray(image, mode="RGB" if image.shape[2] == 3 else "RGBA"), where)
        raise ImageError(f"{where}: unsupported image type {type(image).__name__} "
                         "(expected a PIL image, a path or a uint8 array)")

    def _check_pixels(self, im: Image.Image, where: str) -> Image.Image:
        if im.width < 1 or im.height < 1:
            raise ImageError(f"{where}: an empty image ({im.width} x {im.height} pixels)")
        if im.width * im.height > self.max_pixels:
            raise ImageError(f"{where}: {im.width} x {im.height} pixels exceed the budget of {self.max_pixels} "
                             "(ImageProcessor.max_pixels)")
        return im

    @staticmethod
    def as_list(images) -> list:
        """A batch as a list: lists/tuples as given, a 4-D array split, anything else a batch of one."""
        if isinstance(images, (list, tuple)):
            return list(images)
        if (isinstance(images, np.ndarray) or is_torch_tensor(images)) and images.ndim == 4:
            return list(images)
        return [images]

    # ---- the pipeline
    def resize_size(self, h: int, w: int) -> tuple[int, int]:
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        s = self.size["shortest_edge"]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s, int(s * long / short)
        return (new_long, new_short) if w <= h else (new_short, new_long)

    def _resize(self, im: Image.Image, where: str) -> Image.Image:
        """The resize step. A resized image over MAX_RESIZE_PIXELS (a thin image resized by its
        shortest edge) is resampled only over the rows and columns the center crop keeps."""
        H, W = im.height, im.width
        h, w = self.resize_size(H, W)
        if (h, w) == (H, W):
            return im
        if h * w <= MAX_RESIZE_PIXELS:
            return im.resize((w, h), resample=self.resample)
        if self.crop_size is None:
            raise ImageError(f"{where}: resizing {W} x {H} pixels to {w} x {h} exceeds {MAX_RESIZE_PIXELS} pixels "
                             "(aspect ratio too extreme for a preprocessor without a center crop)")
        ch, cw = self.crop_size["height"], self.crop_size["width"]
        top, rows = ((h - ch) // 2, ch) if h >= ch else (0, h)  # what center_crop keeps (it pads the rest)
        left, cols = ((w - cw) // 2, cw) if w >= cw else (0, w)
        sy, sx = H / h, W / w  # source pixels per resized pixel, as in the full resize
        box = (left * sx, top * sy, (left + cols) * sx, (top + rows) * sy)
        return im.resize((cols, rows), resample=self.resample, box=box)

    def load_rgb(self, image, where: str = "image") -> Image.Image:
        """One image as an RGB PIL image (the first step of every pipeline), within the pixel budget."""
        im = self.to_pil(image, where)
        if self.do_convert_rgb and im.mode != "RGB":
            im = to_rgb(im)
        if im.mode != "RGB":
            raise ImageError(f"{where}: image mode {im.mode!r} has {len(im.getbands())} channels, expected RGB")
        return im

    def process_one(self, image, where: str = "image") -> np.ndarray:
        """One image -> float32 (3, H, W)."""
        im = self.load_rgb(image, where)
        if self.pad_to_square and im.width != im.height:
            im = Image.fromarray(pad_square(np.array(im), tuple(int(m * 255) for m in self.image_mean)))
        if self.do_resize:
            im = self._resize(im, where)
        x = np.array(im)  # (H, W, 3) uint8, a writable copy
        if self.crop_size is not None:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"])
        return self.to_pixels(x)

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        """The last steps: uint8 (H, W, 3) -> rescaled, normalised float32 (3, H, W)."""
        t = x.transpose(2, 0, 1)  # (3, H, W)
        t = (t * np.float64(self.rescale_factor)).astype(np.float32) if self.do_rescale else t.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32).reshape(3, 1, 1)
            std = np.asarray(self.image_std, dtype=np.float32).reshape(3, 1, 1)
            t = (t - mean) / std
        return np.ascontiguousarray(t)

    def pixels(self, images) -> np.ndarray:
        """Images (one or a batch) -> pixel batch (N, 3, H, W) float32, as a numpy array."""
        items = self.as_list(images)
        if not items:
            raise ImageError("empty image batch")
        out = [self.process_one(im, f"image {i}") for i, im in enumerate(items)]
        shapes = {tuple(o.shape) for o in out}
        if len(shapes) > 1:
            raise ImageError(f"images of different sizes after preprocessing {sorted(shapes)}: "
                             "the preprocessor config has no fixed output size")
        return np.stack(out)

    def __call__(self, images):
        """Images (one or a batch) -> pixel batch (N, 3, H, W) float32, as a torch tensor."""
        import torch  # the numpy pipeline above is all the torch-free runtime uses
        return torch.from_numpy(self.pixels(images))


def is_torch_tensor(x) -> bool:
    """Whether x is a torch tensor, without importing torch (a tensor exists only if torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as transformers' convert_to_rgb)."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def pad_square(x: np.ndarray, color: tuple) -> np.ndarray:
    """(H, W, C) -> (S, S, C) with S = max(H, W), the image centred (offset rounded down) on `color`."""
    h, w = x.shape[:2]
    s = max(h, w)
    canvas = np.empty((s, s) + x.shape[2:], dtype=x.dtype)
    canvas[...] = np.asarray(color, dtype=x.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    canvas[top:top + h, left:left + w] = x
    return canvas


def center_crop(x: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """(H, W, C) -> (ch, cw, C), centered as transformers does; smaller images are zero-padded first."""
    h, w = x.shape[:2]
    if h < ch or w < cw:
        H, W = max(h, ch), max(w, cw)
        canvas = np.zeros((H, W) + x.shape[2:], dtype=x.dtype)
        top, left = -(-(H - h) // 2), -(-(W - w) // 2)  # ceil, as transformers
        canvas[top:top + h, left:left + w] = x
        x, h, w = canvas, H, W
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[top:top + ch, left:left + cw]
