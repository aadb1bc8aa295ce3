"""`mmfuse ngram build|query|perplexity|convert`: the lmplz / KenLM query / build_binary workflow on
the command line, with lmplz's option spellings (`--discount_fallback`, `--skip_symbols`, `--prune`,
`-S`, `-T`) and `-` (the default) for standard input and output: `mmfuse ngram build -o 5 < text > arpa`."""
from __future__ import annotations

import argparse
import io
import os
import stat
import sys

from ..cli_options import check_output, emit_json
from ..errors import NGramError
from . import ngram_module

_UNITS = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def _memory_mb(text: str) -> float:
    """'1G', '512M', '800' (MB), '80%' (of physical memory, as lmplz) -> megabytes."""
    t = text.strip().lower().rstrip("b")
    try:
        if t.endswith("%"):
            return float(t[:-1]) / 100 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
        if t and t[-1] in _UNITS:
            return float(t[:-1]) * _UNITS[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (examples: 1G, 512M, 800, 80%)") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("ngram", help="n-gram language models (KenLM-compatible)")
    sub = p.add_subparsers(dest="ngram_command", required=True)

    b = sub.add_parser("build", help="estimate a modified Kneser-Ney model from a text corpus (like lmplz)")
    b.add_argument("corpus", nargs="?", default=None,
                   help="whitespace-tokenised text, one sentence per line (.gz/.xz/.bz2 read through; default: - for stdin)")
    b.add_argument("--text", dest="text_option", metavar="CORPUS", help="the corpus, as lmplz's --text")
    b.add_argument("-o", "--order", type=int, required=True, help="highest n-gram order")
    b.add_argument("--arpa", help="write the model as ARPA here (- for stdout; the default when --binary is not given)")
    b.add_argument("--binary", help="write the memory-mappable binary model here")
    b.add_argument("-S", "--memory", type=_memory_mb, default=1024.0,
                   help="memory budget of the counting stage only (default 1G; 80%% = of physical memory): past it, "
                   "sorted runs spill to -T; estimation and the query tables afterwards take memory in proportion "
                   "to the n-grams, not bounded by -S")
    b.add_argument("-T", "--temp-prefix", "--temp_prefix", dest="temp_prefix", default=None,
                   help="directory for spilled sorted runs")
    b.add_argument("--threads", type=int, default=2, help="counting threads (1 to 256)")
    b.add_argument("--prune", type=int, nargs="+", default=[], help="per-order count thresholds, e.g. 0 0 1")
    b.add_argument("--discount-fallback", "--discount_fallback", dest="discount_fallback", type=float, nargs="*",
                   default=None, help="discounts for orders whose closed-form estimate fails (default 0.5 1 1.5)")
    b.add_argument("--no-interpolate-unigrams", action="store_true", help="give the unigram mass to <unk>")
    b.add_argument("--skip-symbols", "--skip_symbols", dest="skip_symbols", action="store_true",
                   help="treat <s>, </s>, <unk> in the corpus as whitespace")
    b.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar (it is shown only when stderr is a terminal); the summary is still printed")
    b.add_argument("-v", "--verbose", action="store_true", help="the counting and stage-timing lines of the C++ core")
    b.set_defaults(func=_build)

    q = sub.add_parser("query", help="score sentences (stdin or a file) like KenLM's query")
    q.add_argument("model", help="ARPA or binary model")
    q.add_argument("text", nargs="?", default="-", help="text file (default: stdin)")
    q.add_argument("--no-sentence-context", action="store_true", help="no <s> and </s> around lines")
    q.add_argument("--summary-only", action="store_true", help="only the perplexity summary")
    q.add_argument("--json", action="store_true", help="JSON lines: one per sentence, then the summary")
    q.set_defaults(func=_query)

    pp = sub.add_parser("perplexity", help="perplexity of a text, with and without OOVs")
    pp.add_argument("model")
    pp.add_argument("text", nargs="?", default="-", help="text file (default: stdin)")
    pp.add_argument("--no-sentence-context", action="store_true")
    pp.add_argument("--json", action="store_true", help="the summary as one JSON line")
    pp.set_defaults(func=_perplexity)

    c = sub.add_parser("convert", help="ARPA <-> binary (like build_binary)")
    c.add_argument("model", help="ARPA (.gz/.xz/.bz2 read through) or binary model")
    c.add_argument("out", help="output file (- for stdout)")
    c.add_argument("--to", choices=["binary", "arpa"], default=None,
                   help="output format (default: binary from ARPA, ARPA from binary)")
    c.set_defaults(func=_convert)


def _build(args) -> int:
    if args.corpus is not None and args.text_option is not None:
        raise NGramError("give the corpus once: as an argument or as --text")
    corpus = args.text_option or args.corpus or "-"
    if corpus == "-":
        corpus = _stdin_lines()
    if not args.arpa and not args.binary:
        args.arpa = "-"  # lmplz writes ARPA to stdout
    for option, path in (("--arpa", args.arpa), ("--binary", args.binary)):
        if path:
            _check_output(path, option)  # before the counting, not after
    b = ngram_module("builder")  # without numpy: an ARPA-only build starts like a C++ tool
    fallback = None if args.discount_fallback is None else (args.discount_fallback or [0.5, 1.0, 1.5])
    cfg = b.BuildConfig(order=args.order, memory_mb=args.memory, tmp_dir=args.temp_prefix, threads=args.threads,
                      prune=args.prune, interpolate_unigrams=not args.no_interpolate_unigrams,
                      discount_fallback=fallback, skip_symbols=args.skip_symbols, progress=not args.quiet,
                      verbose=args.verbose)
    if args.binary:
        with b.output_path(args.binary) as binary:  # the temporary file exists before the work
            model = ngram_module().NGramModel.build(corpus, config=cfg, arpa_path=args.arpa)
            model.save(binary, "binary")
        s = model.summary
    else:  # ARPA only: no query structures needed
        s = b.build_arpa(corpus, args.arpa, config=cfg)
    err = sys.stderr  # the summary, as lmplz prints it (also with -q, which silences progress only)
    print(f"tokens {s['tokens']:,}  lines {s['lines']:,}  types {s['types']:,} (incl. <unk>, <s>, </s>)", file=err)
    for n, (count, d) in enumerate(zip(s["ngrams"], s["discounts"]), 1):
        print(f"  {n}-grams {count:>12,}   discounts D1 {d[0]:.6g}  D2 {d[1]:.6g}  D3+ {d[2]:.6g}", file=err)
    for w in s["warnings"]:
        print(f"warning: {w}", file=err)
    print(f"built in {s['seconds']:.2f} s, peak RSS {s['peak_rss_mb']:.0f} MB"
          + (f", {s['spilled_runs']} sorted runs spilled to disk" if s["spilled_runs"] else ""), file=err)
    return 0


def _query(args) -> int:
    m = ngram_module()
    model = m.NGramModel.load(args.model)
    context = not args.no_sentence_context
    lines = list(_stdin_lines()) if args.text == "-" else args.text
    if not args.summary_only:
        out = sys.stdout
        for chunk in m._text_batches(lines):
            for line in chunk.split("\n")[:-1]:
                scores = model.full_scores(line, bos=context, eos=context)
                if args.json:
                    emit_json({"words": [{"word": t.word, "index": model.index(t.word), "ngram_length": t.ngram_length,
                                          "log10": t.log10, "oov": bool(t.oov)} for t in scores],
                               "total": model.score(line, context, context), "oovs": sum(bool(t.oov) for t in scores)})
                    continue
                words = "\t".join(f"{t.word}={model.index(t.word)} {t.ngram_length} {t.log10:.7g}" for t in scores)
                out.write(f"{words}\tTotal: {model.score(line, context, context):.7g} OOV: {sum(t.oov for t in scores)}\n")
    _print_perplexity(model.corpus_perplexity(lines, bos=context, eos=context), args.json)
    return 0


def _stdin_lines():
    """Standard input as lines ending at '\n' only (KenLM's rule; see mmfuse.ngram.language_model)."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape", newline="\n")


def _check_output(path: str, option: str) -> None:
    """check_output, but for stdout (-) and existing devices or FIFOs, which are written as streams."""
    try:
        if path == "-" or not stat.S_ISREG(os.stat(path).st_mode) and not os.path.isdir(path):
            return
    except OSError:
        pass
    check_output(path, option)


def _perplexity(args) -> int:
    model = ngram_module().NGramModel.load(args.model)
    context = not args.no_sentence_context
    text = _stdin_lines() if args.text == "-" else args.text
    _print_perplexity(model.corpus_perplexity(text, bos=context, eos=context), args.json)
    return 0


def _convert(args) -> int:
    m = ngram_module()
    _check_output(args.out, "out")
    model = m.NGramModel.load(args.model)
    to = args.to or ("arpa" if m.is_binary_model(args.model) else "binary")
    model.save(args.out, to)
    print(f"wrote {to} model {args.out}: order {model.order}, n-grams {model.counts}", file=sys.stderr)
    return 0


def _print_perplexity(p, as_json: bool = False) -> None:
    if as_json:
        emit_json({"perplexity_including_oovs": p.including_oovs, "perplexity_excluding_oovs": p.excluding_oovs,
                   "oovs": p.oovs, "tokens": p.tokens})
        return
    print(f"Perplexity including OOVs:\t{p.including_oovs:.10g}")
    print(f"Perplexity excluding OOVs:\t{p.excluding_oovs:.10g}")
    print(f"OOVs:\t{p.oovs}")
    print(f"Tokens:\t{p.tokens}")
