"""The request side of a generation engine, shared by the PyTorch `Engine` and the ONNX Runtime
`OrtEngine`: merging sampling parameters with the model's defaults, prompt checks, capacity
checks, the generate/stream loop and its output objects. Torch-free.

A backend subclass provides `cfg` (vocab_size, eos_token_ids, max_seq_len) and `_start()`, which
returns a `Generation`: prefill logits for the prompts, then `step(tokens, active)` per token, with
a sampler built for its array type (torch or numpy). Everything else is this module's.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Iterator, Optional, Sequence, Union

from ..errors import CapacityError
from .params import SamplingParams
from .requests import Completion, RequestOutput, StreamChunk


class Generation:
    """One batch in flight: the backend's sampler, and logits (B, V) for the next token."""

    def __init__(self, sampler, logits, step_fn):
        self.sampler = sampler
        self.logits = logits
        self._step_fn = step_fn  # (tokens (B,), active list of bool) -> logits (B, V)

    def step(self, tokens, active: list) -> None:
        self.logits = self._step_fn(tokens, active)


class GenerationFrontend:
    """`generate()` and `stream()` over a backend's `_start()`."""

    tokenizer = None
    defaults: dict

    @property
    def cfg(self):
        raise NotImplementedError

    def _start(self, prompts: list, params: list) -> Generation:
        raise NotImplementedError

    def params(self, params: Optional[SamplingParams] = None, **overrides) -> SamplingParams:
        """Generation defaults, then `params`, then keyword overrides; the model's eos ids always stop."""
        names = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown sampling option(s): {unknown}")
        base = params if params is not None else SamplingParams(**self.defaults)
        p = replace(base, **overrides)
        stops = tuple(dict.fromkeys(tuple(p.stop_token_ids) + tuple(self.cfg.eos_token_ids)))
        return replace(p, stop_token_ids=stops).validate()

    def encode(self, prompt: Union[str, Sequence[int]]) -> list:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer (tokenizer.json in the model folder)")
            return self.tokenizer.encode(prompt).ids
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {self.cfg.vocab_size}")
        return ids

    def check_request(self, b: int, ids: list, p: SamplingParams, extra: int = 0) -> None:
        """Raise before any allocation if prompt + new tokens (+ `extra` draft slots) exceed the context."""
        ctx = self.cfg.max_seq_len
        if not ids:
            raise ValueError(f"prompt {b} is empty")
        if len(ids) + p.max_new_tokens + extra > ctx:
            more = f" + {extra} draft slots" if extra else ""
            raise CapacityError(f"prompt {b}: {len(ids)} prompt + {p.max_new_tokens} new tokens{more} exceed "
                                f"the model's context of {ctx} positions")
        if p.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def without_eos(self, p: SamplingParams) -> SamplingParams:
        eos = set(self.cfg.eos_token_ids)
        return replace(p, stop_token_ids=tuple(t for t in p.stop_token_ids if t not in eos))

    def _run(self, prompts: list, params: list, ignore_eos: bool = False) -> Iterator[tuple]:
        """Yield (row, token_id, text_piece, logprob, finish_reason) for every generated token."""
        for b, (ids, p) in enumerate(zip(prompts, params)):
            self.check_request(b, ids, p)
        if ignore_eos:
            params = [self.without_eos(p) for p in params]
        B = len(prompts)
        gen = self._start(prompts, params)
        rows = [RequestOutput(p, self.tokenizer, ids) for p, ids in zip(params, prompts)]
        done = [False] * B
        step = 0
        while not all(done):
            tokens, logprobs = gen.sampler.sample(gen.logits, step)
            gen.sampler.update(tokens)
            toks = tokens.tolist()
            lps = logprobs.tolist() if logprobs is not None else [None] * B
            for b in range(B):
                if not done[b]:
                    piece, reason = rows[b].add(toks[b])
                    done[b] = reason is not None
                    yield b, toks[b], piece, lps[b] if params[b].logprobs else None, reason
            step += 1
            if not all(done):
                gen.step(tokens, [not d for d in done])

    def generate(self, prompts, params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
                 **overrides) -> list:
        """Complete one prompt (str or ids) or a list of them; returns a list of `Completion`.

        `params` may also be a list with one SamplingParams per prompt."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise ValueError("generate() got no prompts")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        plist = [self.params(p, **overrides) for p in plist]
        ids = [self.encode(p) for p in prompts]
        out = [Completion([], "" if self.tokenizer else None, [] if p.logprobs else None, "length") for p in plist]
        for b, t, piece, lp, reason in self._run(ids, plist, ignore_eos):
            c = out[b]
            c.token_ids.append(t)
            if c.text is not None:
                c.text += piece
            if c.logprobs is not None:
                c.logprobs.append(lp)
            if reason is not None:
                c.finish_reason = reason
        return out

    def stream(self, prompt, params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
               **overrides) -> Iterator[StreamChunk]:
        """Yield a `StreamChunk` per generated token of one prompt as soon as it is sampled."""
        p = self.params(params, **overrides)
        for _, t, piece, lp, reason in self._run([self.encode(prompt)], [p], ignore_eos):
            yield StreamChunk(t, piece, lp, reason)
