"""The numpy sampler (torch-free engine) against the torch sampler on the same logits."""
import numpy as np
import pytest
import torch

from mmfuse.generation.params import SamplingParams
from mmfuse.generation.sampling import Sampler
from mmfuse.generation.sampling_np import NumpySampler

V = 97
ROWS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.6, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=0.8, frequency_penalty=-0.4),
    SamplingParams(temperature=1.1, min_new_tokens=3, stop_token_ids=(4, 9)),
    SamplingParams(temperature=0.5, top_k=1),
]


@pytest.mark.parametrize("seed", range(4))
def test_same_tokens_on_same_logits_and_uniforms(seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, V, int(rng.integers(1, 9))).tolist() for _ in ROWS]
    ours = NumpySampler(ROWS, V, prompts)
    ref = Sampler(ROWS, V, "cpu", prompts)
    for step in range(12):
        logits = (rng.standard_normal((len(ROWS), V)) * 3).astype(np.float32)
        logits[:, :3] = logits[:, 3:4]  # exact ties
        u = rng.random(sum(not p.greedy for p in ROWS)).astype(np.float32)
        ours.uniforms = lambda u=u: u
        ref.uniforms = lambda u=u: torch.from_numpy(u)
        np.testing.assert_allclose(ours.process(logits, step), ref.process(torch.from_numpy(logits), step).numpy(),
                                   rtol=1e-6, atol=1e-6)
        a, _ = ours.sample(logits, step)
        b, _ = ref.sample(torch.from_numpy(logits), step)
        assert a.tolist() == b.tolist()
        ours.update(a)
        ref.update(b)


def test_greedy_and_logprobs_identical():
    rng = np.random.default_rng(9)
    params = [SamplingParams(temperature=0.0, logprobs=True)] * 5
    ours, ref = NumpySampler(params, V, [[1]] * 5), Sampler(params, V, "cpu", [[1]] * 5)
    for step in range(5):
        logits = (rng.standard_normal((5, V)) * 4).astype(np.float32)
        a, la = ours.sample(logits, step)
        b, lb = ref.sample(torch.from_numpy(logits), step)
        assert a.tolist() == b.tolist()
        np.testing.assert_allclose(la, lb.numpy(), atol=1e-5, rtol=0)


def test_seeded_draws_reproduce_and_rows_are_independent():
    p = SamplingParams(temperature=1.0, seed=3)
    logits = np.random.default_rng(0).standard_normal((1, V)).astype(np.float32)
    draw = lambda s: [int(s.sample(logits, i)[0][0]) for i in range(20)]  # noqa: E731
    alone = draw(NumpySampler([p], V, [[1]]))
    assert alone == draw(NumpySampler([p], V, [[1]]))
    both = NumpySampler([SamplingParams(temperature=1.0, seed=99), p], V, [[1], [2]])
    assert [int(both.sample(np.repeat(logits, 2, 0), i)[0][1]) for i in range(20)] == alone


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise_like_the_torch_sampler(bad):
    from mmfuse.errors import NumericalError

    logits = np.random.default_rng(0).standard_normal((3, 11)).astype(np.float32)
    logits[1, 4] = bad
    params = [SamplingParams(temperature=0.0)] * 3
    with pytest.raises(NumericalError, match=r"step 7: the logits of row\(s\) \[1\]"):
        NumpySampler(params, 11, [[1]] * 3).sample(logits, 7)
    with pytest.raises(NumericalError, match=r"step 7: the logits of row\(s\) \[1\]"):
        Sampler(params, 11, "cpu", [[1]] * 3).sample(torch.from_numpy(logits), 7)


@pytest.mark.parametrize("make", [lambda p, V, prompts: NumpySampler(p, V, prompts),
                                  lambda p, V, prompts: Sampler(p, V, "cpu", prompts)], ids=["numpy", "torch"])
def test_plain_greedy_path_chooses_what_processing_would(make):
    """All-greedy batches without penalties take the raw argmax (no processed copy) once no stop id is
    suppressed; the tokens are those of the processing path, ties and min_new_tokens included."""
    rng = np.random.default_rng()
    params = [SamplingParams(temperature=0.0, min_new_tokens=3, stop_token_ids=(4, 9)),
              SamplingParams(temperature=0.0, logprobs=True), SamplingParams(temperature=0.0, top_k=3, min_p=0.2)]
    s = make(params, V, [[1]] * 3)
    assert s.plain_from == 3
    wrap = (lambda a: a) if isinstance(s, NumpySampler) else torch.from_numpy
    for step in range(6):
        logits = (rng.standard_normal((3, V)) * 3).astype(np.float32)
        logits[:, 10:12] = logits.max() + 1  # an exact tie for second place: the first index wins
        logits[:, 4] = logits.max() + 1  # a stop id on top: suppressed for row 0 before step 3
        tokens, logprobs = s.sample(wrap(logits), step)
        expected = np.argmax(np.asarray(s.process(wrap(logits), step)), -1)
        assert list(tokens.tolist()) == expected.tolist()
        assert tokens.tolist() == [10 if step < 3 else 4, 4, 4]
        ref = logits[np.arange(3), np.asarray(tokens)] - np.log(np.exp(logits.astype(np.float64)).sum(-1))
        np.testing.assert_allclose(np.asarray(logprobs), ref, rtol=0, atol=1e-5)
    assert make([SamplingParams(temperature=0.0, repetition_penalty=1.2)], V, [[1]]).plain_from is None
    assert make([SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)], V, [[1]] * 2).plain_from is None


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_plain_greedy_path_refuses_non_finite_rows(kind, bad):
    from mmfuse.errors import NumericalError

    logits = np.random.default_rng().standard_normal((4, 11)).astype(np.float32)
    if bad == -float("inf"):
        logits[[1, 3]] = bad  # nothing finite to choose
    else:
        logits[[1, 3], [4, 0]] = bad
    params = [SamplingParams(temperature=0.0)] * 4
    s = NumpySampler(params, 11, [[1]] * 4) if kind == "numpy" else Sampler(params, 11, "cpu", [[1]] * 4)
    assert s.plain_from == 0
    with pytest.raises(NumericalError, match=r"step 2: the logits of row\(s\) \[1, 3\]"):
        s.sample(logits if kind == "numpy" else torch.from_numpy(logits), 2)
