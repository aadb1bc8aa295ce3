"""Speculative decoding: greedy output identical to plain greedy; sampling keeps the target distribution."""
import numpy as np
import pytest
import torch

from mmfuse.decoder.generate import Engine
from mmfuse.decoder.speculative import NGramLMDrafter, PromptLookupDrafter, accept_token, speculative_generate


class OracleDrafter:
    """Proposes the true greedy continuation (every draft accepted) or garbage (none accepted)."""

    def __init__(self, truth, prompt_len, wrong=False):
        self.truth, self.prompt_len, self.wrong = truth, prompt_len, wrong

    def propose(self, context, k):
        n = len(context) - self.prompt_len
        d = self.truth[n: n + k]
        return [(t + 1) % 300 for t in d] if self.wrong else d


@pytest.fixture(scope="module")
def engine(gpt2_folder):
    return Engine.from_pretrained(gpt2_folder)


def _prompt(seed, n=12):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_prompt_lookup_greedy_identical(engine, k):
    prompt = _prompt(0) * 3  # a prompt that repeats itself, so lookups find matches
    plain = engine.generate(prompt, temperature=0.0, max_new_tokens=30)[0]
    spec, stats = speculative_generate(engine, prompt, PromptLookupDrafter(), k=k, temperature=0.0, max_new_tokens=30)
    assert spec.token_ids == plain.token_ids and spec.finish_reason == "length"
    assert stats.drafted > 0


@pytest.mark.parametrize("wrong", [False, True])
def test_oracle_drafts_all_or_none_accepted(engine, wrong):
    prompt = _prompt(1)
    plain = engine.generate(prompt, temperature=0.0, max_new_tokens=25, logprobs=True)[0]
    drafter = OracleDrafter(plain.token_ids, len(prompt), wrong)
    spec, stats = speculative_generate(engine, prompt, drafter, k=4, temperature=0.0, max_new_tokens=25, logprobs=True)
    assert spec.token_ids == plain.token_ids
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4)
    assert stats.accepted == (0 if wrong else stats.drafted)
    if not wrong:
        assert stats.forwards <= 25 // 5 + 1  # k + 1 tokens per forward


def test_ngram_lm_drafter_greedy_identical(engine):
    from mmfuse.ngram import NGramModel

    plain = engine.generate(_prompt(2), temperature=0.0, max_new_tokens=40)[0]
    corpus = np.array(_prompt(2) + plain.token_ids, dtype=np.int32)  # an LM that has seen the output
    lm = NGramModel.build(corpus, order=3, discount_fallback=(0.5, 1.0, 1.5))
    spec, stats = speculative_generate(engine, _prompt(2), NGramLMDrafter(lm), k=4, temperature=0.0, max_new_tokens=40)
    assert spec.token_ids == plain.token_ids
    assert stats.acceptance_rate > 0.5


def test_stop_token_inside_accepted_draft(engine):
    prompt = _prompt(3)
    plain = engine.generate(prompt, temperature=0.0, max_new_tokens=20)[0].token_ids
    stop = plain[7]
    ref = engine.generate(prompt, temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,))[0]
    spec, _ = speculative_generate(engine, prompt, OracleDrafter(plain, len(prompt)), k=5, temperature=0.0,
                                   max_new_tokens=20, stop_token_ids=(stop,))
    assert spec.token_ids == ref.token_ids and spec.finish_reason == "stop"


def test_seeded_speculative_sampling_reproduces(engine):
    prompt = _prompt(4) * 2
    kw = dict(temperature=0.8, top_p=0.9, max_new_tokens=20, seed=5)
    a, _ = speculative_generate(engine, prompt, PromptLookupDrafter(), k=3, **kw)
    b, _ = speculative_generate(engine, prompt, PromptLookupDrafter(), k=3, **kw)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20


def test_acceptance_rule_preserves_distribution():
    """Monte Carlo: the token returned by accept_token is distributed as p, whatever the draft."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g) * 1.5, 0)
    n = 20000
    for draft in (int(p.argmax()), int(p.argmin())):
        counts = np.zeros(6)
        u = torch.rand(n, 2, generator=g)
        for i in range(n):
            tok, _ = accept_token(p, draft, u[i, 0], u[i, 1], greedy=False)
            counts[tok] += 1
        expected = p.numpy() * n
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 25.0  # 5 degrees of freedom: p(chi2 > 25) ~ 1e-4


def test_prompt_lookup_proposals():
    d = PromptLookupDrafter(max_ngram=2)
    assert d.propose([5, 6, 7, 8, 1, 5, 6], 3) == [7, 8, 1]
    assert d.propose([1, 2, 3], 3) == []
    assert d.propose([4, 9, 4, 9, 4], 2) == [9, 4]  # latest match of (9, 4)... then of (4,)
