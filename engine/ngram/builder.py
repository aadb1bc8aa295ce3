"""Building n-gram models: a corpus (text files, compressed or not, standard input, lines, or
integer token arrays) handed to the C++ counter and estimator (`mmfuse._ngram.Builder`), as lmplz
does it, and the ARPA written atomically. This side needs no numpy, so `mmfuse ngram build` starts
as fast as a C++ tool; the query side (`NGramModel`) is `mmfuse.ngram.language_model`.

Text follows KenLM's rules: lines end at '\n' only; words are separated by ASCII whitespace."""
from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import math
import numbers
import os
import resource
import stat
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .. import _ngram
from ..cli_options import progress as progress_bar
from ..cli_options import progress_shown
from ..errors import NGramError, OutputError
from ..files import atomic_path

MAX_ORDER = _ngram.MAX_ORDER
_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
_TEXT_BATCH = 1 << 20  # characters of lines handed to C++ at once
MAX_THREADS = _ngram.MAX_THREADS
_MAX_MEMORY_MB = float(1 << 40)  # -S beyond this (an exabyte) is a typo
# What a truncated or corrupt .gz/.xz/.bz2 file raises while it is read (BadGzipFile is an OSError).
_DECOMPRESS_ERRORS = (EOFError, OSError, lzma.LZMAError, zlib.error)


@dataclass
class BuildConfig:
    """Options of `NGramModel.build`, named after lmplz's."""
    order: int = 3                    # highest n-gram order (1..MAX_ORDER), lmplz -o
    memory_mb: float = 1024           # budget of the counting stage only (-S): past it sorted runs
                                      # spill to tmp_dir; estimation and the query tables then take
                                      # memory in proportion to the number of n-grams, unbounded by it
    tmp_dir: str | None = None        # where spilled runs go (-T); default: the system temp dir
    threads: int = 2                  # counting/sorting threads (1..MAX_THREADS)
    prune: Sequence[int] = ()         # per-order count thresholds, e.g. (0, 0, 1) (--prune)
    interpolate_unigrams: bool = True  # False: give the unigram interpolation mass to <unk> (SRILM)
    discount_fallback: Sequence[float] | None = None  # e.g. (0.5, 1.0, 1.5) (--discount_fallback)
    skip_symbols: bool = False        # treat <s>, </s>, <unk> in the corpus as whitespace
    progress: bool = False            # a tqdm bar (bytes, with a percentage for files) on stderr while
                                      # counting, shown when stderr is a terminal
    verbose: bool = False             # the C++ core's counting and stage-timing lines on stderr

    def validate(self) -> None:
        """Raises NGramError naming the field (and lmplz's flag) of the first bad option."""
        if not _is_int(self.order) or not 1 <= self.order <= MAX_ORDER:
            raise NGramError(f"order (-o) must be an integer between 1 and {MAX_ORDER}, got {self.order!r}")
        if not _is_real(self.memory_mb) or not 1 <= self.memory_mb <= _MAX_MEMORY_MB:
            raise NGramError(f"memory_mb (-S) must be a number of megabytes between 1 and {_MAX_MEMORY_MB:.0f}, got {self.memory_mb!r}")
        if not _is_int(self.threads) or not 1 <= self.threads <= MAX_THREADS:
            raise NGramError(f"threads (--threads) must be an integer between 1 and {MAX_THREADS}, got {self.threads!r}")
        if isinstance(self.prune, (str, bytes)) or not all(_is_int(t) and t >= 0 for t in self.prune):
            raise NGramError(f"pruning thresholds (--prune) must be integers >= 0, got {self.prune!r}")
        if self.discount_fallback is not None:
            d = self.discount_fallback
            if isinstance(d, (str, bytes)) or not 1 <= len(d) <= 3:
                raise NGramError(f"discount_fallback (--discount-fallback) takes 1 to 3 discounts (for counts 1, 2, 3+), got {d!r}")
            for j, v in enumerate(d, 1):  # D_j in [0, j] (the last value also stands for the D's after it)
                if not _is_real(v) or not 0 <= v <= j:
                    raise NGramError(f"discount_fallback (--discount-fallback): discount {j} must be a number in [0, {j}] "
                                     f"(outside, probabilities would fall below 0 or rise above 1), got {v!r}")
        if self.tmp_dir is not None:
            tmp = os.fspath(self.tmp_dir)
            if not os.path.isdir(tmp) or not os.access(tmp, os.W_OK | os.X_OK):
                raise OutputError(f"{tmp}: the temp directory (tmp_dir, -T) is not a writable directory")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _estimate(source, cfg: BuildConfig, arpa_path, build_model: bool):
    """Runs the C++ builder: (core model or None, summary dict). The ARPA output's temporary file
    is made before counting, so an unwritable place fails before the work."""
    cfg.validate()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        arpa_tmp = "" if arpa_path is None else stack.enter_context(output_path(arpa_path))
        builder = _ngram.Builder(cfg.order, int(cfg.memory_mb * (1 << 20)), os.fspath(cfg.tmp_dir or tempfile.gettempdir()),
                                 int(cfg.threads), cfg.skip_symbols, cfg.verbose)
        _feed(builder, source, cfg.progress)
        if builder.tokens == 0:
            raise NGramError("the corpus is empty (no tokens)")
        fallback = None if cfg.discount_fallback is None else [float(d) for d in cfg.discount_fallback]
        out = builder.finish([int(t) for t in cfg.prune], cfg.interpolate_unigrams, fallback, cfg.verbose,
                             arpa_tmp, build_model)
    stats = out.stats if build_model else out
    summary = {
        "order": cfg.order,
        "tokens": int(builder.tokens),
        "lines": int(builder.lines),
        "types": int(builder.vocab_size) if not build_model else out.vocab_size,
        "ngrams": list(out.counts) if build_model else list(stats["counts"]),
        "discounts": out.discounts if build_model else list(stats["discounts"]),
        "count_of_counts": stats.get("count_of_counts"),
        "spilled_runs": int(builder.spilled_runs),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "warnings": list(out.warnings if build_model else stats["warnings"]),
    }
    return (out if build_model else None), summary


def build_arpa(source, arpa_path, order: int = 3, config: BuildConfig | None = None, **options) -> dict:
    """Estimates a model and writes it as ARPA without building the query structures (lmplz's
    job); returns the build summary."""
    return _estimate(source, config or BuildConfig(order=order, **options), arpa_path, False)[1]


def _copy_to_stdout(path: str) -> None:
    try:
        out = sys.stdout.buffer
        out.flush()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                out.write(chunk)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"standard output: write failed ({e.strerror or e})") from None


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of text read with surrogate escapes (bytes of a non-UTF-8 file pass through)."""
    return text.encode("utf-8", "surrogateescape")


@contextlib.contextmanager
def output_path(path: str | os.PathLike) -> Iterator[str]:
    """The path to hand the C++ writer for `path`: a temporary file renamed onto it when complete
    (`atomic_path`), except for "-" (standard output) and existing non-regular files (a FIFO,
    /dev/null, /dev/full), which are written in place as streams."""
    path = os.fspath(path)
    if path == "-":  # through a temporary file: the C++ writer cannot share Python's stdout
        fd, tmp = tempfile.mkstemp(prefix="mmfuse-ngram-", suffix=".out")
        os.close(fd)
        try:
            yield tmp
            _copy_to_stdout(tmp)
        finally:
            os.unlink(tmp)
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        yield path
        return
    if mode is not None and stat.S_ISDIR(mode):
        raise OutputError(f"{path}: is a directory, not an output file")
    with atomic_path(path) as tmp:
        yield os.fspath(tmp)


def _text_batches(lines) -> Iterable[str]:
    """Newline-joined batches of lines from a path (compressed or not) or an iterable of lines."""
    if isinstance(lines, (str, os.PathLike)):
        path = os.fspath(lines)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such corpus file: {path}")
        opener = _COMPRESSED.get(os.path.splitext(path)[1], open)
        # newline="\n": lines end at '\n' only (KenLM's rule; '\r' stays in the line as a space).
        with opener(path, "rt", encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            try:
                yield from _text_batches(f)
            except _DECOMPRESS_ERRORS as e:
                raise NGramError(f"{path}: cannot read the corpus: {e or type(e).__name__} (truncated or corrupt file?)") from None
        return
    batch, size = [], 0
    for line in lines:
        if not isinstance(line, str):
            raise NGramError(f"expected lines of text (str), got {type(line).__name__}")
        line = line[:-1] if line.endswith("\n") else line
        batch.append(line)
        size += len(line) + 1
        if size >= _TEXT_BATCH:
            yield "\n".join(batch) + "\n"
            batch, size = [], 0
    if batch:
        yield "\n".join(batch) + "\n"


def _feed(builder: "_ngram.Builder", source, progress: bool = False) -> None:
    """Hands a corpus to the C++ counter, with a tqdm bar of the bytes counted when `progress` (and
    stderr is a terminal): a percentage for plain files (counted by C++, which reports every
    _ngram.PROGRESS_BYTES), a running total for compressed files, standard input and lines."""
    bar_options = dict(desc="counting", unit="B", unit_scale=True, unit_divisor=1024)
    show = progress and progress_shown()
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such corpus file: {path}")
        if os.path.splitext(path)[1] not in _COMPRESSED:
            if not show:
                builder.add_file(path)
                return
            with progress_bar(total=os.path.getsize(path), **bar_options) as bar:
                builder.add_file(path, _advance_to(bar))
            return
    np = sys.modules.get("numpy")  # a token array can only exist where numpy was imported
    if np is not None and isinstance(source, np.ndarray):
        if source.dtype.kind not in "iu":
            raise NGramError(f"token arrays must hold integers, got dtype {source.dtype}")
        rows = [source] if source.ndim == 1 else list(source) if source.ndim == 2 else None
        if rows is None:
            raise NGramError(f"token arrays must be 1-D or 2-D, got shape {source.shape}")
        for row in rows:
            builder.add_token_ids(row.astype(np.int64))
        return
    if isinstance(source, (bytes, bytearray, io.IOBase)) and not isinstance(source, io.TextIOBase):
        raise NGramError("pass text as str lines or a file path, not bytes")
    if np is not None and isinstance(source, (list, tuple)) and source and isinstance(source[0], np.ndarray):
        for row in source:
            row = np.asarray(row)
            if row.ndim != 1 or row.dtype.kind not in "iu":
                raise NGramError(f"each token array must be 1-D integers, got shape {row.shape} dtype {row.dtype}")
            builder.add_token_ids(row.astype(np.int64))
        return
    with progress_bar(**bar_options) if show else contextlib.nullcontext() as bar:
        for chunk in _text_batches(source):
            data = _utf8(chunk)
            builder.add_text(data)
            if bar is not None:
                bar.update(len(data))


def _advance_to(bar):
    """A C++ progress callback (bytes consumed, total) moving `bar` to the bytes consumed."""
    def advance(consumed: int, total: int) -> None:
        bar.update(consumed - bar.n)
    return advance
