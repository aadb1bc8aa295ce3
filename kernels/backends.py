"""Whether a Triton backend can run in this process, and the one error when it cannot.

Importable without triton: the attention and contrastive dispatchers ask here before they import
a kernel module.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from mmfuse.errors import BackendUnavailableError


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def require_triton(what: str, device: torch.device) -> None:
    """BackendUnavailableError naming `what` unless its Triton kernels can run on `device`: triton
    installed, and CUDA tensors or the interpreter (TRITON_INTERPRET=1 when mmfuse first imported
    its kernels)."""
    if not triton_installed():
        raise BackendUnavailableError(f"{what} needs the triton package (pip install 'mmfuse[gpu]')")
    from .triton_utils import INTERPRET  # imports triton: the kernels are decorated under this flag
    if device.type != "cuda" and not INTERPRET:
        raise BackendUnavailableError(f"{what} on {device.type} tensors needs CUDA, or TRITON_INTERPRET=1 set "
                                      "before mmfuse's first Triton call")
