"""Progress of `mmfuse ngram build` (issue 13) and the constants the C++ core shares with Python
(issue 14): C++ reports the bytes of a corpus file it has counted, Python draws a tqdm bar from them
(a percentage for files, a running total for stdin), silent with -q or off a terminal; Ctrl-C stops
the counting; the special words and the binary magic are the core's, not Python literals."""
from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mmfuse import _ngram
from mmfuse.cli import main
from mmfuse.ngram import EOS_TOKEN, UNK_TOKEN, NGramModel

NGRAM_PY = Path(__file__).resolve().parents[1] / "engine" / "ngram"


def corpus(path: Path, mbytes: float, trailing_newline: bool = True, seed: int = 0) -> Path:
    """Zipfian words, about `mbytes` MB: one block repeated (so builds need --discount_fallback)."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(f"w{z}" for z in rng.zipf(1.3, rng.integers(1, 20))) for _ in range(20_000)]
    block = "\n".join(lines) + "\n"
    text = block * max(1, int(mbytes * 1e6 / len(block)) + 1)
    path.write_text(text if trailing_newline else text[:-1])
    return path


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the bar is drawn."""

    def isatty(self) -> bool:
        return True


def build_cli(argv, monkeypatch, tty: bool = True, stdin: bytes | None = None) -> str:
    err = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert main([str(a) for a in argv]) == 0
    return err.getvalue()


@pytest.mark.parametrize("trailing_newline", [True, False])
def test_the_callback_sees_monotone_byte_counts_ending_at_the_file_size(tmp_path, trailing_newline):
    path = corpus(tmp_path / "c.txt", 2.5 * _ngram.PROGRESS_BYTES / 1e6, trailing_newline)
    size = path.stat().st_size
    builder = _ngram.Builder(2, 64 << 20, str(tmp_path), 1, False, False)
    calls = []
    builder.add_file(str(path), lambda consumed, total: calls.append((consumed, total)))
    consumed = [c for c, _ in calls]
    assert len(calls) >= 3, calls  # one per block of PROGRESS_BYTES, and the end
    assert all(t == size for _, t in calls)
    assert consumed == sorted(set(consumed)) and consumed[-1] == size
    assert all(b - a <= _ngram.PROGRESS_BYTES for a, b in zip([0] + consumed, consumed))
    assert builder.bytes == size
    with_bar = builder.finish([0], True, [0.5], False, "", True)
    plain = NGramModel.build(str(path), 2, discount_fallback=(0.5,))
    assert with_bar.counts == plain.counts


def test_an_exception_in_the_callback_stops_the_counting(tmp_path):
    path = corpus(tmp_path / "c.txt", 3 * _ngram.PROGRESS_BYTES / 1e6)
    builder = _ngram.Builder(2, 64 << 20, str(tmp_path), 2, False, False)
    calls = []

    def stop(consumed, total):
        calls.append(consumed)
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        builder.add_file(str(path), stop)
    assert len(calls) == 1 and builder.bytes < path.stat().st_size
    builder.add_text(b"a b c\n")  # the builder is free again, and usable


@pytest.mark.parametrize("with_callback", [True, False])
def test_ctrl_c_stops_the_counting(tmp_path, with_callback):
    """SIGINT while C++ counts (the GIL released): KeyboardInterrupt at the next block, with or
    without a Python callback, well before the end of the file. In a subprocess: the signal must
    not reach the test runner."""
    path = corpus(tmp_path / "c.txt", 40)
    code = textwrap.dedent(f"""
        import os, signal, threading
        from mmfuse import _ngram
        b = _ngram.Builder(3, 256 << 20, {str(tmp_path)!r}, 2, False, False)
        main = threading.main_thread().ident
        seen = []
        def progress(consumed, total):
            seen.append(consumed)
            if len(seen) == 1:
                signal.pthread_kill(main, signal.SIGINT)
        if {with_callback!r}:
            callback = progress
        else:
            callback = None
            threading.Timer(0.05, signal.pthread_kill, (main, signal.SIGINT)).start()
        try:
            b.add_file({str(path)!r}, callback)
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted", b.bytes < {path.stat().st_size}, len(seen))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[:2] == ["interrupted", "True"], r.stdout + r.stderr[-2000:]
    if with_callback:
        assert r.stdout.split()[2] == "1"


def test_the_bar_shows_a_percentage_for_files(tmp_path, monkeypatch):
    path = corpus(tmp_path / "c.txt", 2.5 * _ngram.PROGRESS_BYTES / 1e6)
    err = build_cli(["ngram", "build", path, "-o", "2", "--arpa", tmp_path / "m.arpa", "--discount_fallback"], monkeypatch)
    assert re.search(r"\rcounting: +\d+%\|", err) and "B/s" in err  # the bar, with a percentage
    assert err.rstrip().splitlines()[-1].startswith("built in")


def test_the_bar_has_no_total_for_stdin(tmp_path, monkeypatch):
    path = corpus(tmp_path / "c.txt", 0.2)
    err = build_cli(["ngram", "build", "-o", "2", "--arpa", tmp_path / "stdin.arpa"], monkeypatch,
                    stdin=path.read_bytes())
    assert "counting:" in err and "%|" not in err
    build_cli(["ngram", "build", path, "-o", "2", "--arpa", tmp_path / "file.arpa", "-q"], monkeypatch)
    assert (tmp_path / "stdin.arpa").read_bytes() == (tmp_path / "file.arpa").read_bytes()


def test_quiet_and_non_terminals_get_no_progress(tmp_path, monkeypatch, capfd):
    path = corpus(tmp_path / "c.txt", 2.5 * _ngram.PROGRESS_BYTES / 1e6)
    argv = ["ngram", "build", path, "-o", "2", "--arpa", tmp_path / "m.arpa", "--discount_fallback"]
    quiet = build_cli(argv + ["-q"], monkeypatch)
    off_terminal = build_cli(argv, monkeypatch, tty=False)
    for err in (quiet, off_terminal):  # the summary only (lmplz prints it too); no bar
        assert err.startswith("tokens ") and "counting" not in err and "%" not in err and "\r" not in err
    assert capfd.readouterr().err == ""  # nothing from the C++ core on file descriptor 2 either


def test_verbose_prints_the_stage_lines_of_the_core(tmp_path, capfd):
    NGramModel.build(["a b c", "a b d"], 2, discount_fallback=(0.5,), verbose=True)
    err = capfd.readouterr().err
    assert "[mmfuse.ngram] counts merged" in err and "[mmfuse.ngram] estimated" in err
    NGramModel.build(["a b c", "a b d"], 2, discount_fallback=(0.5,))
    assert capfd.readouterr().err == ""


def test_special_words_and_magic_come_from_the_core(tmp_path):
    assert (_ngram.UNK, _ngram.BOS, _ngram.EOS) == (0, 1, 2)  # KenLM's ids
    assert (EOS_TOKEN, UNK_TOKEN) == (_ngram.EOS_TOKEN, _ngram.UNK_TOKEN)
    model = NGramModel.build(["a b c", "a b d"], 2, discount_fallback=(0.5,))
    assert model.vocab()[:3] == [_ngram.UNK_WORD, _ngram.BOS_WORD, _ngram.EOS_WORD]
    assert model.full_scores("a zzz")[-1].word == _ngram.EOS_WORD
    model.save(tmp_path / "m.bin")
    head = (tmp_path / "m.bin").read_bytes()[:12]
    assert head[:8] == _ngram.BINARY_MAGIC and int.from_bytes(head[8:], "little") == _ngram.BINARY_VERSION
    tokens = NGramModel.build(np.array([[5, 6, 7], [5, 6, 8]]), 2, discount_fallback=(0.5,))
    ids, _ = tokens.greedy([5, 6, 7], 3)
    assert ids[-1] == EOS_TOKEN


def test_python_repeats_no_special_word_or_magic():
    """The n-gram Python files take `<s>`, `</s>`, `<unk>` and the binary magic from _ngram."""
    banned = {"<s>", "</s>", "<unk>", b"MMFNGRM1", "MMFNGRM1"}
    for path in NGRAM_PY.glob("*.py"):
        found = [(n.lineno, n.value) for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Constant) and n.value in banned]
        assert not found, f"{path.name}: {found}"
