"""Speculative decoding with n-gram drafters.

A drafter proposes up to k next tokens; the decoder scores [last token, d1..dk] in one forward
of k+1 query tokens against its KV cache (`DecodeState.forward`), the longest acceptable prefix
is kept and the cache is rolled back past the rest (`KVCache.truncate`). Greedy requests give
exactly the tokens of plain greedy decoding. Sampling requests use the standard speculative
acceptance rule for a deterministic draft (q is one-hot at d): accept d with probability p(d),
otherwise draw from p with d removed and renormalised, which leaves the output distributed
exactly as p, the sampler's processed distribution (temperature, top-k/p, min-p, penalties).

Drafters:
- `PromptLookupDrafter`: the continuation of the latest earlier occurrence of the context's last
  n tokens (prompt-lookup decoding; strong when the output copies the prompt: code, summaries).
- `NGramLMDrafter`: the greedy continuation of an `mmfuse.ngram` model built on token ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from .generate import DecodeState, Engine
from ..errors import SamplingParamsError
from ..generation.requests import Completion, StopTracker
from ..generation.params import SamplingParams
from ..generation.sampling import Sampler, sample_inverse_cdf


class Drafter(Protocol):
    def propose(self, context: Sequence[int], k: int) -> list:
        """Up to k proposed next token ids after `context` (prompt + generated so far)."""


class PromptLookupDrafter:
    """Match the last n tokens (n = max_ngram down to min_ngram) earlier in the context and
    propose what followed the latest match."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"PromptLookupDrafter needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, context: Sequence[int], k: int) -> list:
        ctx = np.asarray(context, dtype=np.int64)
        T = len(ctx)
        for n in range(min(self.max_ngram, T - 1), self.min_ngram - 1, -1):
            tail = ctx[T - n:]
            windows = np.lib.stride_tricks.sliding_window_view(ctx[: T - 1], n)  # starts 0 .. T-1-n
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = hits[-1] + n
                return ctx[start: start + k].tolist()
        return []


class NGramLMDrafter:
    """Greedy continuation of an n-gram LM over token ids (`mmfuse.ngram.NGramModel.build(ids)`)."""

    def __init__(self, lm):
        self.lm = lm

    def propose(self, context: Sequence[int], k: int) -> list:
        ids, _ = self.lm.greedy(list(context[-(self.lm.order - 1):]) if self.lm.order > 1 else [], k)
        out = []
        for t in ids.tolist():
            if t < 0:  # </s> or <unk>: nothing the decoder can be handed
                break
            out.append(t)
        return out


@dataclass
class SpeculativeStats:
    forwards: int = 0      # decoder calls after the prefill
    drafted: int = 0       # proposed tokens
    accepted: int = 0      # proposed tokens kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def accept_token(probs: torch.Tensor, draft: int, u: torch.Tensor, u2: torch.Tensor, greedy: bool) -> tuple:
    """Speculative acceptance of a one-hot draft under target distribution `probs` (V,).

    Returns (token, accepted). Greedy: accept iff the draft is the argmax. Sampling: accept with
    probability p(draft) (u < p), else draw from p with the draft removed (using u2)."""
    if greedy:
        best = int(probs.argmax())
        return best, best == draft
    if float(u) < float(probs[draft]):
        return draft, True
    residual = probs.clone()
    residual[draft] = 0
    if float(residual.sum()) <= 0:  # p was one-hot at the draft: acceptance was certain
        return draft, True
    return int(sample_inverse_cdf(residual[None], u2.view(1))[0]), False


def speculative_generate(engine: Engine, prompt, drafter: Drafter, k: int = 4,
                         params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
                         **overrides) -> tuple:
    """Generate for one prompt with draft-and-verify; returns (Completion, SpeculativeStats)."""
    if k < 1:
        raise ValueError(f"speculative k must be >= 1, got {k}")
    p = engine.params(params, **overrides)
    if p.n != 1:
        raise SamplingParamsError(f"SamplingParams.n={p.n}: speculative_generate makes one sequence")
    if ignore_eos:
        p = engine.without_eos(p)
    ids = engine.encode(prompt)
    engine.check_request(0, ids, p, extra=k)
    model = engine.model
    dev = model.norm_f.weight.device
    state = DecodeState(model, 1, len(ids) + p.max_new_tokens + k)
    sampler = Sampler([p], model.cfg.vocab_size, dev, [ids])
    out = StopTracker(p, engine.tokenizer, ids)
    comp = Completion([], "" if engine.tokenizer else None, [] if p.logprobs else None, "length")
    stats = SpeculativeStats()

    def emit(token: int, raw_logits: torch.Tensor) -> bool:
        sampler.update(torch.tensor([token], device=dev))
        comp.token_ids.append(token)
        if comp.logprobs is not None:
            comp.logprobs.append(float(raw_logits.float().log_softmax(-1)[token]))
        piece, reason = out.add(token)
        if comp.text is not None:
            comp.text += piece
        if reason is not None:
            comp.finish_reason = reason
        return reason is not None

    logits = engine.prefill(state, [ids])  # (1, V)
    tok, _ = sampler.sample(logits, 0)
    if emit(int(tok), logits[0]):
        return comp, stats
    while True:
        context = ids + comp.token_ids
        draft = [int(t) for t in drafter.propose(context, min(k, p.max_new_tokens - len(comp.token_ids)))][:k]
        draft = [t for t in draft if 0 <= t < model.cfg.vocab_size]
        cached = len(context) - 1  # every token but the last sampled one is in the cache
        logits = state.forward(torch.tensor([[comp.token_ids[-1]] + draft], device=dev))[0]  # (1 + len(draft), V)
        stats.forwards += 1
        stats.drafted += len(draft)
        # Greedy without penalties or pending min_new_tokens: the targets are plain argmaxes, all at once.
        plain = p.greedy and not sampler.uses_penalties and len(comp.token_ids) >= p.min_new_tokens
        targets = logits.argmax(-1).tolist() if plain else None
        for i, d in enumerate(draft):
            if plain:
                token, ok = targets[i], targets[i] == d
            else:
                probs = sampler.probs(logits[i: i + 1], len(comp.token_ids))[0]
                u = sampler.uniforms()[0] if not p.greedy else None
                u2 = sampler.uniforms()[0] if not p.greedy else None
                token, ok = accept_token(probs, d, u, u2, p.greedy)
            stats.accepted += ok
            finished = emit(token, logits[i])
            if finished or not ok:
                break
        else:
            tok, _ = sampler.sample(logits[len(draft): len(draft) + 1], len(comp.token_ids))
            finished = emit(int(tok), logits[len(draft)])
        if finished:
            return comp, stats
        state.cache.truncate([cached + len(comp.token_ids) - (len(context) - len(ids))])
