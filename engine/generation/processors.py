"""Logits processors for `generate(..., logits_processor=...)`: callables (logits (B, V), step) ->
logits (B, V) run on the whole batch before sampling, so that rows may read each other.

- `ClassifierFreeGuidance`: the batch is N conditional rows then their N unconditional rows; both
  halves get u + scale * (c - u). Give each pair the same SamplingParams, seed included
  (`guidance_params`): the pair then draws the same token, and the two rows stay one sequence
  each side of the guidance.
- `AllowedTokens`: every id outside [lo, hi) is removed (e.g. image tokens only).
- `chain`: several processors in order.
"""
from __future__ import annotations

import secrets
from dataclasses import replace

import torch

from ..errors import SamplingParamsError

NEG_INF = float("-inf")


class ClassifierFreeGuidance:
    """Mix conditional rows [0, N) with unconditional rows [N, 2N): both get u + scale * (c - u)."""

    def __init__(self, scale: float):
        if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
            raise SamplingParamsError(f"guidance scale {scale!r}: must be a finite number")
        self.scale = float(scale)

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        B = logits.shape[0]
        if B % 2:
            raise ValueError(f"classifier-free guidance: {B} rows, expected conditional rows then as many unconditional ones")
        c, u = logits.float().chunk(2)  # (N, V) each
        mixed = u + self.scale * (c - u)
        return torch.cat([mixed, mixed])


class AllowedTokens:
    """Keep ids in [lo, hi) only."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        out = torch.full_like(logits, NEG_INF)
        out[:, self.lo:self.hi] = logits[:, self.lo:self.hi]
        return out


def chain(*processors):
    """One processor applying `processors` in order (None entries skipped)."""
    procs = [p for p in processors if p is not None]

    def run(logits, step):
        for p in procs:
            logits = p(logits, step)
        return logits

    return run


def guidance_params(params: list) -> list:
    """SamplingParams of conditional rows -> those of the conditional then unconditional rows, each
    pair with one seed (a missing seed is drawn here, so the pair still agrees)."""
    seeded = [p if p.seed is not None or p.greedy else replace(p, seed=secrets.randbits(63)) for p in params]
    if any(p.n != 1 for p in seeded):
        raise SamplingParamsError("classifier-free guidance: give one row per sequence (n=1)")
    return seeded + seeded
