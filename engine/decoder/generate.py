"""Generation over a static KV cache: batched prefill, decode, streaming, multi-token verification.

`DecodeState` owns one batch's cache and per-row lengths. Prompts of different lengths are right-
padded for one prefill call; each row then decodes at its own position, so every row gets exactly
what it would get alone. `forward()` with k tokens and `truncate()` are the verification and
rollback steps a speculative decoder needs. `Engine` adds tokenization, sampling, stop handling
and streaming on top.

Concurrency: a `DecodeState` belongs to one caller at a time. `Engine` is safe to share between
threads: each `generate()` / `stream()` call decodes in a `DecodeState` of its own, taken from the
engine's idle one when it fits and returned when the call ends (a stream: when it is exhausted or
closed), so concurrent calls and interleaved streams never share a KV cache, none waits for
another, and each gets exactly what it would get alone.
"""
from __future__ import annotations

import operator
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from mmfuse.kernels.cpu_linear import freeze

from ..checkpoint import read_json
from ..errors import CapacityError, PromptError, SamplingParamsError
from ..generation.detokenize import StopStringMatcher, open_decoder
from ..generation.sampling import ALIASES, Sampler, SamplingParams, resolve_aliases
from ..tokenizer import check_text, load_tokenizer
from .kv_cache import KVCache
from .loader import load_decoder
from .transformer import Decoder


_CAPTURE_LOCK = threading.Lock()


class DecodeState:
    """The KV cache of a batch of sequences and how many positions each row holds."""

    def __init__(self, model: Decoder, batch: int, max_len: int, cuda_graph: bool = False):
        p = model.lm_head.weight
        self.model = freeze(model)  # weights are constants while decoding: the CPU may pack them
        self.cache = KVCache.allocate(model.cfg, batch, max_len, p.dtype, p.device)
        model.ensure_positions(max_len)  # RoPE tables for what the cache holds, built here, not mid-graph
        self.lengths = torch.zeros(batch, dtype=torch.long, device=p.device)  # (B,) filled positions
        self._host_lengths = [0] * batch  # mirror of `lengths`, so capacity checks need no device sync
        self.cuda_graph = cuda_graph and p.is_cuda
        self._graph = None

    @property
    def batch(self) -> int:
        return self.cache.batch

    def _check_room(self, extra: Sequence[int]) -> None:
        for b, (n, k) in enumerate(zip(self._host_lengths, extra)):
            if n + k > self.cache.max_len:
                raise CapacityError(f"row {b}: {n} cached + {k} new positions exceed the KV cache of "
                                    f"{self.cache.max_len} positions")

    @property
    def filled(self) -> list:
        """Positions each row holds."""
        return list(self._host_lengths)

    def grow(self, max_len: int) -> None:
        """Reallocate the cache to `max_len` positions, keeping what every row holds."""
        if max_len <= self.cache.max_len:
            return
        old, n = self.cache, max(self._host_lengths)
        self.cache = KVCache.allocate(self.model.cfg, self.batch, max_len, old.k.dtype, old.k.device)
        self.cache.k[..., :n, :] = old.k[..., :n, :]
        self.cache.v[..., :n, :] = old.v[..., :n, :]
        self._graph = None  # captured on the old buffers

    def reset(self) -> None:
        self.lengths.zero_()
        self._host_lengths = [0] * self.batch

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], embeds: Optional[Sequence[Optional[torch.Tensor]]] = None,
                start: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run the prompts (one per row, any lengths >= 1); logits (B, V) at each last token.

        From position 0, or after the first `start[b]` cached positions of each row (a reused
        prefix: those stay, the rest is overwritten). `embeds[b]` (T_b, C), where given, replaces
        row b's token embeddings (multimodal prompts); the ids then only fill the bookkeeping."""
        if len(prompts) != self.batch:
            raise ValueError(f"prefill got {len(prompts)} prompts for a batch of {self.batch}")
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError(f"prompt {lens.index(min(lens))} is empty")
        start = [0] * self.batch if start is None else [int(s) for s in start]
        self.truncate(start)
        T, dev = max(lens), self.lengths.device
        self._check_room([T] * self.batch)  # padded rows write (and later overwrite) up to T positions
        ids = torch.zeros(self.batch, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids = ids.to(dev)
        x = None
        if embeds is not None and any(e is not None for e in embeds):
            x = self.model.embed(ids)  # (B, T, C)
            for b, e in enumerate(embeds):
                if e is not None:
                    if e.shape != (lens[b], x.shape[-1]):
                        raise ValueError(f"row {b}: embeddings of shape {tuple(e.shape)}, expected ({lens[b]}, {x.shape[-1]})")
                    x[b, : lens[b]] = e.to(x.dtype)
        first = torch.as_tensor(start, device=dev)
        positions = first[:, None] + torch.arange(T, device=dev)  # (B, T)
        last = torch.as_tensor(lens, device=dev) - 1
        logits = self.model(ids, positions, self.cache, kv_len=first + T, logits_index=last, embeds=x)[:, 0]  # (B, V)
        self.lengths.copy_(first + last + 1)
        self._host_lengths = [s + n for s, n in zip(start, lens)]
        return logits

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append k tokens per row (B, k) after each row's cached positions; logits (B, k, V).

        With k > 1 this verifies proposed tokens in one call; `truncate()` rolls back the rejected ones."""
        B, k = tokens.shape
        self._check_room([k] * B)
        positions = self.lengths[:, None] + torch.arange(k, device=tokens.device)  # (B, k)
        logits = self.model(tokens, positions, self.cache, kv_len=self.lengths + k)
        self.lengths += k
        self._host_lengths = [n + k for n in self._host_lengths]
        return logits

    def truncate(self, lengths: Sequence[int]) -> None:
        """Roll rows back to `lengths` cached positions (never forward); later writes overwrite the rest."""
        if any(n > m or n < 0 for n, m in zip(lengths, self._host_lengths)) or len(lengths) != self.batch:
            raise ValueError(f"truncate to {list(lengths)}: must be one length per row within {self._host_lengths}")
        self._host_lengths = list(lengths)
        self.lengths.copy_(torch.as_tensor(self._host_lengths, device=self.lengths.device))

    def _decode_step(self, tok: torch.Tensor) -> torch.Tensor:
        """(B, 1) tokens at each row's next position -> (B, V); reads only tensors, so it can be graphed."""
        return self.model(tok, self.lengths[:, None], self.cache, kv_len=self.lengths + 1)[:, 0]

    def _capture(self, tok: torch.Tensor) -> None:
        self._tok = tok.clone()
        if self.model.pos_embed is None:  # the graph reads these tables: keep them alive if they grow
            self._rope = (self.model.rope_cos, self.model.rope_sin)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up writes only the slot the first replay overwrites
            for _ in range(2):
                self._decode_step(self._tok)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        # One capture at a time; "thread_local" lets other threads' decode calls run meanwhile.
        with _CAPTURE_LOCK, torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._logits = self._decode_step(self._tok)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One token per row (B,); rows where `active` is False do not advance. Logits (B, V)."""
        tok = tokens.view(-1, 1)
        self._check_room([1] * self.batch)
        if self.cuda_graph:
            if self._graph is None:
                self._capture(tok)
            self._tok.copy_(tok)
            self._graph.replay()
            logits = self._logits
        else:
            logits = self._decode_step(tok)
        if active is None:
            self.lengths += 1
            self._host_lengths = [n + 1 for n in self._host_lengths]
        else:
            self.lengths += active.to(self.lengths.dtype)
            self._host_lengths = [n + int(a) for n, a in zip(self._host_lengths, active.tolist())]
        return logits


@dataclass
class Completion:
    token_ids: list            # generated ids (a final stop id included, as transformers does)
    text: Optional[str]        # decoded text, stop strings and stop ids excluded (None without a tokenizer)
    logprobs: Optional[list]   # log p of each generated token under the raw model logits
    finish_reason: str         # "stop" (stop id or stop string) or "length"


@dataclass
class StreamChunk:
    token_id: int
    text: str                  # newly completed text ("" while it may still be part of a stop string)
    logprob: Optional[float]
    finish_reason: Optional[str]  # set on the last chunk


_GEN_CONFIG_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
                      "repetition_penalty")


def defaults_from_generation_config(folder) -> dict:
    """SamplingParams defaults from generation_config.json (do_sample=false means greedy)."""
    gc = read_json(Path(folder) / "generation_config.json", required=False) or {}
    out = {k: gc[k] for k in _GEN_CONFIG_FIELDS if gc.get(k) is not None}
    if not gc.get("do_sample", False) and gc:
        out["temperature"] = 0.0
    eos = gc.get("eos_token_id")
    if eos is not None:
        out["stop_token_ids"] = tuple(eos) if isinstance(eos, list) else (eos,)
    return out


class RequestOutput:
    """Bookkeeping of one generated sequence: incremental text, stop ids, stop strings, length."""

    def __init__(self, params: SamplingParams, tokenizer, prompt_ids: Sequence[int]):
        self.params = params
        self.detok = open_decoder(tokenizer, prompt_ids=prompt_ids) if tokenizer is not None else None
        self.stops = StopStringMatcher(params.stop_strings) if params.stop_strings else None
        self.stop_ids = set(params.stop_token_ids)
        self.n = 0

    def add(self, token: int) -> tuple:
        """Record one generated token: (newly released text, finish reason or None)."""
        self.n += 1
        stop_id = token in self.stop_ids
        piece = self.detok.push(token) if self.detok is not None and not stop_id else ""
        if self.stops is not None:
            piece = self.stops.push(piece)
        reason = "stop" if stop_id or (self.stops is not None and self.stops.stopped) else None
        if reason is None and self.n >= self.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            piece += self._final_text()
        return piece, reason

    def _final_text(self) -> str:
        """Text still held back when the row ends (partial characters, a possible stop-string start)."""
        if self.stops is not None and self.stops.stopped:
            return ""
        tail = self.detok.flush() if self.detok is not None else ""
        if self.stops is not None:
            tail = self.stops.push(tail)
            tail += "" if self.stops.stopped else self.stops.flush()
        return tail


class Engine:
    """A decoder with its tokenizer and generation defaults: `generate()` and `stream()`.

    Thread-safe: every call (and every open stream) decodes in a KV cache of its own, so one
    Engine may serve several threads, and one thread may interleave several streams. The engine
    keeps one idle cache for reuse; concurrent calls each hold one while they run."""

    def __init__(self, model: Decoder, tokenizer=None, defaults: Optional[dict] = None, cuda_graph: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = dict(defaults or {})
        self.cuda_graph = cuda_graph
        self._idle: Optional[DecodeState] = None  # the cache (and CUDA graph) of a finished call
        self._idle_lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu", cuda_graph: bool = False) -> "Engine":
        """Model, tokenizer.json and generation_config.json of a checkpoint folder; dtype "auto": the
        checkpoint's own."""
        folder = Path(folder)
        model = load_decoder(folder, dtype=dtype, device=device)
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        return cls(model, tok, defaults_from_generation_config(folder), cuda_graph=cuda_graph)

    def params(self, params: Optional[SamplingParams] = None, **overrides) -> SamplingParams:
        """Generation defaults, then `params`, then keyword overrides (SamplingParams fields or their
        ALIASES); the model's eos ids always stop."""
        names = {f.name for f in fields(SamplingParams)}
        unknown = sorted(set(overrides) - names - set(ALIASES))
        if unknown:
            raise SamplingParamsError(f"unknown sampling option(s): {unknown}")
        base = params if params is not None else SamplingParams(**self.defaults)
        p = replace(base, **resolve_aliases(overrides, base.temperature))
        stops = tuple(dict.fromkeys(tuple(p.stop_token_ids) + tuple(self.model.cfg.eos_token_ids)))
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
        bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise PromptError(f"{where}: token ids {bad[:5]} are outside the vocabulary of {self.model.cfg.vocab_size}")
        return ids

    def _take_state(self, batch: int, max_len: int) -> DecodeState:
        """The idle cache (and its CUDA graph) when the batch matches and it is large enough, else a new one."""
        with self._idle_lock:
            s, self._idle = self._idle, None
        if s is not None and (s.batch != batch or s.cache.max_len < max_len):
            s = None  # free the idle cache before allocating the new one
        return s if s is not None else DecodeState(self.model, batch, max_len, cuda_graph=self.cuda_graph)

    def _give_back(self, state: DecodeState) -> None:
        with self._idle_lock:
            self._idle = state

    def prefill(self, state: DecodeState, prompts: list) -> torch.Tensor:
        """Run the prompts into `state` from position 0: logits (B, V). Multimodal engines override it
        to splice image features into the embeddings; decoding after it is the same for all."""
        return state.prefill(prompts)

    def check_request(self, b: int, ids: list, p: SamplingParams, extra: int = 0) -> None:
        """Raise before any allocation if prompt + new tokens (+ `extra` draft slots) exceed the context."""
        ctx = self.model.cfg.max_seq_len
        if not ids:
            raise PromptError(f"prompt {b} is empty")
        if len(ids) + p.max_new_tokens + extra > ctx:
            more = f" + {extra} draft slots" if extra else ""
            raise CapacityError(f"prompt {b}: {len(ids)} prompt + {p.max_new_tokens} new tokens{more} exceed "
                                f"the model's context of {ctx} positions")
        if p.stop_strings and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def without_eos(self, p: SamplingParams) -> SamplingParams:
        eos = set(self.model.cfg.eos_token_ids)
        return replace(p, stop_token_ids=tuple(t for t in p.stop_token_ids if t not in eos))

    def _run(self, prompts: list, params: list, ignore_eos: bool = False) -> Iterator[tuple]:
        """Yield (row, token_id, text_piece, logprob, finish_reason) for every generated token."""
        for b, (ids, p) in enumerate(zip(prompts, params)):
            self.check_request(b, ids, p)
        B = len(prompts)
        if ignore_eos:
            params = [self.without_eos(p) for p in params]
        dev = self.model.lm_head.weight.device
        sampler = Sampler(params, self.model.cfg.vocab_size, dev, prompts)
        rows = [RequestOutput(p, self.tokenizer, ids) for p, ids in zip(params, prompts)]
        done = [False] * B
        state = self._take_state(B, max(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)))
        try:
            logits = self.prefill(state, prompts)
            step = 0
            while not all(done):
                tokens, logprobs = sampler.sample(logits, step)
                sampler.update(tokens)
                toks = tokens.tolist()
                lps = logprobs.tolist() if logprobs is not None else [None] * B
                for b in range(B):
                    if not done[b]:
                        piece, reason = rows[b].add(toks[b])
                        done[b] = reason is not None
                        yield b, toks[b], piece, lps[b] if params[b].logprobs else None, reason
                step += 1
                if not all(done):
                    active = torch.tensor([not d for d in done], device=dev)
                    logits = state.decode(tokens, active)
        finally:
            self._give_back(state)

    def generate(self, prompts, params: Optional[SamplingParams] = None, *, ignore_eos: bool = False,
                 **overrides) -> list:
        """Complete one prompt (str or ids) or a list of them; returns a list of `Completion`, `n`
        per prompt in prompt order (n > 1: the j-th of a prompt uses seed + j when a seed is set).

        `params` may also be a list with one SamplingParams per prompt."""
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
        if p.n != 1:
            raise SamplingParamsError(f"SamplingParams.n={p.n}: stream() yields one sequence; use generate() for n > 1")
        for _, t, piece, lp, reason in self._run([self.encode(prompt)], [p], ignore_eos):
            yield StreamChunk(t, piece, lp, reason)
