"""Scenes of the world and their renderer.

A scene is a 64 x 64 RGB image split into a 2 x 2 grid of 32 x 32 cells; 1-4 cells hold one
object each, with a shape, a colour from a fixed palette and a size. The object's centre is
jittered inside its cell (not part of the ground truth the language talks about). Rendering is
exact (no anti-aliasing, flat background), so the parser (parse.py) recovers every scene.
Everything is drawn from `numpy.random.default_rng(seed)`: the same seed gives the same scene.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64                                   # pixels per side
CELL = 32                                         # pixels per grid cell side
BACKGROUND = (40, 40, 40)
PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
           "yellow": (230, 210, 40), "purple": (160, 60, 200), "white": (235, 235, 235)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 5, "large": 10}                 # half-extent in pixels
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell index = 2 * row + col
MAX_OBJECTS = 4


@dataclass(frozen=True, order=True)
class Obj:
    cell: int          # 0..3, reading order (POSITIONS)
    size: str          # a SIZES key
    colour: str        # a PALETTE key
    shape: str         # one of SHAPES

    @property
    def row(self) -> int:
        return self.cell // 2

    @property
    def col(self) -> int:
        return self.cell % 2

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    objects: tuple                 # Obj, sorted by cell
    offsets: tuple = ()            # (dy, dx) centre of each object inside its cell, same order

    def at(self, cell: int):
        """The object in `cell`, or None."""
        for o in self.objects:
            if o.cell == cell:
                return o
        return None


def random_object(rng: np.random.Generator, cell: int) -> Obj:
    return Obj(cell, str(rng.choice(list(SIZES))), str(rng.choice(COLOURS)), str(rng.choice(SHAPES)))


def jitter(rng: np.random.Generator, objects) -> tuple:
    """A random integer centre (dy, dx) inside its cell for each object, keeping a 2-pixel margin."""
    out = []
    for o in objects:
        h = SIZES[o.size]
        out.append(tuple(int(v) for v in rng.integers(h + 2, CELL - h - 1, size=2)))
    return tuple(out)


def generate_scene(seed: int) -> Scene:
    """The scene of `seed`: 1-4 objects in distinct cells, attributes uniform."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(4, size=n, replace=False))
    objects = tuple(random_object(rng, c) for c in cells)
    return Scene(objects, jitter(rng, objects))


def shape_mask(shape: str, half: int, cy: int, cx: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of a shape of half-extent `half` centred at pixel corner (cy, cx)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    dy, dx = y - cy, x - cx
    if shape == "circle":
        return dy * dy + dx * dx <= half * half
    if shape == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "triangle":  # apex up, base at the bottom
        return (np.abs(dy) <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def render(scene: Scene) -> np.ndarray:
    """The scene as a uint8 (64, 64, 3) image."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    offsets = scene.offsets or tuple((CELL // 2, CELL // 2) for _ in scene.objects)
    for o, (dy, dx) in zip(scene.objects, offsets):
        mask = shape_mask(o.shape, SIZES[o.size], o.row * CELL + dy, o.col * CELL + dx)
        img[mask] = PALETTE[o.colour]
    return img
