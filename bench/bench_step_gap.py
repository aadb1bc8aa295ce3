"""What a decode step's Python costs once the step has streamed the weights through the caches.

A batch-1 decode step reads every weight once (~540 MB for a SmolLM2-135M-shaped fp32 model), which
evicts the interpreter's, torch's and numpy's code and data from the caches; each small operation
between two steps then runs from memory. Two tables:

1. single operations, warm (repeated) and cold (right after reading 540 MB), medians of 40;
2. the time between two consecutive steps of a greedy generation (the fused C++ step's calls for
   the PyTorch `Engine`, `run_with_iobinding` for `OrtEngine`): sampling, stop checks,
   detokenization and the bookkeeping of the next step, medians over 128 tokens.

    python bench/bench_onnx.py --workdir W --models smollm2-135m --engines none   # checkpoint + exports
    python bench/bench_step_gap.py --workdir W
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mmfuse.decoder.benchmark import random_prompts
from mmfuse.decoder.generate import Engine


def op_table(rounds: int = 40) -> None:
    big = torch.ones(540 << 18)  # 540 MiB of fp32
    x = torch.randn(1, 49152)
    n = torch.zeros(1, dtype=torch.long)
    host = n.numpy()

    def inference_mode():
        with torch.inference_mode():
            pass
    ops = {
        "torch: logits.max(dim=-1)": lambda: x.max(dim=-1),
        "torch: lengths += 1": lambda: n.add_(1),
        "torch: torch.empty(1, 49152)": lambda: torch.empty(1, 49152),
        "torch: torch.tensor([True])": lambda: torch.tensor([True]),
        "torch: enter and leave torch.inference_mode()": inference_mode,
        "numpy: argmax of (1, 49152)": lambda: x.numpy().argmax(-1),
        "numpy: a[0] = 5 (item assignment)": lambda: host.__setitem__(0, 5),
        "python: os.environ.get": lambda: os.environ.get("MMFUSE_FUSED_DECODE"),
    }
    print("| operation | warm us | cold us (after reading 540 MB) |\n|---|---|---|")
    for name, op in ops.items():
        times = {}
        for cold in (False, True):
            ts = []
            for _ in range(rounds):
                if cold:
                    big.sum()
                t = time.perf_counter_ns()
                op()
                ts.append(time.perf_counter_ns() - t)
            times[cold] = statistics.median(ts) / 1e3
        print(f"| {name} | {times[False]:.1f} | {times[True]:.1f} |")


def gaps(marks: list) -> float:
    """Median microseconds from the end of one step call to the start of the next (prefill excluded)."""
    return statistics.median(marks[i + 1] - marks[i] for i in range(3, len(marks) - 1, 2)) / 1e3


def engine_gap(engine, wrap_owner, wrap_name: str, prompts, new_tokens: int) -> tuple:
    """(gap us, step ms) of a greedy generation, timing `wrap_owner.wrap_name` calls."""
    marks: list = []
    orig = getattr(wrap_owner, wrap_name)

    def timed(*a, **k):
        marks.append(time.perf_counter_ns())
        r = orig(*a, **k)
        marks.append(time.perf_counter_ns())
        return r

    setattr(wrap_owner, wrap_name, timed)
    try:
        engine.generate(prompts, temperature=0.0, max_new_tokens=4, ignore_eos=True)
        out = []
        for _ in range(3):
            marks.clear()
            engine.generate(prompts, temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
            steps = [marks[i + 1] - marks[i] for i in range(2, len(marks), 2)]
            out.append((gaps(marks), statistics.median(steps) / 1e6))
    finally:
        setattr(wrap_owner, wrap_name, orig)
    return min(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="bench_onnx.py's --workdir (smollm2-135m-hf, -optimized)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    op_table()
    work = Path(args.workdir)
    prompts = random_prompts(49152, 1, 128)
    print("\n| engine (SmolLM2-135M shape, fp32, batch 1) | Python between steps us | step ms |\n|---|---|---|")
    from mmfuse.decoder import fused_step

    g, s = engine_gap(Engine.from_pretrained(work / "smollm2-135m-hf"), fused_step.FusedStep, "_run", prompts,
                      args.new_tokens)
    print(f"| PyTorch Engine (fused step) | {g:.0f} | {s:.2f} |")
    import onnxruntime as ort

    from mmfuse.ort.engine import OrtEngine

    g, s = engine_gap(OrtEngine.from_pretrained(work / "smollm2-135m-optimized", threads=args.threads),
                      ort.InferenceSession, "run_with_iobinding", prompts, args.new_tokens)
    print(f"| OrtEngine (optimised export) | {g:.0f} | {s:.2f} |")


if __name__ == "__main__":
    main()
