"""Prefill and decode throughput, measured the same way for the engine and for a peer.

A generator function `run(n)` produces n new tokens for a whole batch. Prefill time is the median
time of run(1); decode time per step is (median run(N) - median run(1)) / (N - 1). Applying the
same method to the engine and to transformers `generate` keeps the comparison fair: both include
their own sampling and bookkeeping.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .generate import Engine
from .transformer import Decoder


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step for the weights: parameters and stored buffers (quantized
    weights, scales), tied tensors counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def time_generation(run: Callable[[int], object], batch: int, prompt_len: int, new_tokens: int,
                    repeats: int = 3, device="cpu") -> dict:
    def timed(n):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(n)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(new_tokens)  # warm-up (and CUDA-graph capture)
    t1 = statistics.median(timed(1) for _ in range(repeats))
    tn = statistics.median(timed(new_tokens) for _ in range(repeats))
    step = max(tn - t1, 1e-9) / (new_tokens - 1)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "prefill_s": t1,
            "prefill_tok_s": batch * prompt_len / t1, "step_s": step, "decode_tok_s": batch / step}


def random_prompts(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()


def bench_engine(model: Decoder, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                 cuda_graph: bool = False) -> dict:
    """Greedy generation of random prompts with the engine (eos ignored, so every run is full length)."""
    engine = Engine(model, cuda_graph=cuda_graph)
    prompts = random_prompts(model.cfg.vocab_size, batch, prompt_len)
    dev = model.norm_f.weight.device

    def run(n):
        engine.generate(prompts, temperature=0.0, max_new_tokens=n, ignore_eos=True)

    with torch.inference_mode():
        return time_generation(run, batch, prompt_len, new_tokens, repeats, dev)
