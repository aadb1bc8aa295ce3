"""Image preprocessing with the semantics of a checkpoint's preprocessor_config.json.

The steps of transformers' CLIPImageProcessor / SiglipImageProcessor (PIL backend), in order:
convert to RGB (transparency composited onto white) -> [pad to a square, LLaVA's do_pad] -> resize (shortest side to `size.shortest_edge` keeping the aspect ratio with
truncated sizes, or to `size.height x size.width`; PIL resampling, bicubic for CLIP) -> center
crop (zero-padding images smaller than the crop) -> rescale (x * 1/255, in float64 then float32)
-> normalise ((x - mean) / std). Inputs: PIL images, file paths, uint8 arrays (H, W), (H, W, C)
with C in 1/3/4, or batches of these (lists, or one (N, H, W, C) array).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..checkpoint import read_json
from ..errors import ConfigError, MMFuseError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(MMFuseError, ValueError):
    """An input image cannot be read or has an unsupported layout."""


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
    pad_to_square: bool = False                  # LLaVA's do_pad: pad to a square in the mean colour before resizing

    @classmethod
    def from_config(cls, cfg: dict, source: str = "preprocessor_config.json") -> "ImageProcessor":
        def as_hw(v, name):
            if isinstance(v, int):
                return {"height": v, "width": v}
            if isinstance(v, dict) and (set(v) == {"height", "width"} or set(v) == {"shortest_edge"}):
                return dict(v)
            raise ConfigError(f"{source}: unsupported {name} {v!r}")

        size = cfg.get("size", {"shortest_edge": 224})
        size = {"shortest_edge": size} if isinstance(size, int) else as_hw(size, "size")
        crop = as_hw(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", False) else None
        if crop is not None and "shortest_edge" in crop:
            raise ConfigError(f"{source}: crop_size must give height and width")
        llava = str(cfg.get("image_processor_type", "")).startswith("LlavaImageProcessor")
        for key in ("do_reduce_labels",) + (() if llava else ("do_pad",)):
            if cfg.get(key):
                raise ConfigError(f"{source}: {key}=true is not supported")
        mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"{source}: image_mean/image_std need 3 values, got {mean} / {std}")
        return cls(size=size, crop_size=crop, resample=int(cfg.get("resample", 3)),
                   do_resize=cfg.get("do_resize", True), do_rescale=cfg.get("do_rescale", True),
                   rescale_factor=cfg.get("rescale_factor", 1 / 255), do_normalize=cfg.get("do_normalize", True),
                   image_mean=tuple(mean), image_std=tuple(std), do_convert_rgb=cfg.get("do_convert_rgb", True),
                   pad_to_square=llava and bool(cfg.get("do_pad", False)))

    @classmethod
    def from_pretrained(cls, folder, image_size: int) -> "ImageProcessor":
        """preprocessor_config.json of the folder; without one, CLIP's defaults at `image_size`."""
        path = Path(folder) / "preprocessor_config.json"
        cfg = read_json(path, required=False)
        if cfg is None:
            cfg = {"size": {"shortest_edge": image_size}, "do_center_crop": True, "crop_size": image_size}
        return cls.from_config(cfg, str(path))

    @property
    def output_size(self) -> tuple[int, int]:
        s = self.crop_size or self.size
        if "shortest_edge" in s:
            raise ConfigError("resizing the shortest edge without a center crop gives no fixed output size")
        return s["height"], s["width"]

    # ---- inputs
    @staticmethod
    def to_pil(image, where: str = "image") -> Image.Image:
        """One PIL image from a PIL image, a path or a uint8 array (H, W) / (H, W, C)."""
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, Path)):
            try:
                with Image.open(image) as im:
                    im.load()
                    return im.copy()
            except FileNotFoundError:
                raise ImageError(f"{image}: image file not found") from None
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"{image}: not a readable image ({e})") from None
        if isinstance(image, torch.Tensor):
            image = image.numpy()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise ImageError(f"{where}: array of dtype {image.dtype}, expected uint8 (H, W, C) pixels")
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[:, :, 0]
            if image.ndim == 2:
                return Image.fromarray(image, mode="L")
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise ImageError(f"{where}: array of shape {image.shape}, expected (H, W) or (H, W, C) "
                                 "with C = 1, 3 or 4 channels")
            return Image.fromarray(image, mode="RGB" if image.shape[2] == 3 else "RGBA")
        raise ImageError(f"{where}: unsupported image type {type(image).__name__} "
                         "(expected a PIL image, a path or a uint8 array)")

    @staticmethod
    def as_list(images) -> list:
        """A batch as a list: lists/tuples as given, a 4-D array split, anything else a batch of one."""
        if isinstance(images, (list, tuple)):
            return list(images)
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
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

    def process_one(self, image, where: str = "image") -> torch.Tensor:
        """One image -> float32 (3, H, W)."""
        im = self.to_pil(image, where)
        if self.do_convert_rgb and im.mode != "RGB":
            im = to_rgb(im)
        if im.mode != "RGB":
            raise ImageError(f"{where}: image mode {im.mode!r} has {len(im.getbands())} channels, expected RGB")
        if self.pad_to_square and im.width != im.height:
            im = Image.fromarray(pad_square(np.array(im), tuple(int(m * 255) for m in self.image_mean)))
        if self.do_resize:
            h, w = self.resize_size(im.height, im.width)
            if (h, w) != (im.height, im.width):
                im = im.resize((w, h), resample=self.resample)
        x = np.array(im)  # (H, W, 3) uint8, a writable copy
        if self.crop_size is not None:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"])
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)  # (3, H, W)
        t = (t.double() * self.rescale_factor).float() if self.do_rescale else t.float()
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
            t = (t - mean) / std
        return t

    def __call__(self, images) -> torch.Tensor:
        """Images (one or a batch) -> pixel batch (N, 3, H, W) float32."""
        items = self.as_list(images)
        if not items:
            raise ImageError("empty image batch")
        out = [self.process_one(im, f"image {i}") for i, im in enumerate(items)]
        shapes = {tuple(o.shape) for o in out}
        if len(shapes) > 1:
            raise ImageError(f"images of different sizes after preprocessing {sorted(shapes)}: "
                             "the preprocessor config has no fixed output size")
        return torch.stack(out)


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
