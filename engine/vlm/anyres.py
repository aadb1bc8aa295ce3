"""LLaVA-NeXT's "anyres" tiling, exactly as transformers computes it.

An image of (h, w) pixels is fitted, aspect ratio kept, into the best of the configured
resolutions (`image_grid_pinpoints`: the one that keeps the most of the image's pixels, then the
one that wastes least), zero-padded to it (centred) and cut into tower-sized tiles; a base image
(the whole image squashed to one tile) comes first. On the model side the tiles' patch features
form one grid, the rows or columns that only saw padding are cut off again (`unpad_box`) and an
`image_newline` embedding ends each remaining row. The processor counts the same features
(`feature_count`) to expand the image placeholder, so both sides share these functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..encoders.preprocess import ImageProcessor


def best_resolution(h: int, w: int, pinpoints) -> tuple:
    """The (height, width) of `pinpoints` that keeps most of an (h, w) image, then wastes least
    (transformers' select_best_resolution)."""
    best, most, least = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - kept
        if kept > most or (kept == most and wasted < least):
            best, most, least = (ph, pw), kept, wasted
    return best


def fit_size(h: int, w: int, th: int, tw: int) -> tuple:
    """(height, width) of an (h, w) image resized to fit (th, tw) keeping its aspect ratio
    (transformers' get_patch_output_size)."""
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def unpad_box(h: int, w: int, rows: int, cols: int) -> tuple:
    """(top, bottom, left, right) of the part of a rows x cols feature grid that covers an (h, w)
    image rather than its padding (transformers' unpad_image)."""
    if w / h > cols / rows:
        new_h = int(round(h * (cols / w), 7))
        pad = (rows - new_h) // 2
        return pad, rows - pad, 0, cols
    new_w = int(round(w * (rows / h), 7))
    pad = (cols - new_w) // 2
    return 0, rows, pad, cols - pad


def tile_grid(h: int, w: int, pinpoints, tile: int) -> tuple:
    """(rows, cols) of tiles an (h, w) image is cut into."""
    bh, bw = best_resolution(h, w, pinpoints)
    return bh // tile, bw // tile


def pack_order(h: int, w: int, tiles: int, pinpoints, tile: int, side: int, per_tile: int) -> np.ndarray:
    """The rows, in order, of an (h, w) image's packed features, indexing the table of its `tiles`
    tiles' features (tiles * per_tile rows: the base image's, then each tile's side x side patches)
    followed by one `image_newline` row: the base image's rows, then the unpadded patch grid row by
    row with the newline after each (transformers' pack_image_features, "spatial_unpad"; a lone base
    image is followed by one newline). The PyTorch model and the ONNX runtime both gather by it."""
    newline = tiles * per_tile
    if tiles == 1:
        return np.arange(per_tile + 1)
    rows, cols = tile_grid(h, w, pinpoints, tile)
    top, bottom, left, right = unpad_box(h, w, rows * side, cols * side)
    r, c = np.arange(top, bottom)[:, None], np.arange(left, right)[None, :]
    grid = (1 + (r // side) * cols + c // side) * per_tile + (r % side) * side + c % side  # (R, C)
    grid = np.concatenate([grid, np.full((len(grid), 1), newline)], axis=1)
    return np.concatenate([np.arange(per_tile), grid.ravel()])


def feature_count(h: int, w: int, pinpoints, tile: int, side: int, base: int) -> int:
    """Image features (= placeholder tokens) of an (h, w) image: `base` for the base image, then
    the unpadded grid of `side` x `side` patch features per tile plus one newline per grid row."""
    rows, cols = tile_grid(h, w, pinpoints, tile)
    top, bottom, left, right = unpad_box(h, w, rows * side, cols * side)
    return base + (bottom - top) * (right - left + 1)


@dataclass
class AnyresTiler:
    """Pixels of one image: the base image, then the tiles of its best resolution, row by row."""
    proc: ImageProcessor          # the per-tile steps (resize, crop, rescale, normalise)
    pinpoints: tuple              # (height, width) resolutions, multiples of `tile`
    tile: int                     # tile side in pixels (the processor's crop size)
    base_size: tuple              # (height, width) the base image is resized to

    def __call__(self, image, where: str = "image") -> tuple:
        """-> (pixels float32 (1 + rows * cols, 3, tile, tile), (height, width) of the input)."""
        im = self.proc.load_rgb(image, where)
        h, w = im.height, im.width
        bh, bw = best_resolution(h, w, self.pinpoints)
        nh, nw = fit_size(h, w, bh, bw)
        canvas = np.zeros((bh, bw, 3), dtype=np.uint8)
        top, left = (bh - nh) // 2, (bw - nw) // 2
        canvas[top:top + nh, left:left + nw] = np.asarray(im.resize((nw, nh), resample=self.proc.resample))
        t = self.tile
        tiles = [canvas[i:i + t, j:j + t] for i in range(0, bh, t) for j in range(0, bw, t)]
        base = im.resize((self.base_size[1], self.base_size[0]), resample=self.proc.resample)
        pixels = [self.proc.process_one(x, where) for x in [base] + tiles]
        return np.stack(pixels), (h, w)
