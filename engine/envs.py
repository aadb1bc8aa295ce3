"""Every environment variable mmfuse reads, in one table, read when used and validated then.

    import mmfuse.envs as envs
    envs.MMFUSE_ATTENTION        # reads os.environ now; "auto" when unset

Each access reads the environment again (tests may monkeypatch it); values are case-insensitive,
and one outside the allowed ones raises `SettingError` naming the variable and those values, at
the access, never at import.
One exception by necessity: Triton fixes interpreter or compiler when a kernel is decorated, so the
kernels read TRITON_INTERPRET once, when mmfuse first imports them (`kernels/triton_utils.py`).
This module imports only `os` and `mmfuse.errors`, so any module may import it.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

from .errors import SettingError

_TRUE = ("1", "true", "on", "yes", "y")  # the spellings Triton's own getenv_bool accepts
_FALSE = ("0", "false", "off", "no", "n")


class Setting(NamedTuple):
    default: str  # the value when the variable is unset or empty
    allowed: tuple  # accepted values, lower case
    parse: Callable[[str], Any]  # checked value (lower case) -> the setting
    doc: str  # what it selects (the README's table)


def _choice(default: str, allowed: tuple, doc: str) -> Setting:
    return Setting(default, allowed, str, doc)


def _flag(default: bool, doc: str) -> Setting:
    return Setting("1" if default else "0", _TRUE + _FALSE, lambda v: v in _TRUE, doc)


ENV_VARS: dict[str, Setting] = {
    "MMFUSE_ATTENTION": _choice("auto", ("auto", "sdpa", "reference", "triton"),
                                "attention backend: Triton kernels on CUDA where supported else SDPA "
                                "(auto), SDPA only, the plain PyTorch reference, or the Triton kernels "
                                "wherever they run (CPU under TRITON_INTERPRET=1); `set_backend()` overrides"),
    "MMFUSE_CONTRASTIVE": _choice("auto", ("auto", "triton", "torch"),
                                  "CLIP/SigLIP loss backend when the call names none: Triton on CUDA, "
                                  "the chunked torch code otherwise (auto)"),
    "MMFUSE_CPU_GEMV": _flag(True, "CPU linear layers of 1-16 rows (fp32) through the numba GEMV"),
    "MMFUSE_CPU_PACKED": _flag(True, "CPU linear layers of frozen weights through oneDNN with the weight "
                                     "packed once"),
    "MMFUSE_QUANT_FUSED": _flag(True, "int8/int4 CPU linear layers of 1-16 rows through the fused "
                                      "dequantize-and-multiply kernel"),
    "MMFUSE_FUSED_DECODE": _flag(True, "CPU decode steps of fp32/bf16/int8/int4 decoders as one fused C++ call "
                                       "(mmfuse._decode) instead of one PyTorch op at a time, unless an attention "
                                       "backend other than auto is chosen"),
    "MMFUSE_HUGE_PAGES": _flag(True, "a decoder's weights move into one mapping of transparent huge pages when "
                                     "it is first used for decoding on the CPU, and the weights onnxruntime "
                                     "copies while a session loads are collapsed into huge pages (faster weight "
                                     "streaming)"),
    "MMFUSE_INT8_ACTIVATIONS": _flag(True, "the fused decode step's int8/int4 layers quantize their input to "
                                           "int8 in blocks of 32 for integer dot products (AVX-512 VNNI); 0: "
                                           "dequantize the weights in registers (fp32 arithmetic)"),
    "MMFUSE_TRACEBACK": _flag(False, "the `mmfuse` command prints the traceback of an internal error "
                                     "(as --traceback does)"),
    "TRITON_INTERPRET": _flag(False, "Triton's interpreter: the kernels run on CPU tensors (tests); read "
                                     "when mmfuse first imports its kernels"),
}


_parsed: dict = {}  # (name, raw string) -> value: hot paths (every linear, every attention call) read settings


def read(name: str) -> Any:
    """The current value of setting `name`, checked; SettingError when it is not allowed."""
    raw = os.environ.get(name)
    try:
        return _parsed[name, raw]
    except KeyError:
        pass
    setting = ENV_VARS[name]
    value = (raw or "").strip().lower() or setting.default
    if value not in setting.allowed:
        raise SettingError(f"environment variable {name}={raw!r}: expected one of {', '.join(setting.allowed)}")
    _parsed[name, raw] = setting.parse(value)
    return _parsed[name, raw]


def choices(name: str) -> tuple:
    """The values setting `name` accepts (the backend names of a choice setting)."""
    return ENV_VARS[name].allowed


def __getattr__(name: str) -> Any:
    if name in ENV_VARS:
        return read(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list:
    return sorted(list(globals()) + list(ENV_VARS))
