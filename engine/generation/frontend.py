"""The request side of a generation engine, shared by the PyTorch `Engine` and the ONNX Runtime
`OrtEngine`: merging sampling parameters with the model's defaults, prompt checks, capacity
checks, the generate/stream loop and its output objects. Torch-free.

A backend subclass provides `cfg` (vocab_size, eos_token_ids, max_seq_len) and `_start()`, which
returns a `Generation`: prefill logits for the prompts, then `step(tokens, active)` per token, with
a sampler built for its array type (torch or numpy). Everything else is this module's.
"""
from __future__ import annotations

import operator
from dataclasses import fields, replace
from typing import Callable, Iterator, Optional, Sequence, Union

from ..errors import CapacityError, PromptError, SamplingParamsError
from ..tokenizer import check_text
from .params import ALIASES, SamplingParams, resolve_aliases
from .requests import Completion, StopTracker, StreamChunk

LogitsProcessor = Callable[[object, int], object]  # (logits (B, V), step) -> logits (B, V), the backend's array type


class Generation:
    """One batch in flight: the backend's sampler, and logits (B, V) for the next token."""

    def __init__(self, sampler, logits, step_fn, close: Optional[Callable[[], None]] = None):
        self.sampler = sampler
        self.logits = logits
        self._step_fn = step_fn  # (tokens (B,), active list of bool) -> logits (B, V)
        self._close = close  # returns the backend's cache when the batch ends

    def step(self, tokens, active: list) -> None:
        self.logits = self._step_fn(tokens, active)

    def close(self) -> None:
        if self._close is not None:
            self._close()


class GenerationFrontend:
    """`generate()` and `stream()` over a backend's `_start()`."""

    tokenizer = None
    defaults: dict
    cfg = None  # the backend's: vocab_size, eos_token_ids, max_seq_len (an attribute or a property)

    def _start(self, prompts: list, params: list) -> Generation:
        raise NotImplementedError

    def params(self, params: Optional[SamplingParams] = None, **overrides) -> SamplingParams:
        """Generation defaults, then `params`, then keyword overrides (SamplingParams fields or their
        ALIASES); the model's eos ids always stop."""
        names = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(overrides) - names - set(ALIASES))
        if unknown:
            raise SamplingParamsError(f"unknown sampling option(s): {unknown}")
        base = params if params is not None else SamplingParams(**self.defaults)
        p = replace(base, **resolve_aliases(overrides, base.temperature))
        stops = tuple(dict.fromkeys(tuple(p.stop_token_ids) + tuple(self.cfg.eos_token_ids)))
        return replace(p, stop_token_ids=stops).validate()

    def encode(self, prompt: Union[str, Sequence[int]], where: str = "prompt") -> list:
        """Token ids of a text prompt, or checked ids; PromptError names `where` when it is bad."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError(f"{where}: a text prompt needs a tokenizer (tokenizer.json in the checkpoint folder)")
            return self.tokenizer.encode(check_text(prompt, where)).ids
        try:
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise PromptError(f"{where}: expected a str or a sequence of int token ids") from None
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise PromptError(f"{where}: token ids {bad[:5]} are outside the vocabulary of {self.cfg.vocab_size}")
        return ids

    def check_request(self, b: int, ids: list, p: SamplingParams, extra: int = 0) -> None:
        """Raise before any allocation if prompt + new tokens (+ `extra` draft slots) exceed the context."""
        ctx = self.cfg.max_seq_len
        if not ids:
            raise PromptError(f"prompt {b} is empty")
        if len(ids) + p.max_new_tokens + extra > ctx:
            more = f" + {extra} draft slots" if extra else ""
            raise CapacityError(f"prompt {b}: {len(ids)} prompt + {p.max_new_tokens} new tokens{more} exceed "
                                f"the model's context of {ctx} positions")
        if p.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def without_eos(self, p: SamplingParams) -> SamplingParams:
        eos = set(self.cfg.eos_token_ids)
        return replace(p, stop_token_ids=tuple(t for t in p.stop_token_ids if t not in eos))

    def _run(self, prompts: list, params: list, ignore_eos: bool = False,
             logits_processor: Optional[LogitsProcessor] = None) -> Iterator[tuple]:
        """Yield (row, token_id, text_piece, logprob, finish_reason) for every generated token."""
        for b, (ids, p) in enumerate(zip(prompts, params)):
            self.check_request(b, ids, p)
        if ignore_eos:
            params = [self.without_eos(p) for p in params]
        B = len(prompts)
        rows = [StopTracker(p, self.tokenizer, ids) for p, ids in zip(params, prompts)]
        gen = self._start(prompts, params)
        try:
            done = [False] * B
            step = 0
            while not all(done):
                logits = gen.logits if logits_processor is None else logits_processor(gen.logits, step)
                tokens, logprobs = gen.sampler.sample(logits, step)
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
        finally:
            gen.close()  # a stream closed early ends here too

    def generate(self, prompts, params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
                 logits_processor: Optional[LogitsProcessor] = None, **overrides) -> list:
        """Complete one prompt (str or ids) or a list of them; returns a list of `Completion`, `n`
        per prompt in prompt order (n > 1: the j-th of a prompt uses seed + j when a seed is set).

        `params` may also be a list with one SamplingParams per prompt. `logits_processor(logits (B, V),
        step) -> (B, V)` rewrites the whole batch's logits before sampling (rows may read each other:
        classifier-free guidance, see `generation.processors`); logprobs then describe its output."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        if not prompts:
            raise ValueError("generate() got no prompts")
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        plist = [self.params(p, **overrides) for p in plist]
        ids = [self.encode(p, f"prompt {b}") for b, p in enumerate(prompts)]
        ids = [i for i, p in zip(ids, plist) for _ in range(p.n)]
        plist = [replace(p, n=1, seed=None if p.seed is None else (p.seed + j) % 2**64)
                 for p in plist for j in range(p.n)]
        out = [Completion([], "" if self.tokenizer else None, [] if p.logprobs else None, "length") for p in plist]
        for b, t, piece, lp, reason in self._run(ids, plist, ignore_eos, logits_processor):
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
        if p.n != 1:
            raise SamplingParamsError(f"SamplingParams.n={p.n}: stream() yields one sequence; use generate() for n > 1")
        for _, t, piece, lp, reason in self._run([self.encode(prompt)], [p], ignore_eos):
            yield StreamChunk(t, piece, lp, reason)
