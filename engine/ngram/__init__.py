"""Statistical n-gram language models: lmplz-exact modified Kneser-Ney estimation in C++
(`mmfuse._ngram`), ARPA and memory-mapped binary files, and fast queries."""
from .model import EOS_TOKEN, UNK_TOKEN, BuildConfig, NGramModel, Perplexity, TokenScore, build, build_arpa, load

__all__ = ["EOS_TOKEN", "UNK_TOKEN", "BuildConfig", "NGramModel", "Perplexity", "TokenScore", "build", "build_arpa", "load"]
