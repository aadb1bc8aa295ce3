"""Statistical n-gram language models: lmplz-exact modified Kneser-Ney estimation in C++
(`mmfuse._ngram`), ARPA and memory-mapped binary files, and fast queries.

The names below are loaded on first use, so that importing `mmfuse.ngram` (the `mmfuse` CLI does)
works where the C++ extension was not built; using them then raises ExtensionError saying how to
build it."""
from ..errors import ExtensionError

__all__ = ["EOS_TOKEN", "UNK_TOKEN", "BuildConfig", "NGramModel", "Perplexity", "TokenScore", "build", "build_arpa", "load"]


def language_model_module():
    """`mmfuse.ngram.language_model`, or ExtensionError where the extension `mmfuse._ngram` is missing."""
    try:
        from . import language_model
    except ImportError as e:
        if "_ngram" not in str(e):
            raise
        raise ExtensionError(
            f"the n-gram models need the C++ extension mmfuse._ngram, which this installation lacks ({e}). "
            "Install a C++17 compiler (e.g. `apt-get install g++`) and reinstall mmfuse "
            "(`pip install -e . --no-build-isolation`); the decoder and encoder commands work without it") from None
    return language_model


def __getattr__(name):
    if name in __all__:
        return getattr(language_model_module(), name)
    raise AttributeError(f"module 'mmfuse.ngram' has no attribute {name!r}")
