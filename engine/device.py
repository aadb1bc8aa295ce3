"""Checking a device name before any work: a request for a device this torch build or machine
does not have is an error naming the option, not a traceback after the model was read."""
from __future__ import annotations

import torch

from .errors import DeviceError


def check_device(device, option: str = "device") -> torch.device:
    """`device` as a torch.device if this process can use it; DeviceError naming `option` otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{option} {device!r}: not a device name (examples: cpu, cuda, cuda:1) ({e})") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise DeviceError(f"{option} {device!r}: this torch build ({torch.__version__}) has no CUDA support; "
                              f"use {option} cpu or install a CUDA build of torch")
        n = torch.cuda.device_count()
        if n == 0:
            raise DeviceError(f"{option} {device!r}: no CUDA device is visible (torch {torch.__version__})")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"{option} {device!r}: only {n} CUDA device(s) visible (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{option} {device!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"{option} {device!r}: mmfuse runs on cpu, cuda or mps")
    return dev
