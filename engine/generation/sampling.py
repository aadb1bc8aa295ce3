"""Per-request sampling for a batch: penalties, temperature, top-k, top-p, min-p, seeded draws.

Each row of a batch carries its own `SamplingParams`. `Sampler` turns the per-row fields into
(B, 1) parameter tensors once, so every filter is one vectorised op over the rows that use it;
rows with a filter off are never touched by it. The filters are also exposed as small pure
functions (`apply_top_k`, `apply_top_p`, `apply_min_p`, `apply_penalties`) with the same
semantics as Hugging Face's logits warpers, so they can be property-tested on their own.

Order of processing (the order of HF `generate` and vLLM): stop-id suppression while fewer than
min_new_tokens were generated, repetition penalty, presence/frequency penalties, temperature,
top-k, top-p, min-p.

Draws: every sampling row owns a CPU `torch.Generator` and takes exactly one uniform number per
step from it, then inverts the CDF of its processed distribution on the logits' device. A row's
tokens therefore depend only on its own seed and logits: the same request gives the same tokens
alone or in any batch, and the same uniforms on CPU and CUDA.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .params import SamplingParams, check_rows, non_finite_logits

NEG_INF = float("-inf")
TOP_P_CANDIDATES = 256  # first guess at how many tokens hold the top-p mass
def _column(value, logits: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) per-row parameter as a (B, 1) tensor on the logits' device and dtype."""
    t = torch.as_tensor(value, device=logits.device)
    t = t.to(logits.dtype) if t.is_floating_point() else t
    return t.reshape(-1, 1).expand(logits.shape[0], 1)


# ----------------------------------------------------------------------------------------------
# pure filters: (B, V) logits in, new (B, V) logits out; removed tokens become -inf


def apply_penalties(
    logits: torch.Tensor,  # (B, V)
    prompt_mask: Optional[torch.Tensor],  # (B, V) bool: token occurs in the prompt; None = none
    output_counts: torch.Tensor,  # (B, V): how often each token was generated so far
    repetition=1.0,  # float or (B,)
    presence=0.0,  # float or (B,)
    frequency=0.0,  # float or (B,)
) -> torch.Tensor:
    """HF repetition penalty over prompt + generated tokens, then OpenAI presence/frequency
    penalties over generated tokens only. Neutral values leave a row bit-for-bit unchanged."""
    rep = _column(repetition, logits)
    generated = output_counts > 0  # (B, V)
    seen = generated if prompt_mask is None else generated | prompt_mask
    penalised = torch.where(logits < 0, logits * rep, logits / rep)
    out = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    out = out - _column(frequency, logits) * counts
    return out - _column(presence, logits) * generated.to(logits.dtype)


def apply_top_k(logits: torch.Tensor, k, k_max: Optional[int] = None) -> torch.Tensor:
    """Keep each row's k largest logits (all ties of the k-th are kept, as in HF).
    `k`: int or (B,) ints; k <= 0 or k >= V leaves the row unchanged. `k_max`, when the caller
    knows it, saves a device sync."""
    V = logits.shape[-1]
    k = _column(k, logits).long()
    off = (k <= 0) | (k >= V)  # (B, 1)
    k = torch.where(off, 1, k)
    k_max = int(k.max()) if k_max is None else min(max(k_max, 1), V)
    top = torch.topk(logits, k_max, dim=-1).values  # (B, k_max), descending
    kth = top.gather(1, k - 1)  # (B, 1)
    return logits.masked_fill((logits < kth) & ~off, NEG_INF)


def apply_top_p(logits: torch.Tensor, p, candidates: Optional[int] = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass is >= p: token i (in
    descending order) is kept iff the mass strictly before it is < p, so the top token always
    stays. `p`: float or (B,); p >= 1 leaves the row unchanged."""
    return apply_top_k_top_p(logits, None, p, candidates=candidates)


def apply_top_k_top_p(
    logits: torch.Tensor, k, p, k_max: Optional[int] = None, candidates: Optional[int] = None
) -> torch.Tensor:
    """Top-k, then top-p on the renormalised survivors (HF/vLLM order); `k` None means no top-k,
    otherwise the semantics of `apply_top_k` and `apply_top_p`.

    A full sort of a 50k vocabulary costs ~10 ms on a CPU, so the cut is looked for among the
    `candidates` most likely tokens (torch.topk), growing them 4x until they hold the top-k set
    (with its ties) and the top-p mass; it ends at a full sort for very flat distributions."""
    B, V = logits.shape
    p = _column(p, logits)
    p_on = p < 1  # (B, 1)
    k = _column(0 if k is None else k, logits).long()
    k_on = (k > 0) & (k < V)  # (B, 1)
    if k_max is None:
        k_max = int(torch.where(k_on, k, 0).max())
    n = min(V, max(TOP_P_CANDIDATES if candidates is None else candidates, k_max, 1))
    lse_all = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1): normaliser without top-k
    while True:
        values, index = torch.topk(logits, n, dim=-1)  # (B, n), descending
        kth = values.gather(1, torch.where(k_on, k, n).clamp(max=n) - 1)  # (B, 1)
        in_k = (values >= kth) | ~k_on  # (B, n)
        values = values.masked_fill(~in_k, NEG_INF)
        lse = torch.where(k_on, torch.logsumexp(values, dim=-1, keepdim=True), lse_all)
        probs = torch.exp(values - lse)  # (B, n): probabilities after top-k
        mass = probs.cumsum(dim=-1)  # (B, n)
        holds_k = ~k_on | ((logits >= kth).sum(-1, keepdim=True) == in_k.sum(-1, keepdim=True))
        holds_p = k_on | ~p_on | (mass[:, -1:] >= p)
        if n == V or bool((holds_k & holds_p).all()):
            break
        n = min(V, 4 * n)
    mass_before = mass.roll(1, dims=-1)  # (B, n): exclusive cumulative mass
    mass_before[:, 0] = 0
    values = values.masked_fill((mass_before >= p) & p_on, NEG_INF)
    out = torch.full_like(logits, NEG_INF).scatter_(1, index, values)
    return torch.where(k_on | p_on, out, logits)


def apply_top_k_top_p_reference(logits: torch.Tensor, k, p) -> torch.Tensor:
    """Plain reference of `apply_top_k_top_p`: one full sort, as HF does."""
    p = _column(p, logits)
    p_off = p >= 1  # (B, 1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V) each
    if k is not None:
        k = _column(k, logits).long()
        k = torch.where((k <= 0) | (k >= logits.shape[-1]), logits.shape[-1], k)
        kth = sorted_logits.gather(1, k - 1)  # (B, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, NEG_INF)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1).roll(1, dims=-1)  # (B, V): exclusive cumulative mass
    mass_before[:, 0] = 0
    sorted_logits = sorted_logits.masked_fill((mass_before >= p) & ~p_off, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Keep tokens with p >= min_p * p_max, tested in log space as logit >= max + log(min_p)
    (no softmax needed). `min_p`: float or (B,); 0 leaves the row unchanged."""
    floor = logits.amax(dim=-1, keepdim=True) + torch.log(_column(min_p, logits))  # (B, 1)
    return logits.masked_fill(logits < floor, NEG_INF)


# ----------------------------------------------------------------------------------------------


class _Rows:
    """The rows of a batch that use some feature: all, none, or an index tensor."""

    def __init__(self, mask: Sequence[bool], device):
        self.any = any(mask)
        self.all = all(mask)
        rows = [i for i, m in enumerate(mask) if m]
        self.index = None if self.all else torch.tensor(rows, dtype=torch.long, device=device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.all else x.index_select(0, self.index)

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values if self.all else x.index_copy(0, self.index, values)


class Sampler:
    """Turns (B, V) model logits into tokens for a batch of requests with per-row parameters.

    `step` is the number of tokens already generated for the rows (0 when choosing the first new
    token); it only drives min_new_tokens. Call `update(tokens)` after each step so the penalties
    see the generated tokens.
    """

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device, prompt_ids: Sequence[Sequence[int]]):
        check_rows(params, vocab_size, prompt_ids)
        self.params = list(params)
        self.vocab_size = V = vocab_size
        self.device = device = torch.device(device)
        B = len(params)

        def col(values, dtype=torch.float32):  # per-row parameter as (B, 1)
            return torch.tensor(values, dtype=dtype, device=device).view(B, 1)

        sampling = [not p.greedy for p in params]
        self.greedy_rows = _Rows([not s for s in sampling], device)
        self.sampling_rows = _Rows(sampling, device)
        self.temperature = col([p.temperature if s else 1.0 for p, s in zip(params, sampling)])
        self.top_k_rows = _Rows([s and 0 < p.top_k < V for p, s in zip(params, sampling)], device)
        self.top_p_rows = _Rows([s and p.top_p < 1 for p, s in zip(params, sampling)], device)
        self.top_k_top_p_rows = _Rows(
            [s and (0 < p.top_k < V or p.top_p < 1) for p, s in zip(params, sampling)], device
        )
        self.top_k = self.top_k_top_p_rows.take(col([p.top_k for p in params], torch.long))
        self._top_k_max = max((p.top_k for p, s in zip(params, sampling) if s and 0 < p.top_k < V), default=1)
        self.top_p = self.top_k_top_p_rows.take(col([p.top_p for p in params]))
        self.min_p_rows = _Rows([s and p.min_p > 0 for p, s in zip(params, sampling)], device)
        self.min_p = self.min_p_rows.take(col([p.min_p for p in params]))

        # Penalty state, allocated only when some row uses a penalty.
        self.repetition = col([p.repetition_penalty for p in params])
        self.presence = col([p.presence_penalty for p in params])
        self.frequency = col([p.frequency_penalty for p in params])
        self.uses_penalties = any(
            p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params
        )
        self.prompt_mask = None  # (B, V) bool: token occurs in the prompt (repetition penalty)
        self.output_counts = None  # (B, V) float32: generated-token counts (all penalties)
        if self.uses_penalties:
            self.output_counts = torch.zeros(B, V, dtype=torch.float32, device=device)
            if any(p.repetition_penalty != 1 for p in params):
                rows = [r for r, ids in enumerate(prompt_ids) for _ in ids]
                cols = [t for ids in prompt_ids for t in ids]
                self.prompt_mask = torch.zeros(B, V, dtype=torch.bool, device=device)
                index = torch.tensor([rows, cols], dtype=torch.long, device=device)  # (2, prompt tokens)
                self.prompt_mask[index[0], index[1]] = True
        self._one = torch.ones(1, 1, dtype=torch.float32, device=device)

        # min_new_tokens: (row, stop id) pairs suppressed while step < that row's min_new_tokens.
        pairs = [(r, t, p.min_new_tokens) for r, p in enumerate(params) if p.min_new_tokens for t in p.stop_token_ids]
        self._stop_pairs = None
        if pairs:
            r, t, m = zip(*pairs)
            self._stop_pairs = tuple(torch.tensor(v, dtype=torch.long, device=device) for v in (r, t, m))
        # every row greedy, no penalties: from step `plain_from` on (stop ids no longer suppressed) a
        # token is the raw logits' first maximum, with no processed copy: `sample` then runs one
        # reduction instead of ~8 tensor ops (each costs 30-200 us once a decode step has flushed the
        # caches: bench/bench_step_gap.py)
        self.plain_from = (max((m for _, _, m in pairs), default=0)
                           if not self.sampling_rows.any and not self.uses_penalties else None)

        # One CPU generator per sampling row; rows without a seed draw a nondeterministic one.
        self.generators: list[Optional[torch.Generator]] = []
        for p, s in zip(params, sampling):
            g = None
            if s:
                g = torch.Generator(device="cpu")
                if p.seed is None:
                    g.seed()
                else:
                    g.manual_seed(p.seed)
            self.generators.append(g)
        self.wants_logprobs = any(p.logprobs for p in params)

    def _check(self, logits: torch.Tensor) -> None:
        B, V = len(self.params), self.vocab_size
        if logits.dim() != 2 or logits.shape[0] != B or logits.shape[1] != V:
            raise ValueError(f"Sampler: logits have shape {tuple(logits.shape)}, expected ({B}, {V})")

    def process(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The processed (B, V) float32 logits; `logits` is left untouched. Greedy rows get the
        penalties and stop suppression but no temperature or filter (they cannot move argmax)."""
        self._check(logits)
        x = logits.to(torch.float32, copy=True)  # (B, V)
        if self._stop_pairs is not None:
            rows, ids, min_new = self._stop_pairs
            x[rows, ids] = torch.where(step < min_new, NEG_INF, x[rows, ids])
        if self.uses_penalties:
            x = apply_penalties(x, self.prompt_mask, self.output_counts, self.repetition, self.presence, self.frequency)
        if self.sampling_rows.any:
            x = x / self.temperature
        rows = self.top_k_top_p_rows
        if self.top_p_rows.any:
            k = self.top_k if self.top_k_rows.any else None
            x = rows.put(x, apply_top_k_top_p(rows.take(x), k, self.top_p, self._top_k_max))
        elif self.top_k_rows.any:
            x = rows.put(x, apply_top_k(rows.take(x), self.top_k, self._top_k_max))
        if self.min_p_rows.any:
            x = self.min_p_rows.put(x, apply_min_p(self.min_p_rows.take(x), self.min_p))
        self._check_finite(x, step)
        return x

    def _check_finite(self, x: torch.Tensor, step: int) -> None:
        """`non_finite_logits` unless every row has a finite maximum: one row-max per step (amax
        propagates NaN), one host sync."""
        ok = torch.isfinite(x.amax(dim=-1))  # (B,)
        if not bool(ok.all()):
            raise non_finite_logits(step, (~ok).nonzero().flatten().tolist())

    def probs(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The (B, V) distribution tokens are drawn from: softmax of the processed logits for
        sampling rows, one-hot at the argmax for greedy rows (for speculative acceptance)."""
        x = self.process(logits, step)
        return self._probs(x)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        probs = x.softmax(dim=-1)
        if self.greedy_rows.any:
            g = self.greedy_rows
            onehot = torch.zeros_like(g.take(probs)).scatter_(1, g.take(x).argmax(-1, keepdim=True), 1.0)
            probs = g.put(probs, onehot)
        return probs

    def uniforms(self) -> torch.Tensor:
        """One U[0, 1) draw per sampling row from that row's generator, as (B_sampling,) on the device."""
        gens = [g for g in self.generators if g is not None]
        u = torch.cat([torch.rand(1, generator=g) for g in gens])
        return u.to(self.device, non_blocking=True)

    def sample(self, logits: torch.Tensor, step: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Choose one token per row: (tokens (B,) int64, logprobs (B,) float32 or None).

        logprobs are log_softmax of the RAW model logits at the chosen token (vLLM's default):
        they describe the model, not the filtered distribution. They are returned for every row
        when any row asked for them, else None."""
        if self.plain_from is not None and step >= self.plain_from:
            self._check(logits)
            best, tokens = logits.max(dim=-1)  # the first maximum; a NaN where the row has one
            bad = [r for r, v in enumerate(best.tolist()) if not math.isfinite(v)]
            if bad:
                raise non_finite_logits(step, bad)
            return tokens, self._logprobs(logits, tokens)
        x = self.process(logits, step)  # (B, V), also validates the shape
        tokens = torch.empty(len(self.params), dtype=torch.long, device=x.device)
        if self.greedy_rows.any:
            g = self.greedy_rows
            tokens = g.put(tokens, g.take(x).argmax(dim=-1))
        if self.sampling_rows.any:
            s = self.sampling_rows
            tokens = s.put(tokens, sample_inverse_cdf(s.take(x).softmax(dim=-1), self.uniforms()))
        return tokens, self._logprobs(logits, tokens)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """log_softmax of the raw logits at the chosen tokens, when any row asked for them."""
        if not self.wants_logprobs:
            return None
        raw = logits.float()
        return raw.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)

    def update(self, tokens: torch.Tensor) -> None:
        """Record generated tokens, (B,) or (B, n), in the penalty counts (in place)."""
        if self.output_counts is None:
            return
        idx = tokens.to(self.device, torch.long).reshape(len(self.params), -1)  # (B, n)
        self.output_counts.scatter_add_(1, idx, self._one.expand_as(idx))


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token i of each row with cdf[i-1] <= u * total < cdf[i]; zero-probability tokens are never
    chosen. probs (B, V) (need not be normalised), u (B,) in [0, 1) -> (B,) int64."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    target = torch.minimum(u.to(cdf.dtype).view(-1, 1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)
