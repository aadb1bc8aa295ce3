"""N-gram LM benchmark: build time and peak RSS (order 5 by default) and scoring throughput against
the `kenlm` module on the same ARPA model.

    python bench/bench_ngram.py                       # 50 MB Zipfian synthetic corpus
    python bench/bench_ngram.py --corpus text.txt --lmplz /path/to/lmplz

Each build runs in a child process so its peak RSS is its own. Targets (issue 4): build no slower
than lmplz (order 5 on 7.57M tokens / 52 MB in 12.3-13.8 s at 1.07 GB peak RSS) and under 1.5 GB;
scoring at least as fast as the kenlm module.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

import numpy as np

LMPLZ_REFERENCE = "lmplz (issue 4, same machine kind): order 5 on 7.57M tokens / 52 MB in 12.3-13.8 s, 1.07 GB peak RSS"


def zipf_corpus(path: str, size_mb: float, vocab: int = 200_000, seed: int = 0) -> None:
    """Writes a synthetic corpus: sentences of Zipf-chosen phrases of Zipf-chosen words, so that
    n-grams repeat roughly as in text (independent words would make nearly every 5-gram unique)."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)], dtype=object)
    word_p = 1.0 / np.arange(1, vocab + 1) ** 1.05
    word_p /= word_p.sum()
    n_phrases = 100_000
    phrase_len = rng.integers(1, 5, n_phrases)
    phrase_words = rng.choice(vocab, size=int(phrase_len.sum()), p=word_p)
    starts = np.concatenate([[0], np.cumsum(phrase_len)])
    phrases = [" ".join(words[phrase_words[starts[i]:starts[i + 1]]]) for i in range(n_phrases)]
    phrase_p = 1.0 / np.arange(1, n_phrases + 1) ** 0.9
    phrase_p /= phrase_p.sum()
    target = int(size_mb * 1e6)
    written = 0
    with open(path, "w") as f:
        while written < target:
            lens = rng.integers(2, 12, 10_000)  # phrases per sentence
            picks = rng.choice(n_phrases, size=int(lens.sum()), p=phrase_p)
            at = 0
            lines = []
            for n in lens:
                lines.append(" ".join(phrases[j] for j in picks[at:at + n]))
                at += n
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)


def run_child(cmd: list[str], stdin=None, stdout=None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout or subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode() if proc.stdout else ""
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out


BUILD_CHILD = """
import json, sys, time
from mmfuse.ngram import NGramModel, build_arpa
corpus, order, memory_mb, threads, mode, out = sys.argv[1:7]
kw = dict(memory_mb=float(memory_mb), threads=int(threads))
t = time.perf_counter()
if mode == "arpa":  # lmplz's job: counts -> estimate -> ARPA
    s = build_arpa(corpus, out, int(order), **kw)
else:  # counts -> estimate -> query model -> binary file
    m = NGramModel.build(corpus, int(order), **kw)
    m.save(out)
    s = dict(m.summary)
s["total_seconds"] = time.perf_counter() - t
print(json.dumps(s))
"""


def bench_build(corpus: str, order: int, memory_mb: int, threads: int, mode: str, out: str) -> dict:
    wall, rss, stdout = run_child([sys.executable, "-c", BUILD_CHILD, corpus, str(order), str(memory_mb),
                                   str(threads), mode, out])
    s = json.loads(stdout.strip().splitlines()[-1])
    s["wall_seconds"] = wall
    s["peak_rss_mb"] = rss
    return s


def bench_lmplz(lmplz: str, corpus: str, order: int, arpa: str) -> dict:
    with open(corpus, "rb") as fin, open(arpa, "wb") as fout:
        wall, rss, _ = run_child([lmplz, "-o", str(order), "-S", "1G"], stdin=fin, stdout=fout)
    return {"wall_seconds": wall, "peak_rss_mb": rss}


def bench_scoring(arpa: str, sentences: list[str], repeats: int) -> dict:
    """Sentences/s and tokens/s of the kenlm module and of mmfuse on the same ARPA file."""
    from mmfuse.ngram import NGramModel

    ours = NGramModel.load(arpa)
    tokens = sum(len(s.split()) + 1 for s in sentences)
    rows = {}

    def timed(fn):
        return statistics.median(timeit.repeat(fn, number=1, repeat=repeats))

    rows["mmfuse score(str) loop"] = timed(lambda: [ours.score(s) for s in sentences])
    ids = [ours._core.encode(s) for s in sentences]
    lengths = np.array([len(i) for i in ids])
    batch = np.zeros((len(ids), lengths.max()), dtype=np.int32)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = row
    rows["mmfuse score_batch(ids), 1 thread"] = timed(lambda: ours.score_batch(batch, lengths, threads=1))
    rows["mmfuse score_batch(ids), 2 threads"] = timed(lambda: ours.score_batch(batch, lengths, threads=2))
    try:
        import kenlm
    except ImportError:
        kenlm = None
    if kenlm is not None:
        ref = kenlm.Model(arpa)
        rows["kenlm score(str) loop"] = timed(lambda: [ref.score(s) for s in sentences])
        diff = max(abs(ref.score(s) - ours.score(s)) for s in sentences[:2000])
    else:
        diff = None
    return {"tokens": tokens, "sentences": len(sentences), "seconds": rows, "max_abs_diff_vs_kenlm": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="text corpus (default: a synthetic Zipfian corpus)")
    ap.add_argument("--size-mb", type=float, default=50.0, help="size of the synthetic corpus")
    ap.add_argument("--lmplz", help="path of KenLM's lmplz for a side-by-side build")
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-mb", type=float, default=5.0,
                    help="the scoring benchmark builds a model on this many MB of the corpus (kenlm loads ARPA slowly)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mmfuse_bench_ngram"))
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)

    corpus = args.corpus
    if corpus is None:
        corpus = os.path.join(args.workdir, f"zipf_{args.size_mb:g}mb.txt")
        if not os.path.exists(corpus):
            t = time.perf_counter()
            zipf_corpus(corpus, args.size_mb)
            print(f"generated {corpus} in {time.perf_counter() - t:.1f} s")
    size_mb = os.path.getsize(corpus) / 1e6
    print(f"corpus {corpus}: {size_mb:.1f} MB; machine: {os.cpu_count()} cores (shared and noisy)")

    arpa = os.path.join(args.workdir, f"mmfuse.o{args.order}.arpa")
    rows = []
    for mode, out, what in [("arpa", arpa, "mmfuse corpus -> ARPA"),
                            ("model", arpa + ".bin", "mmfuse corpus -> query model -> binary")]:
        runs = [bench_build(corpus, args.order, args.memory_mb, args.threads, mode, out) for _ in range(args.repeats)]
        rows.append((what, runs))
    b = rows[0][1][0]
    print(f"\n## build, order {args.order} ({args.repeats} runs each, medians; each run in a fresh process)")
    print(f"tokens {b['tokens']:,}  lines {b['lines']:,}  types {b['types']:,}  n-grams {b['ngrams']}")
    print("| what | wall s | peak RSS MB | tokens/s |")
    print("|---|---|---|---|")
    for what, runs in rows:
        wall = statistics.median(r["wall_seconds"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        print(f"| {what} | {wall:.2f} | {rss:.0f} | {b['tokens'] / wall / 1e6:.2f}M |")
    if args.lmplz:
        runs = [bench_lmplz(args.lmplz, corpus, args.order, arpa + ".lmplz") for _ in range(args.repeats)]
        wall = statistics.median(r["wall_seconds"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        print(f"| lmplz -o {args.order} -S 1G | {wall:.2f} | {rss:.0f} | {b['tokens'] / wall / 1e6:.2f}M |")
    print(f"\nreference: {LMPLZ_REFERENCE} (0.58M tokens/s)")

    with open(corpus, errors="replace") as f:
        text = f.read(int(args.score_mb * 1e6))
    sentences = text.splitlines()[:-1]
    small_corpus = os.path.join(args.workdir, "score_slice.txt")
    with open(small_corpus, "w") as f:
        f.write("\n".join(sentences) + "\n")
    small_arpa = os.path.join(args.workdir, f"score_slice.o{args.order}.arpa")
    bench_build(small_corpus, args.order, args.memory_mb, args.threads, "arpa", small_arpa)
    s = bench_scoring(small_arpa, sentences, args.repeats)
    print(f"\n## scoring: {s['sentences']:,} sentences / {s['tokens']:,} tokens (incl. </s>), model order {args.order} "
          f"on {args.score_mb:g} MB, medians of {args.repeats}")
    print("| what | seconds | tokens/s | vs kenlm |")
    print("|---|---|---|---|")
    base = s["seconds"].get("kenlm score(str) loop")
    for name, sec in s["seconds"].items():
        ratio = f"{base / sec:.2f}x" if base else "-"
        print(f"| {name} | {sec:.3f} | {s['tokens'] / sec / 1e6:.2f}M | {ratio} |")
    if s["max_abs_diff_vs_kenlm"] is not None:
        print(f"max |log10 difference| vs kenlm over 2000 sentences: {s['max_abs_diff_vs_kenlm']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
