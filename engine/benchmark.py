"""Decode/prefill throughput of the engine on a model: the measurement behind `mmfuse bench`."""
from __future__ import annotations

import statistics
import time

import torch

from .generate import DecodeState
from .model import Decoder


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def weight_bytes(model: Decoder) -> int:
    """Bytes read per decode step for the weights (tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def bench_decode(model: Decoder, batch: int, prompt_len: int, new_tokens: int, repeats: int = 3,
                 cuda_graph: bool = False, seed: int = 0) -> dict:
    """Greedy prefill + decode of random prompts; medians over `repeats` runs.

    Returns prefill seconds, decode seconds per step, tokens/s for both, and the weight bytes."""
    g = torch.Generator().manual_seed(seed)
    dev = model.lm_head.weight.device
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g).tolist()
    state = DecodeState(model, batch, prompt_len + new_tokens, cuda_graph=cuda_graph)
    prefill, step = [], []
    for r in range(repeats + 1):  # the first run warms up (and captures the CUDA graph)
        _sync(dev)
        t0 = time.perf_counter()
        logits = state.prefill(prompts)
        _sync(dev)
        t1 = time.perf_counter()
        tok = logits.argmax(-1)
        for _ in range(new_tokens - 1):
            tok = state.decode(tok).argmax(-1)
        _sync(dev)
        t2 = time.perf_counter()
        if r:
            prefill.append(t1 - t0)
            step.append((t2 - t1) / max(new_tokens - 1, 1))
    p, s = statistics.median(prefill), statistics.median(step)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "prefill_s": p,
            "prefill_tok_s": batch * prompt_len / p, "step_s": s, "decode_tok_s": batch / s,
            "weight_bytes": weight_bytes(model)}
