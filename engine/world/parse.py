"""Recover a scene's objects from pixels (to judge generated images, and to check the renderer).

Each pixel is assigned to the nearest palette colour or the background (a pixel further than
`max_distance` from all of them is noise and ignored). In each cell, the most frequent palette
colour with at least `min_pixels` pixels is the object's colour; its bounding box width gives the
size, and the fraction of the box it fills gives the shape (square 1.0, circle ~0.79, triangle
~0.5). On rendered images this is exact; on generated ones it reads what a viewer would.
"""
from __future__ import annotations

import numpy as np

from ..errors import ImageError
from .scene import BACKGROUND, CELL, IMAGE_SIZE, PALETTE, SIZES, Obj

_COLOURS = np.array([BACKGROUND, *PALETTE.values()], dtype=np.float64)  # (1 + K, 3)
_NAMES = (None, *PALETTE)
_SIZE_SPLIT = SIZES["small"] + SIZES["large"]  # box widths are 2 * half: split at their midpoint


def classify_pixels(img: np.ndarray, max_distance: float = 60.0) -> np.ndarray:
    """(H, W) index into (background, *palette) per pixel; -1 where no colour is near enough."""
    d = ((img[:, :, None, :].astype(np.float64) - _COLOURS) ** 2).sum(-1)  # (H, W, 1 + K)
    idx = d.argmin(-1)
    idx[d.min(-1) > max_distance ** 2] = -1
    return idx


def shape_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(ys) / box
    if fill >= 0.9:
        return "square"
    return "circle" if fill >= 0.65 else "triangle"


def parse_image(img, min_pixels: int = 12) -> tuple:
    """The objects (Obj, by cell) seen in a (64, 64, 3) uint8 image."""
    img = np.asarray(img)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ImageError(f"world image of shape {img.shape}: expected ({IMAGE_SIZE}, {IMAGE_SIZE}, 3)")
    idx = classify_pixels(img)
    out = []
    for cell in range(4):
        r, c = divmod(cell, 2)
        sub = idx[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
        counts = np.bincount(sub[sub > 0].ravel(), minlength=len(_NAMES))
        k = int(counts.argmax())
        if counts[k] < min_pixels:
            continue
        mask = sub == k
        xs = np.nonzero(mask.any(0))[0]
        width = xs.max() - xs.min() + 1
        size = "small" if width < _SIZE_SPLIT else "large"
        out.append(Obj(cell, size, _NAMES[k], shape_of(mask)))
    return tuple(out)
