"""The numpy twin of `sampling.Sampler` for the torch-free ONNX Runtime engine.

Same parameters (`SamplingParams`), same order of processing (stop-id suppression below
min_new_tokens, repetition penalty, presence/frequency penalties, temperature, top-k, top-p on the
renormalised top-k survivors, min-p) and the same draw: one uniform number per sampling row and
step, inverted through the CDF of the processed distribution. Given the same logits, greedy rows
choose the same tokens as the torch sampler, and sampling rows fed the same uniforms do too (a
test checks both).

Seeds: each sampling row owns a `numpy.random.Generator(PCG64(seed))`; the torch sampler draws
from a `torch.Generator` (Mersenne Twister). A seed therefore reproduces its tokens within each
engine, but the same seed gives a different stream, hence different sampled tokens, in the two.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .params import SamplingParams, check_rows, non_finite_logits

NEG_INF = np.float32(-np.inf)


def _col(values, dtype=np.float32) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def apply_penalties(x: np.ndarray, prompt_mask: Optional[np.ndarray], counts: np.ndarray, repetition, presence,
                    frequency) -> np.ndarray:
    """HF repetition penalty over prompt + generated tokens, then OpenAI presence/frequency."""
    generated = counts > 0  # (B, V)
    seen = generated if prompt_mask is None else generated | prompt_mask
    penalised = np.where(x < 0, x * repetition, x / repetition)
    out = np.where(seen, penalised, x)
    out = out - frequency * counts
    return (out - presence * generated.astype(np.float32)).astype(np.float32)


def apply_top_k_top_p(x: np.ndarray, k: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Top-k (ties of the k-th kept; k <= 0 or >= V is off), then top-p on the renormalised
    survivors (token i in descending order kept iff the mass before it is < p; p >= 1 is off)."""
    B, V = x.shape
    order = np.argsort(-x, axis=-1, kind="stable")  # (B, V) descending
    s = np.take_along_axis(x, order, axis=-1)
    k_on = (k > 0) & (k < V)  # (B, 1)
    kth = np.take_along_axis(s, np.where(k_on, k, V) - 1, axis=-1)  # (B, 1)
    s = np.where(k_on & (s < kth), NEG_INF, s)
    m = s[:, :1]
    e = np.exp(s - m)
    probs = e / e.sum(-1, keepdims=True, dtype=np.float32)
    before = np.concatenate([np.zeros((B, 1), np.float32), np.cumsum(probs, axis=-1, dtype=np.float32)[:, :-1]],
                            axis=-1)  # (B, V): mass strictly before each token
    s = np.where((before >= p) & (p < 1), NEG_INF, s)
    out = np.empty_like(x)
    np.put_along_axis(out, order, s, axis=-1)
    return out


def apply_min_p(x: np.ndarray, min_p: np.ndarray) -> np.ndarray:
    """Keep tokens with p >= min_p * p_max, as logit >= max + log(min_p)."""
    with np.errstate(divide="ignore"):
        floor = x.max(-1, keepdims=True) + np.log(min_p)
    return np.where(x < floor, NEG_INF, x)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True, dtype=np.float32)


def sample_inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Token i of each row with cdf[i-1] <= u * total < cdf[i] (zero-probability tokens never)."""
    cdf = np.cumsum(probs, axis=-1, dtype=np.float32)  # (B, V)
    total = cdf[:, -1:]
    target = np.minimum(u.astype(np.float32).reshape(-1, 1) * total, np.nextafter(total, np.float32(0)))
    return np.array([np.searchsorted(c, t, side="right") for c, t in zip(cdf, target[:, 0])], dtype=np.int64)


class NumpySampler:
    """Per-row sampling of (B, V) numpy logits; the interface of `sampling.Sampler`."""

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, prompt_ids: Sequence[Sequence[int]]):
        check_rows(params, vocab_size, prompt_ids)
        self.params = list(params)
        self.vocab_size = V = vocab_size
        B = len(params)
        self.sampling = np.array([not p.greedy for p in params])
        self.temperature = _col([p.temperature if s else 1.0 for p, s in zip(params, self.sampling)])
        self.top_k = _col([p.top_k if s else 0 for p, s in zip(params, self.sampling)], np.int64)
        self.top_p = _col([p.top_p if s else 1.0 for p, s in zip(params, self.sampling)])
        self.min_p = _col([p.min_p if s else 0.0 for p, s in zip(params, self.sampling)])
        self.uses_filter = bool(((self.top_k > 0) & (self.top_k < V)).any() or (self.top_p < 1).any())
        self.any_sampling = bool(self.sampling.any())
        self.uses_min_p = bool((self.min_p > 0).any())
        self.repetition = _col([p.repetition_penalty for p in params])
        self.presence = _col([p.presence_penalty for p in params])
        self.frequency = _col([p.frequency_penalty for p in params])
        self.uses_penalties = any(p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
                                  for p in params)
        self.counts = np.zeros((B, V), np.float32) if self.uses_penalties else None
        self.prompt_mask = None
        if self.uses_penalties and any(p.repetition_penalty != 1 for p in params):
            self.prompt_mask = np.zeros((B, V), bool)
            for r, ids in enumerate(prompt_ids):
                self.prompt_mask[r, list(ids)] = True
        self.stop_pairs = [(r, t, p.min_new_tokens) for r, p in enumerate(params) if p.min_new_tokens
                           for t in p.stop_token_ids]
        # every row greedy, no penalties: from step `plain_from` on (stop ids no longer suppressed)
        # a token is the raw logits' argmax, with no processed copy (`sample`)
        self.plain_from = (max((m for _, _, m in self.stop_pairs), default=0)
                           if not self.any_sampling and not self.uses_penalties else None)
        self.generators = [np.random.default_rng(p.seed) if s else None for p, s in zip(params, self.sampling)]
        self.wants_logprobs = any(p.logprobs for p in params)

    def process(self, logits: np.ndarray, step: int) -> np.ndarray:
        """The processed (B, V) float32 logits; `logits` is left untouched."""
        self._check(logits)
        x = logits.astype(np.float32, copy=True)
        for r, t, m in self.stop_pairs:
            if step < m:
                x[r, t] = NEG_INF
        if self.uses_penalties:
            x = apply_penalties(x, self.prompt_mask, self.counts, self.repetition, self.presence, self.frequency)
        if self.any_sampling:
            x = x / self.temperature
        if self.uses_filter:
            x = apply_top_k_top_p(x, self.top_k, self.top_p)
        if self.uses_min_p:
            x = np.where(self.min_p > 0, apply_min_p(x, np.maximum(self.min_p, np.float32(1e-45))), x)
        ok = np.isfinite(x.max(-1))  # (B,): max propagates NaN
        if not ok.all():
            raise non_finite_logits(step, np.flatnonzero(~ok).tolist())
        return x

    def _check(self, logits: np.ndarray) -> None:
        B, V = len(self.params), self.vocab_size
        if logits.ndim != 2 or logits.shape != (B, V):
            raise ValueError(f"Sampler: logits have shape {tuple(logits.shape)}, expected ({B}, {V})")

    def uniforms(self) -> np.ndarray:
        """One U[0, 1) draw per sampling row from that row's generator."""
        return np.array([g.random() for g in self.generators if g is not None], dtype=np.float32)

    def sample(self, logits: np.ndarray, step: int):
        """(tokens (B,) int64, logprobs (B,) float32 or None), as `Sampler.sample`."""
        if self.plain_from is not None and step >= self.plain_from:
            self._check(logits)
            tokens = logits.argmax(-1).astype(np.int64)
            best = logits[np.arange(len(tokens)), tokens].tolist()  # argmax picks a NaN where there is one
            bad = [r for r, v in enumerate(best) if not math.isfinite(v)]
            if bad:
                raise non_finite_logits(step, bad)
            return tokens, self._logprobs(logits, tokens)
        x = self.process(logits, step)
        tokens = x.argmax(-1).astype(np.int64)
        if self.any_sampling:
            rows = np.flatnonzero(self.sampling)
            tokens[rows] = sample_inverse_cdf(softmax(x[rows]), self.uniforms())
        return tokens, self._logprobs(logits, tokens)

    def _logprobs(self, logits: np.ndarray, tokens: np.ndarray) -> Optional[np.ndarray]:
        """log_softmax of the raw logits at the chosen tokens, when any row asked for them."""
        if not self.wants_logprobs:
            return None
        raw = logits.astype(np.float32)
        m = raw.max(-1)
        lse = m + np.log(np.exp(raw - m[:, None]).sum(-1))
        return raw[np.arange(len(tokens)), tokens] - lse

    def update(self, tokens: np.ndarray) -> None:
        """Record generated tokens, (B,) or (B, n), in the penalty counts."""
        if self.counts is None:
            return
        idx = np.asarray(tokens, np.int64).reshape(len(self.params), -1)
        for r in range(idx.shape[0]):
            np.add.at(self.counts[r], idx[r], 1.0)
