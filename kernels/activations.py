"""The activation functions the engine's configs name, in plain PyTorch (the reference of the
fused oneDNN post-ops in cpu_linear.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmfuse.errors import ConfigError

QUICK_GELU_SCALE = 1.702  # quick_gelu(x) = x * sigmoid(1.702 x) (OpenAI CLIP)
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(QUICK_GELU_SCALE * x),
    "silu": F.silu,
    "relu": F.relu,
}


def activation(name: Optional[str], x: torch.Tensor) -> torch.Tensor:
    """`name`'s activation of x (any shape); None is the identity. ConfigError for an unknown name."""
    if name is None:
        return x
    fn = ACTIVATIONS.get(name)
    if fn is None:
        raise ConfigError(f"unknown activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return fn(x)
