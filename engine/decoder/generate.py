"""Generation over a static KV cache: batched prefill, decode, streaming, multi-token verification.

`DecodeState` wires a model to one batch's `KVCache` (which owns the writes, per-row lengths and
rollback). Prompts of different lengths are right-padded for one prefill call; each row then
decodes at its own position, so every row gets exactly what it would get alone. `forward()` with k
tokens and `cache.truncate()` are the verification and rollback steps a speculative decoder needs.
`Engine` adds tokenization, the sampler, stop handling and streaming on top.

Concurrency: a `DecodeState` belongs to one caller at a time. `Engine` is safe to share between
threads: each `generate()` / `stream()` call decodes in a `DecodeState` of its own, taken from the
engine's idle one when it fits and returned when the call ends (a stream: when it is exhausted or
closed), so concurrent calls and interleaved streams never share a KV cache, none waits for
another, and each gets exactly what it would get alone.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from mmfuse import envs
from mmfuse.kernels import get_backend
from mmfuse.kernels.cpu_linear import freeze

from ..generation.frontend import Generation, GenerationFrontend
from ..generation.requests import defaults_from_generation_config
from ..generation.sampling import Sampler
from ..nn.weight_arena import relocate
from ..tokenizer import load_tokenizer
from .fused_step import FusedStep
from .kv_cache import KVCache
from .loader import load_decoder
from .transformer import Decoder


_CAPTURE_LOCK = threading.Lock()
# Calls of several tokens per row (verification, prompt continuations) with at most this many tokens
# in all rows run on the fused step; past it the per-op path's matrix products win on GPT-2-small-sized
# models (bench/bench_fused_rows.py, bench/README.md).
FUSED_MAX_ROWS = 8
# A prompt continuation (the LM head of its last token only) on a narrow model runs fused up to this
# many tokens: there the per-op path's 15 ops a layer cost more than the fused kernels lose to its
# matrix products (SmolLM2-135M, 30 x 576: a 27-token follow-up question 1.2x faster fused; GPT-2's
# 768 wide layers: 0.77x at 24 tokens; bench/README.md).
FUSED_PREFILL_NARROW_ROWS, NARROW_D_MODEL = 32, 640


class DecodeState:
    """A model and the KV cache of one batch: prefill, multi-token verification and decode steps,
    with the decode step captured in a CUDA graph when asked. The cache owns its writes, lengths
    and rollback; this class only decides what each call feeds the model."""

    def __init__(self, model: Decoder, batch: int, max_len: int, cuda_graph: bool = False):
        p = model.norm_f.weight  # float in quantized models too
        relocate(model)  # once per model: its weights stream faster from huge pages
        self.model = freeze(model)  # weights are constants while decoding: the CPU may pack them
        self.cache = KVCache(model.cfg, batch, max_len, p.dtype, p.device)
        model.ensure_positions(max_len)  # RoPE tables for what the cache holds, built here, not mid-graph
        self.cuda_graph = cuda_graph and p.is_cuda
        self._graph = None
        self._graph_version = None  # the cache's buffers the graph was captured on
        self._fused = {}  # MMFUSE_INT8_ACTIVATIONS -> the fused CPU step (or None: not supported), built on first use

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], embeds: Optional[Sequence[Optional[torch.Tensor]]] = None,
                start: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Run the prompts (one per row, any lengths >= 1); logits (B, V) at each last token.

        From position 0, or after the first `start[b]` cached positions of each row (a reused
        prefix: those stay, the rest is overwritten). `embeds[b]` (T_b, C), where given, replaces
        row b's token embeddings (multimodal prompts); the ids then only fill the bookkeeping."""
        cache = self.cache
        if len(prompts) != cache.batch:
            raise ValueError(f"prefill got {len(prompts)} prompts for a batch of {cache.batch}")
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError(f"prompt {lens.index(min(lens))} is empty")
        start = [0] * cache.batch if start is None else [int(s) for s in start]
        cache.truncate(start)
        cache.tokens = None  # the owner records what a prefill wrote (see `KVCache.tokens`)
        T, dev = max(lens), cache.lengths.device
        cache.check_room([T] * cache.batch)  # padded rows write (and later overwrite) up to T positions
        ids = torch.zeros(cache.batch, T, dtype=torch.long)
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
        if x is None and sum(lens) <= self._fused_prefill_rows() and (fused := self._fused_step()) is not None:
            logits = self._fused_prefill(fused, prompts, lens)
        else:
            positions = cache.next_positions(T)  # (B, T) from each row's start
            last = torch.as_tensor(lens, device=dev) - 1
            logits = self.model(ids, positions, cache, kv_len=cache.lengths + T, logits_index=last, embeds=x)[:, 0]  # (B, V)
        cache.advance(lens)
        return logits

    def _fused_prefill_rows(self) -> int:
        """The most prompt tokens (all rows together) a prefill runs on the fused step."""
        narrow = self.model.cfg.d_model <= NARROW_D_MODEL
        return max(FUSED_MAX_ROWS, FUSED_PREFILL_NARROW_ROWS if narrow else 0)

    def _fused_prefill(self, fused: FusedStep, prompts: Sequence[Sequence[int]], lens: list) -> torch.Tensor:
        """A short prefill as rows of the fused step (no padding): logits (B, V) at each last token."""
        n = torch.as_tensor(lens)
        rows = torch.arange(len(lens)).repeat_interleave(n)  # (R,) the cache row of every token
        ends = n.cumsum(0)
        positions = self.cache.lengths[rows] + torch.arange(int(ends[-1])) - (ends - n)[rows]
        tokens = torch.as_tensor([t for p in prompts for t in p], dtype=torch.long)
        return fused.rows(tokens, rows, positions, self.cache, *self._rope(), logits_index=ends - 1)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append k tokens per row (B, k) after each row's cached positions; logits (B, k, V).

        With k > 1 this verifies proposed tokens in one call; `cache.truncate()` rolls back the rejected ones."""
        B, k = tokens.shape
        cache = self.cache
        cache.check_room([k] * B)
        if cache.tokens is not None:
            cache.record(tokens[0].tolist())
        if (k == 1 or B * k <= FUSED_MAX_ROWS) and (fused := self._fused_step()) is not None:
            logits = fused.append(tokens, cache, *self._rope())
        else:
            logits = self.model(tokens, cache.next_positions(k), cache, kv_len=cache.lengths + k)
        cache.advance(k)
        return logits

    def _rope(self) -> tuple:
        """The model's RoPE tables (cos, sin) for every position of the cache (which `grow` may have
        lengthened), or (None, None) with learned positions."""
        if self.model.pos_embed is not None:
            return None, None
        self.model.ensure_positions(self.cache.max_len)
        return self.model.rope_cos, self.model.rope_sin

    def _fused_step(self) -> Optional[FusedStep]:
        """The fused CPU decode step (fused_step.py) when enabled, the attention backend is not forced
        to one of the per-op ones (`set_backend`, MMFUSE_ATTENTION) and the model is one it runs."""
        if (self.cuda_graph or self.cache.k.device.type != "cpu" or not envs.read("MMFUSE_FUSED_DECODE")
                or get_backend() != "auto"):
            return None
        int_dots = envs.read("MMFUSE_INT8_ACTIVATIONS")
        if int_dots not in self._fused:
            with torch.inference_mode():  # a first decode step may build it, outside any inference mode
                self._fused[int_dots] = FusedStep.build(self.model, self.cache.batch, int_dots)
        return self._fused[int_dots]

    def _decode_step(self, tok: torch.Tensor) -> torch.Tensor:
        """(B, 1) tokens at each row's next position -> (B, V); reads only tensors, so it can be graphed."""
        cache = self.cache
        return self.model(tok, cache.lengths[:, None], cache, kv_len=cache.lengths + 1)[:, 0]

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
        self._graph_version = self.cache.version

    def decode(self, tokens: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One token per row (B,); rows where `active` is False do not advance. Logits (B, V).

        The fused CPU step's path runs no tensor op it can avoid (no inference-mode context, tokens
        as they come, lengths advanced through a numpy view): once a step has streamed the weights
        through the caches each costs 30-200 us, ~1 ms a token in all before (bench/README.md)."""
        cache = self.cache
        cache.check_room([1] * cache.batch)
        if cache.tokens is not None and (active is None or bool(active[0])):
            cache.record(tokens.view(-1)[:1].tolist())
        if (fused := None if self.cuda_graph else self._fused_step()) is not None:
            logits = fused(tokens, cache, *self._rope())  # C++ on raw pointers: no autograd
        else:
            with torch.inference_mode():
                logits = self._graph_or_model_step(tokens.view(-1, 1))
        cache.advance(1 if active is None else active)
        return logits

    def _graph_or_model_step(self, tok: torch.Tensor) -> torch.Tensor:
        """(B, 1) tokens -> logits (B, V) through the CUDA graph (captured on first use or after the
        cache grew) or the model's forward."""
        if not self.cuda_graph:
            return self._decode_step(tok)
        if self._graph is None or self._graph_version != self.cache.version:
            self._capture(tok)
        self._tok.copy_(tok)
        self._graph.replay()
        return self._logits


class Engine(GenerationFrontend):
    """A decoder with its tokenizer and generation defaults: `generate()` and `stream()` (the
    request side is `GenerationFrontend`, shared with the ONNX Runtime engine).

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

    @property
    def cfg(self):
        return self.model.cfg

    @classmethod
    def from_pretrained(cls, folder, dtype="auto", device="cpu", cuda_graph: bool = False, quantize=None) -> "Engine":
        """Model, tokenizer.json and generation_config.json of a checkpoint folder; dtype "auto": the
        checkpoint's own. `quantize`: None, "int8", "int4" ("int4-g32", "int8-asym", ...), a
        `mmfuse.quant.QuantConfig` or a dict of its fields: weight-only quantization at load time
        (GPTQ/AWQ/mmfuse-quantized folders load quantized without it)."""
        folder = Path(folder)
        model = load_decoder(folder, dtype=dtype, device=device, quantize=quantize)
        tok = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
        return cls(model, tok, defaults_from_generation_config(folder), cuda_graph=cuda_graph)

    def _take_state(self, batch: int, max_len: int) -> DecodeState:
        """The idle cache (and its CUDA graph) when the batch matches and it is large enough, else a new one."""
        with self._idle_lock:
            s, self._idle = self._idle, None
        if s is not None and (s.cache.batch != batch or s.cache.max_len < max_len):
            s = None  # free the idle cache before allocating the new one
        return s if s is not None else DecodeState(self.model, batch, max_len, cuda_graph=self.cuda_graph)

    def _give_back(self, state: DecodeState) -> None:
        with self._idle_lock:
            self._idle = state

    def prefill(self, state: DecodeState, prompts: list) -> torch.Tensor:
        """Run the prompts into `state` from position 0: logits (B, V). Multimodal engines override it
        to splice image features into the embeddings; decoding after it is the same for all."""
        return state.prefill(prompts)

    def _start(self, prompts: list, params: list) -> Generation:
        dev = self.model.norm_f.weight.device  # float in quantized models too
        sampler = Sampler(params, self.model.cfg.vocab_size, dev, prompts)
        state = self._take_state(len(prompts), max(len(ids) + p.max_new_tokens for ids, p in zip(prompts, params)))
        try:
            logits = self.prefill(state, prompts)
        except BaseException:
            self._give_back(state)
            raise

        def step(tokens, active):
            return state.decode(tokens, None if all(active) else torch.tensor(active, device=dev))

        return Generation(sampler, logits, step, close=lambda: self._give_back(state))
