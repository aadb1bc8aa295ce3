"""N-gram LM reliability (issue 9): no lost files (atomic outputs, saving over a mapped model, killed
writers, full disks), bounded and failing-cleanly threads, a Builder refusing concurrent use, one
word-splitting and one line-splitting rule (KenLM's) everywhere, refused impossible ARPA values and
fallback discounts, id maps sized by the vocabulary, and typed one-line errors."""
import bz2
import gzip
import io
import lzma
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmfuse import _ngram
from mmfuse.errors import MMFuseError, NGramError, OutputError
from mmfuse.ngram import BuildConfig, NGramModel
from mmfuse.ngram.language_model import split_words

DATA = Path(__file__).parent / "data" / "kenlm"
TRAIN, TEST = DATA / "train.txt", DATA / "test.txt"
# Under tests/asan_ngram.sh: AddressSanitizer reserves terabytes of address space, so the tests
# that limit it (RLIMIT_AS) cannot run there.
SANITIZED = os.environ.get("MMFUSE_SANITIZED") == "1"


def run_python(code: str, *, limits=None, ignore_sigxfsz=False, timeout=120, wait=True):
    """Runs `code` in a fresh interpreter (crashes such as SIGBUS stay out of the test process),
    with resource limits {RLIMIT_*: bytes} applied in the child."""
    def setup():
        for which, value in (limits or {}).items():
            resource.setrlimit(which, (value, value))
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "-c", textwrap.dedent(code)]
    if not wait:
        return subprocess.Popen(args, env=env, preexec_fn=setup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, preexec_fn=setup, capture_output=True, text=True, timeout=timeout)


def cli(*argv):
    """Runs the mmfuse command in this process: (exit code, stderr)."""
    from mmfuse.cli import main

    old = sys.stderr
    sys.stderr = io.StringIO()
    try:
        rc = main([str(a) for a in argv])
        return rc, sys.stderr.getvalue()
    finally:
        sys.stderr = old


def assert_one_line_error(rc, err, *names):
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], err
    for name in names:
        assert str(name) in lines[0], (name, err)


def temp_leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---- lost data and crashes ----

def test_saving_over_the_loaded_binary_keeps_the_old_model_usable(tmp_path):
    """m = load("m.bin"); m.save("m.bin") used to truncate the mapped file under the model (SIGBUS)."""
    r = run_python(f"""
        from mmfuse.ngram import NGramModel
        path = {str(tmp_path / 'm.bin')!r}
        NGramModel.build({str(TRAIN)!r}, 3).save(path)
        m = NGramModel.load(path)
        before = [m.score(line) for line in open({str(TEST)!r}).read().splitlines()[:200]]
        m.save(path)                                   # over the file m is mapped from
        NGramModel.build(["x y z", "y z x"], 2, discount_fallback=(0.5, 1, 1.5)).save(path)  # and a new model over it
        after = [m.score(line) for line in open({str(TEST)!r}).read().splitlines()[:200]]
        assert before == after, "the old model changed"
        assert NGramModel.load(path).order == 2
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])
    assert temp_leftovers(tmp_path) == []


def test_rebuilding_a_binary_in_use_keeps_its_readers_alive(tmp_path):
    """A process querying m.bin while `mmfuse ngram build ... --binary m.bin` rebuilds it."""
    r = run_python(f"""
        from mmfuse.cli import main
        from mmfuse.ngram import NGramModel
        path, arpa = {str(tmp_path / 'm.bin')!r}, {str(tmp_path / 'm.arpa')!r}
        assert main(["ngram", "build", {str(TRAIN)!r}, "-o", "3", "--binary", path, "-q"]) == 0
        reader = NGramModel.load(path)
        before = reader.score("the shared model")
        assert main(["ngram", "build", {str(TEST)!r}, "-o", "2", "--binary", path, "--arpa", arpa, "-q"]) == 0
        assert reader.score("the shared model") == before and reader.order == 3
        assert NGramModel.load(path).order == 2
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def big_corpus(path: Path, lines=100_000, words=12, vocab=20_000):
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, size=(lines, words)) % vocab  # Zipfian, as words are
    path.write_text("\n".join(" ".join(f"w{i}" for i in row) for row in ids) + "\n")
    return path


def test_a_writer_killed_during_arpa_output_leaves_the_old_file(tmp_path):
    corpus = big_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "out" / "model.arpa"
    out.parent.mkdir()
    out.write_text("the previous model\n")
    proc = run_python(f"""
        from mmfuse.cli import main
        main(["ngram", "build", {str(corpus)!r}, "-o", "3", "--arpa", {str(out)!r}, "-q"])
    """, wait=False)
    deadline, killed = time.time() + 300, False
    try:
        while time.time() < deadline and proc.poll() is None:
            names = [p for p in out.parent.iterdir() if p != out]
            if any(p.stat().st_size > 0 for p in names) or out.read_bytes() != b"the previous model\n":
                proc.send_signal(signal.SIGKILL)  # mid-write: the ARPA output has started
                killed = True
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert killed, "the writer finished before any output appeared beside the model: " + proc.stderr.read()[-2000:]
    assert out.read_text() == "the previous model\n"


@pytest.mark.parametrize("what", ["arpa", "binary", "spill"])
def test_a_full_disk_is_one_clean_error_and_keeps_the_old_file(tmp_path, what):
    """RLIMIT_FSIZE makes writes past 256 KiB fail with EFBIG, as a full disk fails them with ENOSPC."""
    out = tmp_path / f"model.{'bin' if what == 'binary' else 'arpa'}"
    out.write_text("the previous model\n")
    spill = tmp_path / "spill"
    spill.mkdir()
    argv = ["ngram", "build", str(TRAIN), "-o", "4", "-q"]
    argv += ["--binary" if what == "binary" else "--arpa", str(out)]
    if what == "spill":  # a tiny budget spills sorted runs, bigger than the limit, to -T
        argv = ["ngram", "build", str(big_corpus(tmp_path / "c.txt", lines=60_000)), "-o", "3", "-q",
                "--arpa", str(out), "-S", "1M", "-T", str(spill)]
    r = run_python(f"""
        import sys
        from mmfuse.cli import main
        sys.exit(main({argv!r}))
    """, limits={resource.RLIMIT_FSIZE: 256 << 10}, ignore_sigxfsz=True)
    assert_one_line_error(r.returncode, r.stderr, "spill" if what == "spill" else out)
    assert out.read_text() == "the previous model\n"
    assert temp_leftovers(tmp_path) == [] and list(spill.iterdir()) == []


def test_a_writer_killed_by_the_file_size_limit_leaves_the_old_file(tmp_path):
    """SIGXFSZ (not ignored) kills the writer in the middle of the file, deterministically."""
    out = tmp_path / "model.arpa"
    out.write_text("the previous model\n")
    r = run_python(f"""
        import signal
        from mmfuse.ngram import NGramModel
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it by default
        NGramModel.build({str(TRAIN)!r}, 4).save({str(out)!r}, "arpa")
    """, limits={resource.RLIMIT_FSIZE: 256 << 10})
    assert r.returncode == -signal.SIGXFSZ, (r.returncode, r.stderr[-2000:])
    assert out.read_text() == "the previous model\n"


def test_streams_and_unwritable_places(tmp_path):
    model = NGramModel.build(TRAIN, 2)
    with pytest.raises(OutputError, match="/dev/full"):  # a device is written in place, as a stream
        model.save("/dev/full", "arpa")
    model.save("/dev/null", "binary")
    assert Path("/dev/null").is_char_device()
    with pytest.raises(OutputError, match="no-such-dir"):
        model.save(tmp_path / "no-such-dir" / "m.bin")
    with pytest.raises(OutputError, match="directory"):
        model.save(tmp_path, "arpa")
    rc, err = cli("ngram", "build", TRAIN, "-o", "2", "--arpa", tmp_path / "no-such-dir" / "m.arpa")
    assert_one_line_error(rc, err, "no-such-dir")


# ---- threads ----

def test_thread_counts_are_bounded_and_named():
    for bad in (0, 100_000, 2.5, "4", True):
        with pytest.raises(NGramError, match=r"threads \(--threads\)"):
            NGramModel.build(["a b c"], 2, threads=bad)
    with pytest.raises(NGramError, match="threads"):
        _ngram.Builder(3, 1 << 20, "/tmp", 100_000, False, False)
    rc, err = cli("ngram", "build", TRAIN, "-o", "2", "--arpa", "/dev/null", "--threads", "5000")
    assert_one_line_error(rc, err, "--threads")


@pytest.mark.skipif(SANITIZED, reason="an address-space limit cannot hold AddressSanitizer's shadow memory")
def test_refused_threads_are_an_error_not_a_hang():
    """An address-space limit makes thread creation fail after a few threads (8 MiB stacks): the
    builder must stop the threads it started and raise, not wait for the others forever."""
    r = run_python("""
        import resource
        from mmfuse import _ngram
        from mmfuse.errors import ResourceError
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (96 << 20), vm + (96 << 20)))
        try:
            _ngram.Builder(3, 1 << 20, "/tmp", 256, False, False)
        except ResourceError as e:
            print("refused:", e)
    """, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("refused:") and "--threads" in r.stdout, r.stdout + r.stderr[-2000:]


def test_a_builder_refuses_a_second_thread():
    builder = _ngram.Builder(3, 64 << 20, "/tmp", 2, False, False)
    started, errors = threading.Event(), []
    text = ("a b c d e f g\n" * 400_000).encode()

    def feed():
        started.set()
        try:
            builder.add_text(text)
        except NGramError as e:
            errors.append(e)

    worker = threading.Thread(target=feed)
    worker.start()
    started.wait()
    refused = fed = 0
    while worker.is_alive():  # add_text releases the GIL while it counts
        try:
            builder.add_text(b"x y\n")
            fed += 1
        except NGramError as e:
            assert "another thread" in str(e)
            refused += 1
            break
    worker.join()
    assert refused == 1 and errors == []
    assert builder.lines == 400_000 + fed
    model = builder.finish([0], True, [0.5, 1.0, 1.5], False, "", True)
    assert model.counts[0] == 3 + 7 + (2 if fed else 0)


# ---- one rule for words and lines ----

SPACES = ["\u00a0", "\u2003", "\u3000", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028"]


def test_words_split_on_kenlm_spaces_on_both_sides():
    core = NGramModel.build(["x y"], 1, discount_fallback=(0.5, 1, 1.5))._core
    for code in range(1, 256):
        s = f"x{chr(code)}y"
        assert len(split_words(s)) == len(core.encode(s.encode())), repr(chr(code))
    model = NGramModel.build([f"a{sp}b c" for sp in SPACES] + ["a b c"], 2, discount_fallback=(0.5, 1, 1.5))
    for sp in SPACES:
        sentence = f"a{sp}b c a b"
        scores = model.full_scores(sentence)
        assert [t.word for t in scores] == [f"a{sp}b", "c", "a", "b", "</s>"], repr(sp)
        assert not scores[0].oov and scores[2].oov is False
        assert sum(t.log10 for t in scores) == pytest.approx(model.score(sentence), abs=1e-4)
        assert model.perplexity(sentence) == pytest.approx(10 ** (-model.score(sentence) / 5))


def test_words_split_like_the_kenlm_module(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    model = NGramModel.build([f"a{sp}b c d" for sp in SPACES] + ["a b c"], 3, discount_fallback=(0.5, 1, 1.5))
    model.save(tmp_path / "m.arpa", "arpa")
    ref = kenlm.Model(str(tmp_path / "m.arpa"))
    for sp in SPACES:
        sentence = f"c a{sp}b  a\tb\x0bc"
        ours, theirs = model.full_scores(sentence), list(ref.full_scores(sentence))
        assert len(ours) == len(theirs)
        for t, (p, n, oov) in zip(ours, theirs):
            assert (t.ngram_length, t.oov) == (n, oov) and t.log10 == pytest.approx(p, abs=1e-5)
        assert model.perplexity(sentence) == pytest.approx(ref.perplexity(sentence), rel=1e-5)


def test_query_command_splits_like_the_model(tmp_path, capsys):
    model = NGramModel.build(["a\u00a0b c", "a b c"], 2, discount_fallback=(0.5, 1, 1.5))
    model.save(tmp_path / "m.bin")
    (tmp_path / "q.txt").write_text("a\u00a0b c\n")
    from mmfuse.cli import main

    assert main(["ngram", "query", str(tmp_path / "m.bin"), str(tmp_path / "q.txt")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    word = "a\u00a0b"
    assert first.startswith(f"{word}={model.index(word)} ") and "OOV: 0" in first


def test_a_lone_cr_is_a_space_in_every_source(tmp_path, monkeypatch, capsys):
    text = "a b\rc d\r\ne f\n\rg\nh\x85i\u2028j\n"
    plain = tmp_path / "c.txt"
    plain.write_bytes(text.encode())
    sources = {"plain": plain, "list": text.split("\n")[:-1]}
    for ext, opener in ((".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)):
        with opener(tmp_path / f"c{ext}", "wb") as f:
            f.write(text.encode())
        sources[ext] = tmp_path / f"c{ext}"
    with open(plain, encoding="utf-8", newline="\n") as f:
        sources["file object"] = list(f)
    summaries = {name: NGramModel.build(src, 2, discount_fallback=(0.5, 1, 1.5)).summary for name, src in sources.items()}
    for name, s in summaries.items():
        assert (s["lines"], s["tokens"]) == (4, 8), name  # lines end at '\n' only; \r is a space
    model = NGramModel.build(plain, 2, discount_fallback=(0.5, 1, 1.5))
    for src in (plain, sources[".gz"], text.split("\n")[:-1]):
        p = model.corpus_perplexity(src)
        assert (p.sentences, p.tokens) == (4, 12)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    from mmfuse.cli import main

    model.save(tmp_path / "m.bin")
    capsys.readouterr()
    assert main(["ngram", "query", str(tmp_path / "m.bin"), "--summary-only"]) == 0
    assert "Tokens:\t12" in capsys.readouterr().out


# ---- impossible values ----

ARPA = """\\data\\
ngram 1=4
ngram 2=2

\\1-grams:
{p}\t<unk>\t0
-99\t<s>\t{b}
-0.5\t</s>
-0.7\ta\t-0.2

\\2-grams:
-0.2\t<s> a
-0.3\ta </s>

\\end\\
"""


@pytest.mark.parametrize("p,b,what", [("0.5", "-0.3", "positive log10 probability"),
                                      ("inf", "-0.3", "positive log10 probability"),
                                      ("+inf", "-0.3", "positive log10 probability"),
                                      ("-1", "inf", "infinite backoff"),
                                      ("-1", "nan", "bad backoff"), ("nan", "-0.3", "bad probability")])
def test_impossible_arpa_values_are_refused_with_the_line(p, b, what, tmp_path):
    path = tmp_path / "bad.arpa"
    path.write_text(ARPA.format(p=p, b=b))
    with pytest.raises(NGramError, match=f"ARPA line {6 if b == '-0.3' else 7}: {what}"):
        NGramModel.load(path)
    rc, err = cli("ngram", "perplexity", path, TEST)
    assert_one_line_error(rc, err, "bad.arpa", "line")


def test_possible_extreme_arpa_values_still_load():
    m = NGramModel(_ngram.Model.read_arpa_bytes(ARPA.format(p="-inf", b="1.5").encode()))
    assert m.score_word(m.null_state(), "<unk>")[0] == -np.inf


@pytest.mark.parametrize("fallback", [(float("nan"),), (-0.5, 1, 1.5), (1.5, 1, 1.5), (0.5, 2.5, 1.5),
                                      (0.5, 1, 3.5), (0.5, 1, float("inf")), (0.5, "1", 1.5), (), (1, 1, 1, 1)])
def test_impossible_fallback_discounts_are_refused(fallback):
    with pytest.raises(NGramError, match=r"--discount-fallback"):
        NGramModel.build(["a b", "a c"], 2, discount_fallback=fallback)


def test_fallback_checked_in_cpp_and_cli():
    b = _ngram.Builder(2, 1 << 20, "/tmp", 1, False, False)
    b.add_text(b"a b\na c\n")
    with pytest.raises(NGramError, match="--discount-fallback"):
        b.finish([0], True, [float("nan")], False, "", True)
    rc, err = cli("ngram", "build", TRAIN, "-o", "2", "--arpa", "/dev/null", "--discount-fallback", "nan")
    assert_one_line_error(rc, err, "--discount-fallback")
    m = NGramModel.build(["a b", "a c"], 2, discount_fallback=(1.0, 2.0, 3.0))  # the limits themselves are fine
    assert all(p <= 0 for p in m.distribution(m.begin_state()) if np.isfinite(p))


# ---- id maps sized by the vocabulary ----

def test_numeric_words_do_not_size_the_id_map(tmp_path):
    r = run_python("""
        import resource
        import numpy as np
        from mmfuse.ngram import NGramModel
        lines = ["9223372036854775807 1000000000 12", "12 9223372036854775807 7", "7 1000000000"]
        m = NGramModel.build(lines, 3, discount_fallback=(0.5, 1, 1.5))
        assert m.is_token_model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ids, probs = m.continuations([12], 3)
        assert set(ids.tolist()) <= {9223372036854775807, 1000000000, 12, 7, -1}
        assert m.score_ids([9223372036854775807, 1000000000])[0].shape == (3,)
        t = NGramModel.build(np.array([[2**62, 5, 2**62, 9]]), 2, discount_fallback=(0.5, 1, 1.5))
        assert t.continuations([2**62], 2)[0].size == 2
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown < 64, grown
        print("ok")
    """, limits={} if SANITIZED else {resource.RLIMIT_AS: 8 << 30})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ---- typed errors ----

@pytest.mark.parametrize("ext,opener", [(".gz", gzip.open), (".xz", lzma.open), (".bz2", bz2.open)])
def test_truncated_compressed_files_are_named(tmp_path, ext, opener):
    model = NGramModel.build(TRAIN, 2)
    model.save(tmp_path / "m.arpa", "arpa")
    with opener(tmp_path / f"full{ext}", "wb") as f:
        f.write((tmp_path / "m.arpa").read_bytes())
    data = (tmp_path / f"full{ext}").read_bytes()
    bad = tmp_path / f"m.arpa{ext}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(NGramError, match=f"m.arpa{ext}"):
        NGramModel.load(bad)
    rc, err = cli("ngram", "perplexity", bad, TEST)
    assert_one_line_error(rc, err, bad)
    corpus = tmp_path / f"corpus{ext}"
    with opener(tmp_path / f"c-full{ext}", "wb") as f:
        f.write(TRAIN.read_bytes())
    data = (tmp_path / f"c-full{ext}").read_bytes()
    corpus.write_bytes(data[: len(data) // 2])
    rc, err = cli("ngram", "build", corpus, "-o", "2", "--arpa", tmp_path / "o.arpa")
    assert_one_line_error(rc, err, corpus)
    assert not (tmp_path / "o.arpa").exists() and temp_leftovers(tmp_path) == []


def test_bad_sizes_and_places_are_typed_errors(tmp_path):
    for memory in (float("inf"), float("nan"), -1, 0.5, "1G", 2.0 ** 70):
        with pytest.raises(NGramError, match=r"memory_mb \(-S\)"):
            NGramModel.build(["a b"], 2, memory_mb=memory)
    for order in (0, 99, 2.0, "3"):
        with pytest.raises(NGramError, match=r"order \(-o\)"):
            NGramModel.build(["a b"], order)
    with pytest.raises(NGramError, match="--prune"):
        NGramModel.build(["a b"], 2, prune=(0, -1))
    (tmp_path / "file").write_text("")
    for tmp in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(OutputError, match=r"-T"):
            NGramModel.build(["a b"], 2, tmp_dir=tmp)
        rc, err = cli("ngram", "build", TRAIN, "-o", "2", "--arpa", tmp_path / "o.arpa", "-T", tmp)
        assert_one_line_error(rc, err, tmp, "-T")
    rc, err = cli("ngram", "build", TRAIN, "-o", "2", "--arpa", tmp_path / "o.arpa", "--memory=-5G")
    assert_one_line_error(rc, err, "-S")
    rc, err = cli("ngram", "build", TRAIN, "-o", "2", "--arpa", tmp_path / "o.arpa", "-S", "inf")
    assert_one_line_error(rc, err, "-S")


def test_huge_arpa_header_counts_are_named():
    text = ARPA.format(p="-1", b="-0.3").replace("ngram 1=4", "ngram 1=999999999999")
    with pytest.raises(NGramError, match="ARPA line 2: 'ngram 1=999999999999'"):
        _ngram.Model.read_arpa_bytes(text.encode())


def test_cpp_errors_are_mmfuse_errors():
    assert issubclass(_ngram.InputError, MMFuseError) and issubclass(_ngram.InputError, ValueError)
    with pytest.raises(NGramError, match="ARPA line 1"):
        _ngram.Model.read_arpa_bytes(b"not an arpa file")
