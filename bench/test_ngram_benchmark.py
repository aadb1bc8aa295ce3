"""pytest-benchmark view of the n-gram LM: `python -m pytest bench/test_ngram_benchmark.py --benchmark-enable`.

Building order 5 on the KenLM reference training text (tests/data/kenlm), and scoring its held-out
text with mmfuse (strings, id batches) and with the `kenlm` module on the same ARPA file."""
from pathlib import Path

import numpy as np
import pytest

from mmfuse.ngram import NGramModel, build_arpa

DATA = Path(__file__).parent.parent / "tests" / "data" / "kenlm"


@pytest.fixture(scope="module")
def arpa(tmp_path_factory):
    path = tmp_path_factory.mktemp("ngram") / "o5.arpa"
    build_arpa(DATA / "train.txt", path, 5)
    return path


@pytest.fixture(scope="module")
def sentences():
    return (DATA / "test.txt").read_text().splitlines()


def test_build_order5_arpa(benchmark, tmp_path):
    benchmark(build_arpa, DATA / "train.txt", tmp_path / "o5.arpa", 5)


def test_score_strings_mmfuse(benchmark, arpa, sentences):
    model = NGramModel.load(arpa)
    benchmark(lambda: [model.score(s) for s in sentences])


def test_score_id_batch_mmfuse(benchmark, arpa, sentences):
    model = NGramModel.load(arpa)
    ids = [model._core.encode(s) for s in sentences]
    lengths = np.array([len(i) for i in ids])
    batch = np.zeros((len(ids), lengths.max()), dtype=np.int32)
    for i, row in enumerate(ids):
        batch[i, : len(row)] = row
    benchmark(model.score_batch, batch, lengths)


def test_score_strings_kenlm(benchmark, arpa, sentences):
    kenlm = pytest.importorskip("kenlm")
    model = kenlm.Model(str(arpa))
    benchmark(lambda: [model.score(s) for s in sentences])
