"""Helpers the kernel tests and the GPU check (bench/gpu_*.py) share: poisoned allocations and the
local-loss path of several simulated ranks in one process. Not used by the engine."""
from __future__ import annotations

import contextlib

import torch

from .contrastive import ClipLossFunction, SiglipLossFunction

POISON_INT = -12345  # what poisoned integer tensors hold


@contextlib.contextmanager
def poisoned_allocations():
    """While active, torch.empty hands out NaN-filled float tensors (integer ones: POISON_INT), so
    an element a kernel does not write shows in the comparison with the reference."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan") if t.is_floating_point() else POISON_INT)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def simulated_local_loss(kind: str, image_features, text_features, *scalars, world: int,
                         backend: str = "auto") -> torch.Tensor:
    """Mean over `world` equal row shards of the local loss, each shard's rows against all columns.

    What `distributed=True, local_loss=True` averages to across ranks, in one process (tests and
    bench/gpu_contrastive.py check the local path with it); equals the global loss. `kind`: "clip"
    (scalars: logit_scale) or "siglip" (logit_scale, logit_bias).
    """
    n = image_features.shape[0] // world
    total = 0
    for r in range(world):
        rows = slice(r * n, (r + 1) * n)
        if kind == "clip":
            total = total + ClipLossFunction.apply(image_features[rows], text_features[rows],
                                                   image_features, text_features, scalars[0], r * n,
                                                   backend)
        else:
            total = total + SiglipLossFunction.apply(image_features[rows], text_features, *scalars,
                                                     r * n, backend)
    return total / world
