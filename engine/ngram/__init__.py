"""Statistical n-gram language models: lmplz-exact modified Kneser-Ney estimation in C++
(`mmfuse._ngram`), ARPA and memory-mapped binary files, and fast queries.

The names below are loaded on first use, so that importing `mmfuse.ngram` (the `mmfuse` CLI does)
works where the C++ extension was not built; using them then raises ExtensionError saying how to
build it."""
import importlib

from ..errors import ExtensionError

__all__ = ["EOS_TOKEN", "UNK_TOKEN", "BuildConfig", "NGramModel", "Perplexity", "TokenScore", "build", "build_arpa", "load"]


_BUILDER_NAMES = ("BuildConfig", "build_arpa")  # the build side, which needs no numpy


def ngram_module(name: str = "language_model"):
    """`mmfuse.ngram.language_model` (or `.builder`), or ExtensionError where the extension
    `mmfuse._ngram` is missing."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        if "_ngram" not in str(e):
            raise
        raise ExtensionError(
            f"the n-gram models need the C++ extension mmfuse._ngram, which this installation lacks ({e}). "
            "Install a C++17 compiler (e.g. `apt-get install g++`) and reinstall mmfuse "
            "(`pip install -e . --no-build-isolation`); the decoder and encoder commands work without it") from None
    return module


def __getattr__(name):
    if name in __all__:
        return getattr(ngram_module("builder" if name in _BUILDER_NAMES else "language_model"), name)
    raise AttributeError(f"module 'mmfuse.ngram' has no attribute {name!r}")
