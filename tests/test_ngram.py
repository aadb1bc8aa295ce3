"""N-gram LM: exactness against KenLM's lmplz reference models and perplexities (tests/data/kenlm,
see its README), the kenlm module reading our ARPA, file formats and the query API."""
import lzma
import os
from pathlib import Path

import numpy as np
import pytest

from mmfuse.ngram import EOS_TOKEN, NGramModel, build_arpa

DATA = Path(__file__).parent / "data" / "kenlm"
TRAIN, TEST = DATA / "train.txt", DATA / "test.txt"

# From tests/data/kenlm/README.md (lmplz's printed discounts, KenLM query's perplexities).
REF_DISCOUNTS = {
    3: [(0.702836, 0.939095, 1.47535), (0.823522, 1.18123, 1.62208), (0.819212, 1.49091, 1.49265)],
    5: [(0.702836, 0.939095, 1.47535), (0.823522, 1.18123, 1.62208), (0.909672, 1.42455, 1.71359),
        (0.951279, 1.65224, 1.55043), (0.89238, 1.73393, 1.42057)],
}
REF_PPL = {3: (720.4357632389672, 225.3614065320765), 5: (706.1023372132421, 221.81835035384344)}
REF_FIRST_LINES = {3: (-14.068464, -44.060165, -24.234142), 5: (-14.045069, -43.99373, -24.048279)}


def read_arpa(text: str) -> dict:
    """{(order, 'w1 ... wn'): (log10 p, log10 backoff)} of an ARPA text (a plain reference parser)."""
    out, order = {}, None
    for line in text.splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1:].split("-")[0])
        elif order and line.strip() and not line.startswith("\\"):
            f = line.split("\t")
            out[(order, f[1])] = (float(f[0]), float(f[2]) if len(f) > 2 else 0.0)
    return out


@pytest.fixture(scope="module", params=[3, 5])
def built(request, tmp_path_factory):
    order = request.param
    model = NGramModel.build(TRAIN, order)
    arpa = tmp_path_factory.mktemp("ngram") / f"o{order}.arpa"
    model.save(arpa, "arpa")
    return order, model, arpa


def test_same_ngrams_probabilities_backoffs_as_lmplz(built):
    order, model, arpa = built
    ref = read_arpa(lzma.open(DATA / f"train.o{order}.arpa.xz", "rt").read())
    ours = read_arpa(arpa.read_text())
    assert set(ours) == set(ref)
    p_ref, p_ours = np.array([ref[k] for k in ref]), np.array([ours[k] for k in ref])
    np.testing.assert_allclose(p_ours, p_ref, atol=1e-5, rtol=0)
    assert model.counts == [sum(1 for k in ref if k[0] == n) for n in range(1, order + 1)]


@pytest.mark.parametrize("order", [3, 5])
def test_direct_arpa_is_byte_identical_to_lmplz(order, tmp_path):
    summary = build_arpa(TRAIN, tmp_path / "direct.arpa", order)
    assert (tmp_path / "direct.arpa").read_bytes() == lzma.open(DATA / f"train.o{order}.arpa.xz").read()
    assert summary["tokens"] == 24814 and summary["types"] == 4654


def test_same_discounts_as_lmplz(built):
    order, model, _ = built
    np.testing.assert_allclose(np.array(model.discounts), np.array(REF_DISCOUNTS[order]), rtol=1e-5)


def test_arpa_layout_like_lmplz(built):
    order, _, arpa = built
    lines = arpa.read_text().splitlines()
    assert lines[:order + 3] == ["\\data\\"] + [f"ngram {n}={c}" for n, c in
                                                 enumerate(NGramModel.load(arpa).counts, 1)] + ["", "\\1-grams:"]
    # <unk> first, <s> with probability 1 (log10 0) and only ever a context, as in lmplz's files.
    unk, bos, eos = (line.split("\t") for line in lines[order + 3:order + 6])
    assert (unk[1], bos[1], eos[1]) == ("<unk>", "<s>", "</s>") and bos[0] == "0" and eos[2] == "0"
    assert lines[-2:] == ["", "\\end\\"]


def test_same_perplexities_as_kenlm_query(built):
    order, model, _ = built
    ppl = model.corpus_perplexity(TEST)
    assert ppl.tokens == 5599 + 300
    assert ppl.including_oovs == pytest.approx(REF_PPL[order][0], rel=1e-9)
    assert ppl.excluding_oovs == pytest.approx(REF_PPL[order][1], rel=1e-9)
    first = TEST.read_text().splitlines()[:3]
    np.testing.assert_allclose([model.score(s) for s in first], REF_FIRST_LINES[order], atol=2e-6)


def test_reference_arpa_loads_and_scores_like_kenlm(built):
    order, model, _ = built
    ref = NGramModel.load(DATA / f"train.o{order}.arpa.xz")  # read through lzma
    assert ref.counts == model.counts
    ppl = ref.corpus_perplexity(TEST)
    assert (ppl.including_oovs, ppl.excluding_oovs) == pytest.approx(REF_PPL[order], rel=1e-9)


def test_kenlm_module_reads_our_arpa_and_agrees(built):
    kenlm = pytest.importorskip("kenlm")
    order, model, arpa = built
    ref = kenlm.Model(str(arpa))
    assert ref.order == order
    lines = TEST.read_text().splitlines()
    for bos, eos in [(True, True), (False, False), (True, False)]:
        ours = np.array([model.score(s, bos=bos, eos=eos) for s in lines])
        theirs = np.array([ref.score(s, bos=bos, eos=eos) for s in lines])
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
    for s in lines[:50]:
        theirs = list(ref.full_scores(s))
        ours = model.full_scores(s)
        assert [(t.ngram_length, t.oov) for t in ours] == [(n, o) for _, n, o in theirs]
        np.testing.assert_allclose([t.log10 for t in ours], [p for p, _, _ in theirs], atol=1e-6)
        assert model.perplexity(s) == pytest.approx(ref.perplexity(s), rel=1e-5)


def test_binary_round_trip_and_arpa_rewrite(built, tmp_path):
    order, model, arpa = built
    model.save(tmp_path / "m.bin")
    loaded = NGramModel.load(tmp_path / "m.bin")
    assert loaded.counts == model.counts and loaded.order == order
    np.testing.assert_allclose(np.array(loaded.discounts), np.array(model.discounts))
    lines = TEST.read_text().splitlines()
    assert [loaded.score(s) for s in lines] == [model.score(s) for s in lines]
    loaded.save(tmp_path / "again.arpa", "arpa")
    assert (tmp_path / "again.arpa").read_bytes() == arpa.read_bytes()
    reread = NGramModel.load(arpa)
    reread.save(tmp_path / "reread.arpa", "arpa")
    assert read_arpa((tmp_path / "reread.arpa").read_text()) == read_arpa(arpa.read_text())


def test_state_api_and_batches_match_sentence_scores(built):
    order, model, _ = built
    lines = TEST.read_text().splitlines()[:40]
    for s in lines[:10]:
        state, total = model.begin_state(), np.float32(0)
        for w in s.split() + ["</s>"]:
            p, n, state = model.score_word(state, w)
            assert 1 <= n <= order
            total = np.float32(total + np.float32(p))
        assert float(total) == model.score(s)
        probs, lens = model.score_ids(model._core.encode(s))
        assert [t.log10 for t in model.full_scores(s)] == list(probs)
        assert [t.ngram_length for t in model.full_scores(s)] == list(lens)
    ids = [model._core.encode(s) for s in lines]
    np.testing.assert_array_equal(model.score_batch(ids), [model.score(s) for s in lines])
    every = TEST.read_text().splitlines()  # enough rows for both threads to take a share
    every_ids = [model._core.encode(s) for s in every]
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(model.score_batch(every_ids, threads=threads), [model.score(s) for s in every])
    width = max(len(i) for i in ids) + 3
    padded = np.full((len(ids), width), -7, dtype=np.int64)  # padding must be ignored
    for i, row in enumerate(ids):
        padded[i, : len(row)] = row
    np.testing.assert_array_equal(model.score_batch(padded, [len(i) for i in ids], bos=False, eos=False),
                                  [model.score(s, bos=False, eos=False) for s in lines])


def test_continuations_are_the_top_of_the_full_distribution(built):
    order, model, _ = built
    rng = np.random.default_rng(0)
    lines = TRAIN.read_text().splitlines()
    for trial in range(25):
        words = lines[rng.integers(len(lines))].split()
        ctx = model._core.encode(" ".join(words[: rng.integers(0, len(words) + 1)]))
        bos = bool(trial % 2)
        dist = model.distribution(model.state_after(ctx, bos=bos))
        ids, probs = model.continuations(ctx, 7, bos=bos)
        assert len(ids) == 7 and 1 not in ids
        np.testing.assert_allclose(probs, np.sort(dist)[::-1][:7], rtol=0, atol=1e-6)
        np.testing.assert_allclose(dist[ids], probs, atol=1e-6)
        state = model.state_after(ctx, bos=bos)
        for i, p in zip(ids, probs):
            assert model.score_word(state, int(i))[0] == pytest.approx(p, abs=1e-6)
        greedy, gp = model.greedy(ctx, 4, bos=bos)
        assert greedy[0] == ids[0] and gp[0] == probs[0]


def test_sampling_is_seeded_and_follows_the_model(built):
    _, model, _ = built
    a = model.sample(max_words=30, seed=3)
    assert a == model.sample(max_words=30, seed=3)
    assert len(a) <= 30 and all(w in model for w in a)
    assert a[-1] == "</s>" or len(a) == 30
    # Frequent first words are drawn about as often as the model says.
    draws = [model.sample(max_words=1, seed=s)[0] for s in range(400)]
    p_the = 10 ** model.score_word(model.begin_state(), "the")[0]
    assert abs(draws.count("the") / 400 - p_the) < 4 * np.sqrt(p_the * (1 - p_the) / 400) + 1e-3


def test_token_id_models_match_text_models(tmp_path):
    rng = np.random.default_rng(1)
    seqs = [rng.zipf(1.6, size=rng.integers(1, 30)).astype(np.int32) + 100 for _ in range(400)]
    ids_model = NGramModel.build(seqs, 4, discount_fallback=(0.5, 1.0, 1.5))
    text = tmp_path / "ids.txt"
    text.write_text("".join(" ".join(map(str, s)) + "\n" for s in seqs))
    text_model = NGramModel.build(text, 4, discount_fallback=(0.5, 1.0, 1.5))
    assert ids_model.is_token_model and ids_model.counts == text_model.counts
    for s in seqs[:30]:
        assert ids_model.score_batch([s])[0] == text_model.score(" ".join(map(str, s)))
    ctx = seqs[0][:3]
    toks, probs = ids_model.continuations(ctx, 5)
    # A text model whose words are all integers is a token model too: ids in, ids out.
    assert text_model.is_token_model
    same_toks, same_probs = text_model.continuations(ctx, 5)
    np.testing.assert_array_equal(probs, same_probs)
    np.testing.assert_array_equal(toks, same_toks)
    state = text_model._core.state_after(text_model._core.encode(" ".join(map(str, ctx))), False)
    words, word_probs = text_model._core.top_k(state, 5)
    np.testing.assert_array_equal(probs, word_probs)
    assert list(toks) == [EOS_TOKEN if text_model.word(w) == "</s>" else int(text_model.word(w)) for w in words]
    draft, _ = ids_model.greedy(seqs[5][:6], 8)
    assert len(draft) >= 1 and all(t == EOS_TOKEN or t >= 100 for t in draft)
    assert ids_model.score_batch(np.stack([seqs[0][:1], seqs[1][:1]])).shape == (2,)


def test_spilling_to_disk_and_thread_count_do_not_change_the_model(tmp_path):
    rng = np.random.default_rng(2)
    vocab = np.array([f"w{i}" for i in range(3000)])
    lines = [" ".join(vocab[rng.zipf(1.3, size=rng.integers(3, 25)) % 3000]) for _ in range(25000)]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(lines) + "\n")
    fb = dict(discount_fallback=(0.5, 1.0, 1.5))  # no singleton unigrams in this corpus
    ref = NGramModel.build(corpus, 5, threads=1, **fb)
    spilled = NGramModel.build(corpus, 5, memory_mb=2, tmp_dir=str(tmp_path), **fb)
    assert spilled.summary["spilled_runs"] > 0 and ref.summary["spilled_runs"] == 0
    ref.save(tmp_path / "a.arpa", "arpa")
    spilled.save(tmp_path / "b.arpa", "arpa")
    assert (tmp_path / "a.arpa").read_bytes() == (tmp_path / "b.arpa").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("mmfuse-ngram-")]  # spill files removed
    from_lines = NGramModel.build(iter(lines), 5, **fb)
    from_lines.save(tmp_path / "c.arpa", "arpa")
    assert (tmp_path / "c.arpa").read_bytes() == (tmp_path / "a.arpa").read_bytes()


def test_pruning_drops_rare_ngrams_and_keeps_a_distribution(tmp_path):
    model = NGramModel.build(TRAIN, 3, prune=(0, 1, 1))
    full = NGramModel.build(TRAIN, 3)
    assert model.counts[0] == full.counts[0] and all(a < b for a, b in zip(model.counts[1:], full.counts[1:]))
    model.save(tmp_path / "p.arpa", "arpa")
    grams = read_arpa((tmp_path / "p.arpa").read_text())
    occurrences = {}
    for line in TRAIN.read_text().splitlines():
        w = ["<s>"] + line.split() + ["</s>"]
        for n in (2, 3):
            for i in range(len(w) - n + 1):
                occurrences[" ".join(w[i:i + n])] = occurrences.get(" ".join(w[i:i + n]), 0) + 1
    assert all(occurrences[g] > 1 for (n, g) in grams if n > 1)
    for ctx in ["", "the", "of the", "<s>"]:
        state = model.state_after(model._core.encode(ctx), bos=ctx == "<s>") if ctx != "<s>" else model.begin_state()
        assert np.sum(10.0 ** model.distribution(state).astype(np.float64)) == pytest.approx(1.0, abs=1e-5)


def test_uninterpolated_unigrams_give_unk_the_mass():
    model = NGramModel.build(TRAIN, 2, interpolate_unigrams=False)
    total = np.sum(10.0 ** model.distribution(model.null_state()).astype(np.float64))
    assert total == pytest.approx(1.0, abs=1e-5)
    default = NGramModel.build(TRAIN, 2)
    assert model.score_word(model.null_state(), "<unk>")[0] > default.score_word(default.null_state(), "<unk>")[0]


def test_cli_build_query_perplexity(tmp_path, capsys):
    from mmfuse.cli import main

    arpa, binary = tmp_path / "m.arpa", tmp_path / "m.bin"
    assert main(["ngram", "build", str(TRAIN), "-o", "3", "--arpa", str(arpa), "--binary", str(binary), "-q"]) == 0
    err = capsys.readouterr().err
    assert "tokens 24,814" in err and "3-grams       20,194" in err and "D1 0.819212" in err
    assert main(["ngram", "perplexity", str(binary), str(TEST)]) == 0
    out = capsys.readouterr().out
    assert f"Perplexity including OOVs:\t{REF_PPL[3][0]:.10g}" in out and "Tokens:\t5899" in out
    assert main(["ngram", "query", str(arpa), str(TEST)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("Total: -14.06846 OOV: 0") and lines[0].startswith("shared=")
    assert main(["ngram", "build", str(tmp_path / "missing.txt"), "-o", "3", "--arpa", str(arpa)]) == 2
    assert "no such corpus file" in capsys.readouterr().err
