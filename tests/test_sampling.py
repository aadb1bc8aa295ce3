"""Sampling: parameter validation, filter invariants (property tests), penalties against a
plain-Python reference and against transformers' logits processors, seeded reproducibility,
batch-row independence, and the sampled frequencies of a small known distribution."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfuse.errors import SamplingParamsError
from mmfuse.generation.params import SamplingParams
from mmfuse.generation.sampling import (
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_k_top_p,
    apply_top_k_top_p_reference,
    apply_top_p,
    sample_inverse_cdf,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROPS = settings(max_examples=60, deadline=None)


def random_logits(seed, B, V, ties=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g, dtype=torch.float64) * 3
    if ties:  # coarse values so that many logits are equal
        x = torch.round(x)
    return x.to(dtype)


def toy_model(V, seed=0):
    """A deterministic stand-in for a decoder: next logits depend on the last token only."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2  # (V, V)
    return lambda last: table[last]  # (B,) -> (B, V)


def run(params, prompts, V, steps, device="cpu", model=None):
    """Generate `steps` tokens per row with a Sampler; returns (tokens (B, steps), logprobs)."""
    model = model or toy_model(V)
    sampler = Sampler(params, V, device, prompts)
    last = torch.tensor([p[-1] for p in prompts])
    out, lps = [], []
    for step in range(steps):
        tokens, lp = sampler.sample(model(last).to(device), step)
        sampler.update(tokens)
        out.append(tokens.cpu())
        lps.append(None if lp is None else lp.cpu())
        last = tokens.cpu()
    return torch.stack(out, 1), lps


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("min_new_tokens", -1),
        ("min_new_tokens", 65),  # > max_new_tokens=64
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", float("inf")),
        ("stop_token_ids", (1, -2)),
        ("stop_token_ids", 5),
        ("stop_strings", ("",)),
        ("seed", -1),
        ("seed", 2**64),
        ("logprobs", 1),
    ],
)
def test_validate_names_the_bad_field(field, value):
    params = SamplingParams(**{field: value})
    with pytest.raises(SamplingParamsError) as info:
        params.validate()
    assert isinstance(info.value, ValueError)
    assert f"SamplingParams.{field}={value!r}" in str(info.value)


def test_validate_accepts_defaults_and_edges():
    SamplingParams().validate()
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, min_new_tokens=64, seed=2**64 - 1,
                   stop_token_ids=(0, 7), stop_strings=("x",), presence_penalty=-2).validate()


def test_sampler_rejects_bad_inputs():
    with pytest.raises(SamplingParamsError, match="2 SamplingParams but 1 prompts"):
        Sampler([SamplingParams()] * 2, 10, "cpu", [[1]])
    with pytest.raises(SamplingParamsError, match="prompt 1: token id 10"):
        Sampler([SamplingParams()] * 2, 10, "cpu", [[1], [2, 10]])
    with pytest.raises(SamplingParamsError, match="id 12 >= vocab_size 10"):
        Sampler([SamplingParams(stop_token_ids=(12,))], 10, "cpu", [[1]])
    with pytest.raises(SamplingParamsError, match="temperature"):
        Sampler([SamplingParams(temperature=-1)], 10, "cpu", [[1]])
    sampler = Sampler([SamplingParams()], 10, "cpu", [[1]])
    with pytest.raises(ValueError, match=r"shape \(1, 11\), expected \(1, 10\)"):
        sampler.sample(torch.zeros(1, 11), 0)


# ---------------------------------------------------------------------------------------------
# pure filters: property tests of their invariants


@PROPS
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), V=st.integers(1, 70), k=st.integers(0, 75), ties=st.booleans())
def test_top_k_invariants(seed, B, V, k, ties):
    x = random_logits(seed, B, V, ties)
    out = apply_top_k(x, k)
    if k == 0 or k >= V:
        assert torch.equal(out, x)
        return
    for row_x, row_out in zip(x, out):
        kept = torch.isfinite(row_out)
        assert torch.equal(row_out[kept], row_x[kept])  # survivors untouched
        desc = row_x.sort(descending=True).values
        kth = desc[k - 1]
        assert torch.equal(kept, row_x >= kth)  # exactly the k largest, plus ties of the k-th
        if k < V and desc[k] < kth:
            assert int(kept.sum()) == k
        # the kept tokens keep their relative probabilities (the mass renormalises)
        p = row_x.double().softmax(-1)
        torch.testing.assert_close(row_out.double().softmax(-1)[kept], p[kept] / p[kept].sum())


def check_top_p_row(row_x, row_out, p):
    kept = torch.isfinite(row_out)
    assert kept.any()
    assert torch.equal(row_out[kept], row_x[kept])
    probs = row_x.double().softmax(-1)
    if (~kept).any():  # a prefix of the sorted distribution
        assert probs[kept].min() >= probs[~kept].max()
    mass = probs[kept].sum()
    assert mass >= p - 1e-5  # enough mass...
    assert mass - probs[kept].min() < p + 1e-5  # ...and the smallest such set


@PROPS
@given(seed=st.integers(0, 2**31), B=st.integers(1, 4), V=st.integers(1, 70), p=st.floats(0.01, 1.0),
       ties=st.booleans(), candidates=st.sampled_from([1, 3, None]))
def test_top_p_invariants(seed, B, V, p, ties, candidates):
    x = random_logits(seed, B, V, ties)
    out = apply_top_p(x, p, candidates=candidates)  # few candidates: the search must grow them
    if p >= 1:
        assert torch.equal(out, x)
    for row_x, row_out in zip(x, out):
        check_top_p_row(row_x, row_out, p)


@PROPS
@given(seed=st.integers(0, 2**31), V=st.integers(1, 70), min_p=st.floats(0.0, 1.0), ties=st.booleans())
def test_min_p_invariants(seed, V, min_p, ties):
    x = random_logits(seed, 3, V, ties)
    out = apply_min_p(x, min_p)
    for row_x, row_out in zip(x, out):
        kept = torch.isfinite(row_out)
        assert torch.equal(row_out[kept], row_x[kept])
        probs = row_x.double().softmax(-1)
        floor = min_p * probs.max()
        assert kept[probs.argmax()]
        assert kept[probs >= floor * (1 + 1e-5)].all()
        assert not kept[probs <= floor * (1 - 1e-5)].any()


@PROPS
@given(seed=st.integers(0, 2**31), V=st.integers(2, 70), data=st.data())
def test_per_row_parameters_and_single_sort_composition(seed, V, data):
    """Per-row k and p act on their own rows; the one-sort top-k+top-p equals top-p(top-k)."""
    B = 4
    x = random_logits(seed, B, V)
    ks = torch.tensor(data.draw(st.lists(st.integers(0, V + 1), min_size=B, max_size=B)))
    ps = torch.tensor(data.draw(st.lists(st.floats(0.05, 1.0), min_size=B, max_size=B)))
    both = apply_top_k_top_p(x, ks, ps, candidates=data.draw(st.sampled_from([1, 3, None])))
    composed = apply_top_p(apply_top_k(x, ks), ps)
    for r, c in (torch.isfinite(both) != torch.isfinite(composed)).nonzero().tolist():
        # the two may only disagree on a token whose preceding mass is p to float32 rounding
        probs = apply_top_k(x, ks)[r].double().softmax(-1)
        before = probs[probs > probs[c]].sum()
        assert abs(float(before) - float(ps[r])) < 1e-5, (r, c, float(before), float(ps[r]))
    for r in range(B):
        assert torch.equal(apply_top_k(x[r : r + 1], int(ks[r])), apply_top_k(x, ks)[r : r + 1])
        check_top_p_row(apply_top_k(x[r : r + 1], int(ks[r]))[0], both[r], float(ps[r]))


@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])  # flat (needs a full sort) to peaked
@pytest.mark.parametrize("k", [None, 0, 1, 40, 700, 5000])
def test_top_k_top_p_equals_the_full_sort_reference(scale, k):
    x = random_logits(11, 4, 3001) * scale
    p = torch.tensor([0.3, 0.9, 0.99, 1.0])
    fast, ref = apply_top_k_top_p(x, k, p), apply_top_k_top_p_reference(x, k, p)
    assert torch.equal(torch.isfinite(fast), torch.isfinite(ref))
    assert torch.equal(fast[torch.isfinite(fast)], x[torch.isfinite(fast)])
    ties = torch.round(x * 2) / 2  # ties at the k-th value straddle the first candidates
    fast = apply_top_k_top_p(ties, k, p, candidates=7)
    top_k = apply_top_k(ties, 0 if k is None else k)
    for r in range(4):  # sums over many equal probabilities round differently: check invariants
        check_top_p_row(top_k[r], fast[r], float(p[r]))
    assert torch.equal(fast[3], top_k[3])


def penalties_reference(logits, prompts, generated, rep, pres, freq):
    """Plain-Python HF repetition penalty + OpenAI presence/frequency penalties."""
    out = []
    for row, prompt, gen, r, pr, fr in zip(logits.tolist(), prompts, generated, rep, pres, freq):
        new = []
        for v, value in enumerate(row):
            count = gen.count(v)
            if v in prompt or count > 0:
                value = value * r if value < 0 else value / r
            new.append(value - fr * count - pr * (count > 0))
        out.append(new)
    return torch.tensor(out, dtype=torch.float64)


@PROPS
@given(seed=st.integers(0, 2**31), V=st.integers(1, 40), data=st.data())
def test_penalties_match_reference(seed, V, data):
    B = 3
    x = random_logits(seed, B, V)
    ids = st.lists(st.integers(0, V - 1), max_size=12)
    prompts = [data.draw(ids) for _ in range(B)]
    generated = [data.draw(ids) for _ in range(B)]
    rep = data.draw(st.lists(st.floats(0.5, 2.0), min_size=B, max_size=B))
    pres = data.draw(st.lists(st.floats(-2, 2), min_size=B, max_size=B))
    freq = data.draw(st.lists(st.floats(-2, 2), min_size=B, max_size=B))
    prompt_mask = torch.zeros(B, V, dtype=torch.bool)
    counts = torch.zeros(B, V)
    for r in range(B):
        prompt_mask[r, prompts[r]] = True
        for t in generated[r]:
            counts[r, t] += 1
    out = apply_penalties(x, prompt_mask, counts, torch.tensor(rep), torch.tensor(pres), torch.tensor(freq))
    expected = penalties_reference(x, prompts, generated, rep, pres, freq)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    neutral = apply_penalties(x, prompt_mask, counts, 1.0, 0.0, 0.0)
    assert torch.equal(neutral, x)  # neutral values leave rows bit-for-bit unchanged


def test_filters_match_transformers():
    """The same kept sets as transformers' warpers (the peer) on random float32 logits."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    x = random_logits(7, 5, 1003)
    ids = torch.randint(0, 1003, (5, 40), generator=torch.Generator().manual_seed(3))
    for k in (1, 7, 100):
        assert torch.equal(apply_top_k(x, k), TopKLogitsWarper(k)(ids, x.clone()))
    for p in (0.05, 0.5, 0.9):
        assert torch.equal(apply_top_p(x, p), TopPLogitsWarper(p)(ids, x.clone()))
    for m in (0.01, 0.2):
        assert torch.equal(torch.isfinite(apply_min_p(x, m)), torch.isfinite(MinPLogitsWarper(m)(ids, x.clone())))
    mask = torch.zeros_like(x, dtype=torch.bool).scatter_(1, ids, True)
    ours = apply_penalties(x, mask, torch.zeros_like(x), 1.3)
    torch.testing.assert_close(ours, RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Sampler


MIXED = [
    SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.4),
    SamplingParams(seed=11, top_k=5, logprobs=True),
    SamplingParams(seed=12, top_p=0.7, temperature=0.8, presence_penalty=0.6),
    SamplingParams(seed=13, min_p=0.1, temperature=1.3, min_new_tokens=6, stop_token_ids=(3, 9)),
    SamplingParams(seed=14, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, frequency_penalty=-0.3),
    SamplingParams(seed=15),
]
PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8], [9, 9], [10, 0, 1], [2]]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_runs_reproduce_and_differ_across_seeds(device):
    V = 97
    a, _ = run(MIXED, PROMPTS, V, 24, device)
    b, _ = run(MIXED, PROMPTS, V, 24, device)
    assert torch.equal(a, b)
    reseeded = [SamplingParams(**{**p.__dict__, "seed": p.seed + 100}) if p.seed else p for p in MIXED]
    c, _ = run(reseeded, PROMPTS, V, 24, device)
    for row in range(1, len(MIXED)):
        assert not torch.equal(a[row], c[row])
    assert torch.equal(a[0], c[0])  # the greedy row has no randomness


def test_unseeded_rows_are_not_reproducible():
    params = [SamplingParams(temperature=2.0)]
    assert not torch.equal(run(params, [[0]], 97, 24)[0], run(params, [[0]], 97, 24)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_batch_rows_equal_the_same_requests_alone(device):
    V = 97
    batch, batch_lps = run(MIXED, PROMPTS, V, 24, device)
    for r, (params, prompt) in enumerate(zip(MIXED, PROMPTS)):
        alone, alone_lps = run([params], [prompt], V, 24, device)
        assert torch.equal(batch[r], alone[0]), r
        if params.logprobs:
            for step in range(24):
                assert torch.equal(batch_lps[step][r], alone_lps[step][0])


def test_logprobs_are_raw_log_softmax_at_the_chosen_token():
    V = 50
    logits = random_logits(1, 2, V)
    params = [SamplingParams(seed=3, top_k=3, temperature=0.5, logprobs=True), SamplingParams(temperature=0)]
    sampler = Sampler(params, V, "cpu", [[1], [2]])
    tokens, lps = sampler.sample(logits, 0)
    assert lps.dtype == torch.float32
    torch.testing.assert_close(lps, logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
    tokens, lps = Sampler([SamplingParams(seed=3)], V, "cpu", [[1]]).sample(logits[:1], 0)
    assert lps is None


def test_small_temperature_equals_greedy():
    V, B = 60, 32
    logits = random_logits(5, B, V)
    logits[torch.arange(B), logits.argmax(-1)] += 0.5  # a clear winner in every row
    greedy, _ = Sampler([SamplingParams(temperature=0)] * B, V, "cpu", [[0]] * B).sample(logits, 0)
    cold = [SamplingParams(temperature=1e-3, seed=i, top_p=0.9) for i in range(B)]
    tokens, _ = Sampler(cold, V, "cpu", [[0]] * B).sample(logits, 0)
    assert torch.equal(tokens, greedy)
    assert torch.equal(greedy, logits.argmax(-1))
    tiny = Sampler([SamplingParams(temperature=1e-30, seed=0)] * B, V, "cpu", [[0]] * B)
    assert torch.equal(tiny.sample(logits * 1e3, 0)[0], greedy)  # no float32 overflow to NaN


def test_greedy_with_penalties_equals_reference():
    V, steps = 31, 40
    model = toy_model(V, seed=4)
    params = SamplingParams(temperature=0, repetition_penalty=1.7, presence_penalty=0.8, frequency_penalty=0.3,
                            min_new_tokens=5, stop_token_ids=(2,))
    prompt = [2, 5, 7, 5]
    ours, _ = run([params], [prompt], V, steps, model=model)
    generated = []
    for step in range(steps):
        row = model(torch.tensor([(prompt + generated)[-1]]))
        row = penalties_reference(row, [prompt], [generated], [1.7], [0.8], [0.3])[0]
        if step < 5:
            row[2] = -math.inf
        generated.append(int(row.argmax()))
    assert ours[0].tolist() == generated
    assert 2 not in generated[:5]


@pytest.mark.parametrize("device", DEVICES)
def test_min_new_tokens_suppresses_stop_ids_until_reached(device):
    V = 20
    logits = torch.zeros(3, V)
    logits[:, 4] = 30.0  # the stop id dominates
    params = [SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=(4,)),
              SamplingParams(seed=1, min_new_tokens=3, stop_token_ids=(4, 5)),
              SamplingParams(temperature=0, stop_token_ids=(4,))]
    sampler = Sampler(params, V, device, [[0]] * 3)
    for step in range(4):
        tokens, _ = sampler.sample(logits.to(device), step)
        assert tokens.tolist()[2] == 4
        assert (tokens[0] == 4) == (step >= 2)
        assert (tokens[1] == 4) == (step >= 3)


@pytest.mark.parametrize("device", DEVICES)
def test_probs_is_the_distribution_sampled_from(device):
    V = 40
    logits = random_logits(9, 3, V).to(device)
    params = [SamplingParams(temperature=0), SamplingParams(seed=0, top_k=4, temperature=0.7),
              SamplingParams(seed=0, min_p=0.3)]
    sampler = Sampler(params, V, device, [[1]] * 3)
    probs = sampler.probs(logits, 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, device=device))
    assert probs[0].max() == 1 and int(probs[0].argmax()) == int(logits[0].argmax())
    torch.testing.assert_close(probs[1:], sampler.process(logits, 0)[1:].softmax(-1))
    assert int((probs[1] > 0).sum()) == 4


def test_update_counts_tokens_for_penalties():
    V = 10
    sampler = Sampler([SamplingParams(frequency_penalty=1.0, seed=0)] * 2, V, "cpu", [[1], [2]])
    sampler.update(torch.tensor([3, 4]))
    sampler.update(torch.tensor([[3, 5], [4, 4]]))  # several tokens per row (speculative verify)
    expected = torch.zeros(2, V)
    expected[0, 3], expected[0, 5], expected[1, 4] = 2, 1, 3
    assert torch.equal(sampler.output_counts, expected)
    assert torch.equal(sampler.process(torch.zeros(2, V), 0), -expected)


def test_repetition_penalty_covers_prompt_tokens_even_of_empty_prompts():
    sampler = Sampler([SamplingParams(repetition_penalty=2.0, seed=0)] * 2, 6, "cpu", [[], [3, 3, 5]])
    logits = torch.tensor([[1.0, -1, 2, 4, 0, -2]] * 2)
    expected = logits.clone()
    expected[1, 3], expected[1, 5] = 2.0, -4.0
    assert torch.equal(sampler.process(logits, 0), expected)


@pytest.mark.parametrize(
    "params,expected",
    [
        (dict(), [0.4, 0.3, 0.15, 0.1, 0.05, 0.0]),
        (dict(temperature=2.0), [math.sqrt(p) for p in (0.4, 0.3, 0.15, 0.1, 0.05)] + [0.0]),
        (dict(top_k=2), [0.4, 0.3, 0, 0, 0, 0]),
        (dict(top_k=4, top_p=0.8), [0.4, 0.3, 0.15, 0, 0, 0]),  # 0.4/.95 + 0.3/.95 < 0.8
        (dict(min_p=0.3), [0.4, 0.3, 0.15, 0, 0, 0]),  # keeps p >= 0.12
    ],
)
def test_sampled_frequencies_match_the_distribution(params, expected):
    """Chi-square goodness of fit of 20,000 seeded draws (deterministic, so never flaky)."""
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])
    rows, steps = 2000, 10
    sampler = Sampler([SamplingParams(seed=i, **params) for i in range(rows)], 6, "cpu", [[0]] * rows)
    logits = probs.log().expand(rows, 6)
    counts = torch.zeros(6)
    for step in range(steps):
        tokens, _ = sampler.sample(logits, step)
        counts += torch.bincount(tokens, minlength=6)
    expected = torch.tensor(expected, dtype=torch.float64)
    expected = expected / expected.sum() * rows * steps
    support = expected > 0
    assert counts[~support].sum() == 0  # removed tokens are never drawn
    chi2 = float((((counts.double() - expected) ** 2)[support] / expected[support]).sum())
    df = int(support.sum()) - 1
    assert chi2 < {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[df]  # p = 0.001 quantiles


def test_inverse_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    assert sample_inverse_cdf(probs, torch.tensor([0.0, 0.0])).tolist() == [1, 0]
    top = torch.tensor([1 - 2**-24, 1 - 2**-24])  # the largest float32 below 1
    assert sample_inverse_cdf(probs, top).tolist() == [3, 4]
    assert sample_inverse_cdf(probs, torch.tensor([0.5, 0.5])).tolist() == [3, 2]
