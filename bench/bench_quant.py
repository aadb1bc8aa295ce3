"""Decode speed of quantized weights on the CPU: fp32, bf16, int8, int4 on the same random weights.

    python bench/bench_quant.py [--models gpt2-124m smollm2-135m] [--batch 1 8] [--formats fp32 int8 int4]
        [--unfused]

Random-init transformers models of each shape are saved as checkpoint folders; mmfuse loads them
once per format (quantizing at load time). Method as `mmfuse bench` (greedy, random prompts, eos
ignored): prefill = median time of a 1-token run, decode step = (median of a full run - prefill)
/ (new tokens - 1). The formats are timed in alternating rounds, so load from other jobs on a
shared machine spreads over all of them. The floor is the weight bytes read per step (quantized
weights, scales and zeros; tied tensors once) / --bandwidth-gbs. `--unfused` adds each format
with the fused CPU decode step switched off (MMFUSE_FUSED_DECODE=0), in the same rounds. Before
and after each model, a bandwidth yardstick: `torch.mv` on a 1 GiB fp32 matrix at the same threads
(what a shared machine lets one process stream just then).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmfuse.decoder.benchmark import random_prompts, weight_bytes
from mmfuse.decoder.generate import Engine
from mmfuse.decoder.loader import load_decoder

from common import median_seconds, unfused

SHAPES = {
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)),
}
FLOAT = ("fp32", "bf16")  # any other format name is a `--quantize` spec on fp32 activations: int8, int4-g32, ...


def save_random_model(shape: str, folder: Path) -> None:
    """A random-init transformers model of the shape, as a checkpoint folder."""
    import transformers

    family, kw = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)


def sgemv_gbs(repeats: int = 5) -> float:
    """GB/s of `torch.mv` reading a 1 GiB fp32 matrix (median of `repeats` after a warm-up)."""
    w, x = torch.randn(16384, 16384), torch.randn(16384)
    return w.numel() * 4 / median_seconds(lambda: torch.mv(w, x), repeats) / 1e9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "int8", "int4"],
                    help="fp32, bf16, or quantization specs (int8, int4, int4-g32, int8-asym, ...)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth-gbs", type=float, default=30.0)
    ap.add_argument("--unfused", action="store_true", help="also time each format without the fused decode step")
    args = ap.parse_args(argv)
    runs = [(fmt, False) for fmt in args.formats] + ([(fmt, True) for fmt in args.formats] if args.unfused else [])
    threads = torch.get_num_threads()
    print(f"{threads} threads, prompt {args.prompt_len} + {args.new_tokens} new tokens, median of {args.repeats} "
          f"alternating rounds, floor at {args.bandwidth_gbs:.0f} GB/s")
    print("| model | format | batch | tok/s | ms/step | x fp32 | weight MB | floor ms | x floor | prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.models:
        print(f"torch.mv on 1 GiB fp32: {sgemv_gbs():.1f} GB/s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf"
            save_random_model(shape, folder)
            models = {}
            for fmt in args.formats:
                models[fmt] = load_decoder(folder, dtype=fmt if fmt in FLOAT else "fp32",
                                           quantize=None if fmt in FLOAT else fmt)
            for bs in args.batch:
                prompts = random_prompts(models[args.formats[0]].cfg.vocab_size, bs, args.prompt_len)
                engines = {fmt: Engine(m) for fmt, m in models.items()}

                def timed(run, n):
                    fmt, off = run
                    t0 = time.perf_counter()
                    with unfused() if off else contextlib.nullcontext():
                        engines[fmt].generate(prompts, temperature=0.0, max_new_tokens=n, ignore_eos=True)
                    return time.perf_counter() - t0

                with torch.inference_mode():
                    for run in runs:
                        timed(run, args.new_tokens)  # warm-up: kernels compiled, caches allocated
                    t1 = {run: [] for run in runs}
                    tn = {run: [] for run in runs}
                    for _ in range(args.repeats):
                        for run in runs:
                            t1[run].append(timed(run, 1))
                            tn[run].append(timed(run, args.new_tokens))
                step = {r: max(statistics.median(tn[r]) - statistics.median(t1[r]), 1e-9) / (args.new_tokens - 1)
                        for r in runs}
                for run in runs:
                    fmt = run[0]
                    m = models[fmt]
                    nbytes = weight_bytes(m)
                    floor = nbytes / (args.bandwidth_gbs * 1e9)
                    name = fmt if getattr(m, "quant_config", None) is None else m.quant_config.name
                    name += " (unfused)" if run[1] else ""
                    base = ("fp32", run[1])
                    rel = f"{step[base] / step[run]:.2f}" if base in step else "-"
                    print(f"| {shape} | {name} | {bs} | {bs / step[run]:.1f} | {step[run] * 1e3:.2f} | {rel} | "
                          f"{nbytes / 1e6:.1f} | {floor * 1e3:.2f} | {step[run] / floor:.2f} | "
                          f"{bs * args.prompt_len / statistics.median(t1[run]):.0f} |", flush=True)
            del models
    print(f"torch.mv on 1 GiB fp32: {sgemv_gbs():.1f} GB/s")


if __name__ == "__main__":
    main()
