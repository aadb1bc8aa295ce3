"""Whole-process time of CLI commands that need no torch (`mmfuse --help`, `mmfuse ngram build`),
as they run now and with torch imported first (what every command paid before the CLI imported
torch lazily), and through the `mmfuse` console script, interleaved run by run; KenLM's lmplz too
where it is on PATH, with its default -S (80% of memory, allocated first) and two smaller budgets.

    python bench/bench_startup.py [--corpus FILE] [--order 5] [--runs 7]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus_1mb(path: Path) -> None:
    """About 1 MB of Zipf-distributed words, 5-24 per line."""
    rng = np.random.default_rng(0)
    lines, size = [], 0
    while size < 1_000_000:
        line = " ".join(f"w{z}" for z in rng.zipf(1.3, rng.integers(5, 25)))
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines) + "\n")


def cli(argv: list, preload_torch: bool) -> list:
    pre = "import torch; " if preload_torch else ""
    return [sys.executable, "-c", f"{pre}import sys; from mmfuse.cli import main; sys.exit(main({argv!r}))"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="text corpus (default: a generated 1 MB one)")
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(args.corpus) if args.corpus else Path(tmp) / "corpus.txt"
        if not args.corpus:
            corpus_1mb(corpus)
        arpa = str(Path(tmp) / "out.arpa")
        build = ["ngram", "build", str(corpus), "-o", str(args.order), "--arpa", arpa, "-q"]
        cases = {"mmfuse --help": cli(["--help"], False),
                 "mmfuse --help, torch imported first": cli(["--help"], True),
                 f"mmfuse ngram build -o {args.order}": cli(build, False),
                 f"mmfuse ngram build -o {args.order}, torch imported first": cli(build, True)}
        if shutil.which("mmfuse"):  # the console script, as a user runs it
            cases[f"`mmfuse ngram build -o {args.order}`"] = ["mmfuse"] + build
        if shutil.which("lmplz"):  # its default -S (80% of memory) allocates that much first; smaller -S start faster
            for memory in ("", " -S 1G", " -S 100M"):
                cases[f"lmplz -o {args.order}{memory}"] = ["sh", "-c", f"lmplz -o {args.order}{memory} < {corpus} > {arpa} 2>/dev/null"]
        times = {k: [] for k in cases}
        for _ in range(args.runs):
            for name, cmd in cases.items():
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                times[name].append(time.perf_counter() - t)
        print(f"corpus {corpus.stat().st_size / 1e6:.2f} MB, median of {args.runs} interleaved runs")
        print(f"{'command':<48} {'median s':>9} {'min s':>7}")
        for name, ts in times.items():
            print(f"{name:<48} {statistics.median(ts):>9.3f} {min(ts):>7.3f}")


if __name__ == "__main__":
    main()
