"""The n-gram language model API (`NGramModel`): build from text or token ids, load/save ARPA and
binary, query.

Building follows KenLM's lmplz (interpolated modified Kneser-Ney, `<s>`/`</s>` padding, `<unk>` as
a zeroton); the heavy lifting is the C++ extension `mmfuse._ngram`. Word ids are the model's
vocabulary ids (`index()`), except for models built from integer token arrays ("token models"),
whose id arguments and results are the original token ids, with `</s>` as EOS_TOKEN (-1). The
special words and the binary format's magic are the C++ core's (`_ngram.UNK`, `_ngram.EOS_WORD`,
`_ngram.BINARY_MAGIC`, ...), never repeated here.

Text follows KenLM's rules everywhere (corpus files, compressed or not, lists of lines, queries):
lines end at '\n' only; words are separated by ASCII whitespace (space, \t, \n, \v, \f, \r: KenLM's
`util::kSpaces`), so a lone '\r' or '\r\n' never starts a line and Unicode spaces (U+00A0,
U+2003, \x1c) are parts of words. Every file is written to a temporary name beside it and renamed
into place when complete (`mmfuse.files.atomic_path`): a reader that has the old file mapped keeps
it, and a crash or a full disk leaves the old file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .. import _ngram
from ..errors import NGramError
from .builder import (_COMPRESSED, _DECOMPRESS_ERRORS, MAX_THREADS, BuildConfig, _estimate, _is_int, _text_batches,
                      _utf8, output_path)

EOS_TOKEN = _ngram.EOS_TOKEN  # </s> in the token-id space of token models (-1)
UNK_TOKEN = _ngram.UNK_TOKEN  # <unk> in the token-id space of token models (-2)



class TokenScore(tuple):
    """The score of one token: the tuple (log10 probability, length of the n-gram used, out of
    vocabulary), as the kenlm module's `full_scores` yields it (`for p, n, oov in ...` unpacks),
    with the token as `.word` and the fields by name."""

    def __new__(cls, word: str, log10: float, ngram_length: int, oov: bool) -> "TokenScore":
        self = super().__new__(cls, (log10, ngram_length, oov))
        self.word = word
        return self

    log10 = property(lambda self: self[0])
    ngram_length = property(lambda self: self[1])
    oov = property(lambda self: self[2])

    def __repr__(self) -> str:
        return f"TokenScore(word={self.word!r}, log10={self[0]!r}, ngram_length={self[1]!r}, oov={self[2]!r})"


@dataclass
class Perplexity:
    """Corpus perplexity as KenLM's `query` reports it (</s> counted as a token when eos)."""
    including_oovs: float
    excluding_oovs: float
    log10_total: float
    tokens: int
    oovs: int
    sentences: int


class NGramModel:
    """A backoff n-gram language model (built here, or read from ARPA or the binary format)."""

    def __init__(self, core: "_ngram.Model"):
        self._core = core
        self.summary: dict = {}

    # ---- construction ----
    @classmethod
    def build(cls, source, order: int = 3, config: BuildConfig | None = None, arpa_path=None,
              **options) -> "NGramModel":
        """Count and estimate a model. `source`: a text file path (.gz/.xz/.bz2 read through),
        an iterable of lines, or integer token ids (a 1-D array = one sequence, a 2-D array or a
        list of 1-D arrays = one sequence per row). With `arpa_path`, the ARPA file is written
        straight from the estimate, in lmplz's line order."""
        core, summary = _estimate(source, config or BuildConfig(order=order, **options), arpa_path, True)
        model = cls(core)
        model.summary = summary
        return model

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NGramModel":
        """Reads an ARPA file (optionally compressed) or a binary model written by `save`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such model file: {path}")
        if is_binary_model(path):
            return cls(_ngram.Model.load_binary(path))
        opener = _COMPRESSED.get(os.path.splitext(path)[1], open)
        try:
            with opener(path, "rb") as f:
                data = f.read()
        except _DECOMPRESS_ERRORS as e:
            raise NGramError(f"{path}: cannot read the model: {e or type(e).__name__} (truncated or corrupt file?)") from None
        try:
            return cls(_ngram.Model.read_arpa_bytes(data))
        except ValueError as e:
            raise NGramError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike, format: str = "binary") -> None:
        """Writes the model as 'binary' (memory-mapped on load) or 'arpa' (lmplz's layout), to a
        temporary name renamed onto `path` when complete: saving over the file this model was
        loaded from is safe (the mapping keeps the old file)."""
        if format not in ("binary", "arpa"):
            raise NGramError(f"format must be 'binary' or 'arpa', got {format!r}")
        write = self._core.save_binary if format == "binary" else self._core.write_arpa
        with output_path(path) as tmp:
            write(tmp)

    # ---- properties ----
    @property
    def order(self) -> int:
        return self._core.order

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    @property
    def counts(self) -> list[int]:
        """Number of n-grams per order."""
        return list(self._core.counts)

    @property
    def discounts(self) -> list[tuple[float, float, float]] | None:
        """D1, D2, D3+ per order (None for models read from ARPA)."""
        return self._core.discounts

    @property
    def warnings(self) -> list[str]:
        return list(self._core.warnings)

    @property
    def is_token_model(self) -> bool:
        """True when every word is a decimal token id (models built from token arrays)."""
        return self._core.is_token_model

    def index(self, word: str) -> int:
        """Vocabulary id of a word (0, <unk>, when unknown)."""
        return self._core.index(_utf8(word))

    def word(self, idx: int) -> str:
        return self._core.word(int(idx))

    def vocab(self) -> list[str]:
        return self._core.vocab()

    def __contains__(self, word: str) -> bool:
        return word == _ngram.UNK_WORD or self.index(word) != _ngram.UNK

    def __repr__(self) -> str:
        return f"NGramModel(order={self.order}, vocab={self.vocab_size}, ngrams={self.counts})"

    # ---- id spaces ----
    def _ids(self, ids) -> np.ndarray:
        """Model word ids (int32) from ids in this model's id space (token ids for token models)."""
        arr = np.asarray(ids)
        if arr.dtype.kind not in "iu" and arr.size:
            raise NGramError(f"ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False).reshape(-1)
        if self.is_token_model:
            special = (arr == EOS_TOKEN) | (arr == UNK_TOKEN)
            out = self._core.tokens_to_ids(np.where(special, 0, arr))
            out[arr == EOS_TOKEN] = _ngram.EOS
            out[arr == UNK_TOKEN] = _ngram.UNK
            return out
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise NGramError(f"word ids must be in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return arr.astype(np.int32)

    def _out_ids(self, ids: np.ndarray) -> np.ndarray:
        if not self.is_token_model:
            return ids.astype(np.int64)
        return self._core.ids_to_tokens(ids)  # </s> -> EOS_TOKEN, <unk> -> UNK_TOKEN

    # ---- scoring ----
    def score(self, sentence: str, bos: bool = True, eos: bool = True) -> float:
        """Log10 probability of a whitespace-tokenised sentence."""
        try:
            return self._core.score_sentence(sentence, bos, eos)
        except (UnicodeEncodeError, TypeError):  # surrogate-escaped bytes (a non-UTF-8 corpus)?
            if not isinstance(sentence, str):
                raise
            return self._core.score_sentence(_utf8(sentence), bos, eos)

    def full_scores(self, sentence: str, bos: bool = True, eos: bool = True) -> list[TokenScore]:
        """Per-token scores (</s> last when eos), with the length of the n-gram used."""
        words = split_words(sentence)
        ids = self._core.encode(_utf8(sentence))
        probs, lens = self._core.score_ids(ids, bos, eos)
        words = words + [_ngram.EOS_WORD] * eos
        oov = list(ids == _ngram.UNK) + [False] * eos
        return [TokenScore(w, float(p), int(n), bool(o)) for w, p, n, o in zip(words, probs, lens, oov)]

    def perplexity(self, sentence: str) -> float:
        """10^(-log10 p / (words + 1)), like the kenlm module's `perplexity`."""
        return 10.0 ** (-self.score(sentence) / (len(split_words(sentence)) + 1))

    def corpus_perplexity(self, lines: Iterable[str] | str | os.PathLike, bos: bool = True,
                          eos: bool = True) -> Perplexity:
        """Perplexity of a corpus (a file path or lines), including and excluding OOV tokens."""
        total = oov_total = 0.0
        tokens = oovs = sentences = 0
        for chunk in _text_batches(lines):
            t, o, n, k, s = self._core.corpus_stats(_utf8(chunk), bos, eos)
            total, oov_total, tokens, oovs, sentences = total + t, oov_total + o, tokens + n, oovs + k, sentences + s
        if tokens == 0:
            raise NGramError("the corpus is empty (nothing to score)")
        incl = 10.0 ** (-total / tokens)
        excl = 10.0 ** (-(total - oov_total) / (tokens - oovs)) if tokens > oovs else float("nan")
        return Perplexity(incl, excl, total, tokens, oovs, sentences)

    def score_ids(self, ids, bos: bool = True, eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per-token log10 probabilities (T + eos,) float32 and n-gram lengths (T + eos,) int32."""
        return self._core.score_ids(self._ids(ids), bos, eos)

    def score_batch(self, batch, lengths=None, bos: bool = True, eos: bool = True, threads: int = 2) -> np.ndarray:
        """Log10 totals (B,) float64 of a batch: a (B, T) array with optional lengths (B,), or a
        list of 1-D arrays. Rows are scored by `threads` threads."""
        if isinstance(batch, np.ndarray) and batch.ndim == 2:
            rows = batch
            if lengths is None:
                lengths = np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
        else:
            seqs = [np.asarray(s).reshape(-1) for s in batch]
            lengths = np.array([len(s) for s in seqs], dtype=np.int64)
            rows = np.zeros((len(seqs), int(lengths.max(initial=0))), dtype=np.int64)
            for i, s in enumerate(seqs):
                rows[i, : len(s)] = s
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.shape != (rows.shape[0],):
            raise NGramError(f"lengths must have shape ({rows.shape[0]},), got {lengths.shape}")
        if lengths.size and (lengths.min() < 0 or lengths.max() > rows.shape[1]):
            raise NGramError(f"lengths must lie in [0, {rows.shape[1]}]")
        mask = np.arange(rows.shape[1])[None, :] < lengths[:, None]
        ids = np.zeros(rows.shape, dtype=np.int32)
        ids[mask] = self._ids(np.asarray(rows)[mask])
        if not _is_int(threads) or not 1 <= threads <= MAX_THREADS:
            raise NGramError(f"threads must be an integer between 1 and {MAX_THREADS}, got {threads!r}")
        return self._core.score_batch(ids, lengths, bos, eos, int(threads))

    # ---- incremental state API ----
    def begin_state(self) -> "_ngram.State":
        """State after <s>."""
        return self._core.begin_state()

    def null_state(self) -> "_ngram.State":
        """Empty context."""
        return self._core.null_state()

    def score_word(self, state: "_ngram.State", word: str | int) -> tuple[float, int, "_ngram.State"]:
        """(log10 p(word | state), n-gram length, next state); `word` a string or an id."""
        idx = self.index(word) if isinstance(word, str) else int(self._ids([word])[0])
        return self._core.score_word(state, idx)

    def state_after(self, context, bos: bool = False) -> "_ngram.State":
        """State after a context of ids (following <s> when bos)."""
        return self._core.state_after(self._ids(context), bos)

    def distribution(self, state: "_ngram.State") -> np.ndarray:
        """Log10 probabilities (V,) float32 of every next word id (<s> gets -inf)."""
        return self._core.distribution(state)

    # ---- generation and drafting ----
    def continuations(self, context, k: int, bos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The k most likely next ids after `context` (ids int64, log10 float32, best first),
        without scoring the whole vocabulary: only words seen after the matched contexts and the
        top unigrams are candidates."""
        ids, probs = self._core.top_k(self.state_after(context, bos), int(k))
        return self._out_ids(ids), probs

    def greedy(self, context, k: int, bos: bool = False, stop_at_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Greedy continuation of up to k ids after `context` (a draft for speculative decoding)."""
        ids, probs = self._core.greedy(self._ids(context), int(k), bos, stop_at_eos)
        return self._out_ids(ids), probs

    def sample(self, max_words: int = 100, seed: int = 0, prefix: str | Sequence[int] = "",
               bos: bool = True) -> list[str]:
        """Samples words after `prefix` until </s> (included) or max_words."""
        ctx = self._core.encode(_utf8(prefix)) if isinstance(prefix, str) else self._ids(prefix)
        ids = self._core.sample(ctx, int(max_words), int(seed) & (2**64 - 1), bos)
        return [self._core.word(int(i)) for i in ids]


def build(source, order: int = 3, **options) -> NGramModel:
    """Shorthand for NGramModel.build."""
    return NGramModel.build(source, order, **options)


def load(path: str | os.PathLike) -> NGramModel:
    """Shorthand for NGramModel.load."""
    return NGramModel.load(path)


def is_binary_model(path: str | os.PathLike) -> bool:
    """True when the file starts like a binary model written by `save` (else: ARPA)."""
    with open(path, "rb") as f:
        return f.read(len(_ngram.BINARY_MAGIC)) == _ngram.BINARY_MAGIC


def split_words(sentence: str) -> list[str]:
    """The words of a sentence by KenLM's rule, the one the C++ side applies: split on ASCII
    whitespace (`bytes.split()` splits on exactly KenLM's `util::kSpaces`), never on Unicode spaces."""
    return [w.decode("utf-8", "surrogateescape") for w in _utf8(sentence).split()]


