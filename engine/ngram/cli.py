"""`mmfuse ngram build|query|perplexity`: the lmplz / KenLM query workflow on the command line."""
from __future__ import annotations

import argparse
import sys

from ..cli_options import check_output, emit_json
from . import model_module

_UNITS = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


def _memory_mb(text: str) -> float:
    """'1G', '512M', '800' (MB) -> megabytes."""
    t = text.strip().lower().rstrip("b")
    try:
        if t and t[-1] in _UNITS:
            return float(t[:-1]) * _UNITS[t[-1]]
        return float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad memory size {text!r} (examples: 1G, 512M, 800)") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("ngram", help="n-gram language models (KenLM-compatible)")
    sub = p.add_subparsers(dest="ngram_command", required=True)

    b = sub.add_parser("build", help="estimate a modified Kneser-Ney model from a text corpus (like lmplz)")
    b.add_argument("corpus", help="whitespace-tokenised text, one sentence per line (.gz/.xz/.bz2 read through)")
    b.add_argument("-o", "--order", type=int, required=True, help="highest n-gram order")
    b.add_argument("--arpa", help="write the model as ARPA here")
    b.add_argument("--binary", help="write the memory-mappable binary model here")
    b.add_argument("-S", "--memory", type=_memory_mb, default=1024.0, help="counting memory budget (default 1G)")
    b.add_argument("-T", "--temp-prefix", default=None, help="directory for spilled sorted runs")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--prune", type=int, nargs="+", default=[], help="per-order count thresholds, e.g. 0 0 1")
    b.add_argument("--discount-fallback", type=float, nargs="*", default=None,
                   help="discounts for orders whose closed-form estimate fails (default 0.5 1 1.5)")
    b.add_argument("--no-interpolate-unigrams", action="store_true", help="give the unigram mass to <unk>")
    b.add_argument("--skip-symbols", action="store_true", help="treat <s>, </s>, <unk> in the corpus as whitespace")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
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
    pp.add_argument("text")
    pp.add_argument("--no-sentence-context", action="store_true")
    pp.add_argument("--json", action="store_true", help="the summary as one JSON line")
    pp.set_defaults(func=_perplexity)


def _build(args) -> int:
    if not args.arpa and not args.binary:
        raise ValueError("give --arpa and/or --binary for the output")
    for option, path in (("--arpa", args.arpa), ("--binary", args.binary)):
        if path:
            check_output(path, option)  # before the counting, not after
    m = model_module()
    fallback = None if args.discount_fallback is None else (args.discount_fallback or [0.5, 1.0, 1.5])
    cfg = m.BuildConfig(order=args.order, memory_mb=args.memory, tmp_dir=args.temp_prefix, threads=args.threads,
                      prune=args.prune, interpolate_unigrams=not args.no_interpolate_unigrams,
                      discount_fallback=fallback, skip_symbols=args.skip_symbols, progress=not args.quiet)
    if args.binary:
        model = m.NGramModel.build(args.corpus, config=cfg, arpa_path=args.arpa)
        model.save(args.binary, "binary")
        s = model.summary
    else:  # ARPA only: no query structures needed
        s = m.build_arpa(args.corpus, args.arpa, config=cfg)
    err = sys.stderr
    print(f"tokens {s['tokens']:,}  lines {s['lines']:,}  types {s['types']:,} (incl. <unk>, <s>, </s>)", file=err)
    for n, (count, d) in enumerate(zip(s["ngrams"], s["discounts"]), 1):
        print(f"  {n}-grams {count:>12,}   discounts D1 {d[0]:.6g}  D2 {d[1]:.6g}  D3+ {d[2]:.6g}", file=err)
    for w in s["warnings"]:
        print(f"warning: {w}", file=err)
    print(f"built in {s['seconds']:.2f} s, peak RSS {s['peak_rss_mb']:.0f} MB"
          + (f", {s['spilled_runs']} sorted runs spilled to disk" if s["spilled_runs"] else ""), file=err)
    return 0


def _query(args) -> int:
    m = model_module()
    model = m.NGramModel.load(args.model)
    context = not args.no_sentence_context
    lines = list(sys.stdin) if args.text == "-" else args.text
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


def _perplexity(args) -> int:
    model = model_module().NGramModel.load(args.model)
    context = not args.no_sentence_context
    _print_perplexity(model.corpus_perplexity(args.text, bos=context, eos=context), args.json)
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
