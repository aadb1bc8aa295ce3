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
