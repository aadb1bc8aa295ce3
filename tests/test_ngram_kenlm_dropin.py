"""KenLM as a drop-in (issue 13): lmplz's float formatting in ARPA output, `full_scores` tuples like
the kenlm module's, `-` for stdin/stdout, lmplz's option spellings, `mmfuse ngram convert` (ARPA <->
binary, like build_binary), and `mmfuse ngram` without importing torch."""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmfuse import _ngram
from mmfuse.ngram import NGramModel, build_arpa

DATA = Path(__file__).parent / "data" / "kenlm"
TRAIN, TEST = DATA / "train.txt", DATA / "test.txt"


def lmplz_float(v: np.float32) -> str:
    """KenLM's util::ToString(float): shortest round-trip digits, decimal notation for decimal
    exponents in [-6, 21), else '<d.ddd>e<exp>' (double-conversion's ToShortestSingle, -6, 21)."""
    if v == 0:
        return "0"
    if np.isinf(v):
        return "-inf" if v < 0 else "inf"
    sci = np.format_float_scientific(v, unique=True, trim="-", exp_digits=1)
    exponent = int(sci.split("e")[1])  # of the shortest digits (rounding may change floor(log10))
    if -6 <= exponent < 21:
        return np.format_float_positional(v, unique=True, trim="-")
    return sci


def arpa_with(values):
    lines = [f"{v}\tw{i}\t{v}" for i, v in enumerate(values)]
    return "\n".join(["\\data\\", f"ngram 1={len(values) + 3}", "ngram 2=1", "", "\\1-grams:",
                      "-1\t<unk>\t0", "-99\t<s>\t-0.5", "-0.5\t</s>\t0", *lines, "", "\\2-grams:",
                      "-0.25\t<s> w0", "", "\\end\\", ""])


def test_arpa_floats_are_written_like_lmplz(tmp_path):
    rng = np.random.default_rng(0)
    values = [-7.328936e-05, -1e-7, -1e-6, -1.5e-6, -9.99999e-7, -0.0001, -123.25, -99.0, -1.0, -0.5,
              -3.0517578e-05, -1.2345678e-20]
    values += list(-(10.0 ** rng.uniform(-9, 2.5, size=300)))
    values = [np.float32(v) for v in values]
    model = NGramModel(_ngram.Model.read_arpa_bytes(arpa_with([repr(float(v)) for v in values]).encode()))
    model.save(tmp_path / "m.arpa", "arpa")
    written = {}
    for line in (tmp_path / "m.arpa").read_text().splitlines():
        f = line.split("\t")
        if len(f) == 3 and f[1].startswith("w") and " " not in f[1]:
            written[int(f[1][1:])] = (f[0], f[2])
    assert len(written) == len(values)
    for i, v in enumerate(values):
        assert written[i] == (lmplz_float(v), lmplz_float(v)), (float(v), written[i])
        assert np.float32(written[i][0]) == v  # and they read back exactly
    assert written[0] == ("-0.00007328936", "-0.00007328936") and written[1][0] == "-1e-7"
    assert lmplz_float(np.float32(-2.5e-5)) == "-0.000025" and lmplz_float(np.float32(-1e-7)) == "-1e-7"


def test_full_scores_unpack_like_the_kenlm_module(tmp_path):
    model = NGramModel.build(TRAIN, 3)
    sentence = open(TEST).readline().strip()
    scores = model.full_scores(sentence)
    for (prob, length, oov), t in zip(scores, scores):
        assert (prob, length, oov) == (t.log10, t.ngram_length, t.oov)
    assert [t.word for t in scores][-1] == "</s>"
    kenlm = pytest.importorskip("kenlm")
    model.save(tmp_path / "m.arpa", "arpa")
    ref = kenlm.Model(str(tmp_path / "m.arpa"))
    for (p, n, oov), (rp, rn, roov) in zip(model.full_scores(sentence), ref.full_scores(sentence)):
        assert (n, oov) == (rn, roov) and p == pytest.approx(rp, abs=1e-5)


def run_cli(*argv, stdin=b""):
    r = subprocess.run([sys.executable, "-c", "import sys; from mmfuse.cli import main; sys.exit(main(sys.argv[1:]))",
                        *map(str, argv)], input=stdin, capture_output=True, timeout=600)
    return r.returncode, r.stdout, r.stderr.decode()


def test_stdin_stdout_and_lmplz_spellings(tmp_path):
    rc, arpa, err = run_cli("ngram", "build", "-o", "3", "-S", "10%", "-T", tmp_path, "--discount_fallback",
                            "--skip_symbols", "--prune", "0", "0", "1", stdin=TRAIN.read_bytes())
    assert rc == 0, err
    reference = tmp_path / "ref.arpa"
    build_arpa(TRAIN, reference, 3, prune=(0, 0, 1), discount_fallback=(0.5, 1.0, 1.5), skip_symbols=True)
    assert arpa == reference.read_bytes()  # lmplz -o 3 < text > arpa
    rc, out, err = run_cli("ngram", "build", "--text", TRAIN, "-o", "3", "--arpa", "-", "--prune", "0", "0", "1")
    assert rc == 0 and out == reference.read_bytes(), err
    rc, out, err = run_cli("ngram", "perplexity", reference, stdin=TEST.read_bytes())
    assert rc == 0 and b"Perplexity including OOVs:" in out, err
    rc, out, err = run_cli("ngram", "build", tmp_path / "missing.txt", "-o", "2")  # ARPA to stdout
    assert rc == 2 and out == b"" and "no such corpus file" in err and "standard output" not in err
    rc, out, err = run_cli("ngram", "build", TRAIN, "-o", "2", "--arpa", "/dev/full")
    assert rc == 2 and "/dev/full" in err and "Traceback" not in err


def test_convert_arpa_to_binary_and_back(tmp_path):
    model = NGramModel.build(TRAIN, 3)
    model.save(tmp_path / "m.arpa", "arpa")
    from mmfuse.cli import main

    assert main(["ngram", "convert", str(tmp_path / "m.arpa"), str(tmp_path / "m.bin")]) == 0
    binary = NGramModel.load(tmp_path / "m.bin")
    assert binary.counts == model.counts
    assert main(["ngram", "convert", str(tmp_path / "m.bin"), str(tmp_path / "back.arpa")]) == 0
    assert (tmp_path / "back.arpa").read_bytes() == (tmp_path / "m.arpa").read_bytes()
    for line in open(TEST).read().splitlines()[:50]:
        assert binary.score(line) == model.score(line)


def test_ngram_commands_do_not_import_torch(tmp_path):
    code = ("import sys; from mmfuse.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    model = tmp_path / "m.arpa"
    for argv in (["ngram", "build", str(TRAIN), "-o", "2", "--arpa", str(model), "-q"],
                 ["ngram", "perplexity", str(model), str(TEST)]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
