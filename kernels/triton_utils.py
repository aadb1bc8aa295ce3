"""What every Triton kernel module of mmfuse shares: the interpreter flag, the log constants, the
dot-product precision and autotuning.

Importing this module imports triton; the dispatchers import it (through the kernel modules) only
after `backends.require_triton` has checked that triton is installed.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mmfuse import envs

# Triton decides interpreter or compiler when a kernel is decorated, i.e. when a kernel module is
# first imported, right after this line; the kernel configs follow it (the interpreter runs one
# fixed config, autotuning runs several).
INTERPRET: bool = envs.TRITON_INTERPRET
LOG2E = 1.4426950408889634  # log2(e): scores scaled by it go through exp2
LN2 = tl.constexpr(math.log(2.0))  # ln(2): log2-sum-exps times it are natural-log ones (in kernels)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 inputs are multiplied in full precision (no TF32); fp16/bf16
    ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotuned(kernel, configs, key, fits=None):
    """`kernel` autotuned over `configs` (dicts of meta-parameters plus num_warps and num_stages)
    per value of the `key` arguments; None under the interpreter, which runs one fixed config.
    `fits(config, meta)`, when given, says whether a config suits a launch's meta-parameters: only
    those are tried (the first config when none is)."""
    if INTERPRET:
        return None
    launch = ("num_warps", "num_stages")
    kw = {}
    if fits is not None:
        def prune(candidates, nargs, **meta):
            keep = [c for c in candidates
                    if fits(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages), meta)]
            return keep or candidates[:1]
        kw["prune_configs_by"] = dict(early_config_prune=prune)
    return triton.autotune(configs=[triton.Config({n: c[n] for n in c if n not in launch}, num_warps=c["num_warps"],
                                                  num_stages=c["num_stages"]) for c in configs], key=key, **kw)(kernel)
