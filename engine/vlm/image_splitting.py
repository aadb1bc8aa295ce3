"""Idefics3 / SmolVLM image splitting, exactly as transformers' Idefics3ImageProcessor (PIL) does it.

The image's longest edge is resized to `size.longest_edge` (aspect ratio kept, the other side
rounded up to even, everything below 4096), then each side is rounded up to a multiple of the
tile side (`max_image_size.longest_edge`); an image larger than one tile is cut into rows x cols
tiles and followed by a global image (the whole image resized to one tile). Without
`do_image_splitting` the image is resized to one tile. The prompt gives each tile a
`<fake_token_around_image><row_r_col_c>` header and the global image a `<global-img>` one
(`prompt_text`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..encoders.preprocess import ImageProcessor

MAX_IMAGE_SIDE = 4096  # transformers' MAX_IMAGE_SIZE: no side is resized beyond it


def longest_edge_size(h: int, w: int, longest: int) -> tuple:
    """(height, width) with the longest edge at `longest` (the other rounded up to even), then
    scaled below MAX_IMAGE_SIDE (transformers' get_resize_output_image_size)."""
    aspect = w / h
    if w >= h:
        w, h = longest, int(longest / aspect)
        h += h % 2
    else:
        h, w = longest, int(longest * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIDE:
        w, h = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif h > w and h > MAX_IMAGE_SIDE:
        h, w = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(h, 1), max(w, 1)


def tile_multiple_size(h: int, w: int, tile: int) -> tuple:
    """(height, width) rounded up to multiples of `tile` (transformers' resize_for_vision_encoder)."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def prompt_text(rows: int, cols: int, tokens: int, image_token: str) -> str:
    """The text that replaces one image placeholder: a header and `tokens` image tokens per tile,
    a newline after each row of tiles, then the global image (transformers' replace_image_token)."""
    fake, run = "<fake_token_around_image>", image_token * tokens
    if rows == 0 and cols == 0:
        return f"{fake}<global-img>{run}{fake}"
    text = "".join("".join(f"{fake}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n" for r in range(rows))
    return text + f"\n{fake}<global-img>{run}{fake}"


@dataclass
class ImageSplitter:
    """Pixels of one image: its tiles row by row, then the global image (or the one image)."""
    proc: ImageProcessor          # rescale and normalise (its resampling filter is used throughout)
    longest_edge: int             # size.longest_edge: the first resize
    tile: int                     # max_image_size.longest_edge: the tile side (= the tower's image size)
    split: bool                   # do_image_splitting
    resize: bool = True           # do_resize

    def __call__(self, image, where: str = "image") -> tuple:
        """-> (pixels float32 (n_tiles, 3, tile, tile), (rows, cols)); (0, 0): a single image."""
        im = self.proc.load_rgb(image, where)
        resample, t = self.proc.resample, self.tile
        if self.resize:
            h, w = longest_edge_size(im.height, im.width, self.longest_edge)
            im = im.resize((w, h), resample=resample)
        rows = cols = 0
        if self.split:
            h, w = tile_multiple_size(im.height, im.width, t)
            im = im.resize((w, h), resample=resample)
            if h > t or w > t:
                rows, cols = (h - t) // t + 1, (w - t) // t + 1
                x = np.asarray(im)
                frames = [x[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
                frames.append(np.asarray(im.resize((t, t), resample=resample)))
            else:
                frames = [np.asarray(im)]
        else:
            frames = [np.asarray(im.resize((t, t), resample=resample))]
        return np.stack([self.proc.to_pixels(f) for f in frames]), (rows, cols)
