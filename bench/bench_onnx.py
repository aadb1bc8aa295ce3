"""ONNX decoders: the PyTorch engine vs OrtEngine (portable and optimised export) vs onnxruntime-genai
on our export and on its own model builder's export; export time vs the model builder.

    python bench/bench_onnx.py                                  # GPT-2-124M and SmolLM2-135M shapes, batch 1 and 8
    python bench/bench_onnx.py --models smollm2-135m --batch 1 --repeats 3

Random-init checkpoints (transformers, saved as folders with a small BPE tokenizer, eos id 0 so the
model builder accepts them). Every engine generates greedily from the same random prompts (128
tokens) with eos ignored (genai: min_length = max_length); prefill = median time of a run with 1
new token ("time to first token"), decode = (median run with N new tokens - prefill) / (N - 1),
the method of mmfuse.decoder.benchmark, applied to every engine, with the engines interleaved (each
repeat runs every engine once, so a shared box's load falls on all of them alike), in one process or,
with --separate-processes, each engine in a fresh process of its own every round. int8: our
`--quantize int8` exports (dynamic int8). Exports run as subprocesses of
their command lines (`mmfuse export onnx`, `python -m onnxruntime_genai.models.builder -p fp32 -e cpu`),
so both include interpreter start-up and checkpoint loading; ours includes its check.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import statistics

from mmfuse.decoder.benchmark import random_prompts
from mmfuse.decoder.generate import Engine
from mmfuse.ort.manifest import MANIFEST

from bench_onnx_steps import with_genai_threads

SHAPES = {
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, intermediate_size=1536, max_position_embeddings=2048,
                                   tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5)),
}


def build_checkpoint(shape: str, folder: Path) -> None:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    family, kw = SHAPES[shape]
    cls_cfg, cls_lm = ((transformers.GPT2Config, transformers.GPT2LMHeadModel) if family == "gpt2"
                       else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    torch.manual_seed(0)
    cls_lm(cls_cfg(bos_token_id=0, eos_token_id=0, pad_token_id=0, **kw)).eval().save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))


def timed_subprocess(cmd: list, cwd=None) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def _s(seconds) -> str:
    return "-" if seconds is None else f"{seconds:.1f}"


def genai_runner(folder: Path, prompts: list, threads=None):
    """onnxruntime-genai on `folder`; with `threads`, on a copy of its genai_config.json that sets them."""
    import onnxruntime_genai as og

    model = og.Model(str(folder if threads is None else with_genai_threads(folder, threads)))
    ids = np.array(prompts, dtype=np.int32)

    def run(n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, do_sample=False,
                                  batch_size=ids.shape[0])
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()

    return run


def engine_runner(engine, prompts: list):
    def run(n):
        engine.generate(prompts, temperature=0.0, max_new_tokens=n, ignore_eos=True)

    return run


def time_interleaved(runners: dict, new_tokens: int, repeats: int) -> dict:
    """name -> (prefill s, decode s per step): medians over `repeats` rounds, each round running every
    engine once with 1 and with `new_tokens` new tokens."""
    times = {name: ([], []) for name in runners}
    for run in runners.values():
        run(2)  # warm-up
    for _ in range(repeats):
        for name, run in runners.items():
            for n, out in ((1, times[name][0]), (new_tokens, times[name][1])):
                t = time.perf_counter()
                with torch.inference_mode():
                    run(n)
                out.append(time.perf_counter() - t)
    res = {}
    for name, (t1, tn) in times.items():
        p, full = statistics.median(t1), statistics.median(tn)
        res[name] = (p, max(full - p, 1e-9) / (new_tokens - 1))
    return res


def time_separately(names: list, work: Path, shape: str, batch: int, args) -> dict:
    """time_interleaved's figures with each engine in a fresh process of its own for every round (the
    rounds alternate the engines): no engine's threads or memory sit beside another's. One engine's
    idle threads can take the cores another needs: onnxruntime-genai's keep spinning after a step,
    mmfuse's stop (bench/README.md, ONNX decoders)."""
    times = {name: ([], []) for name in names}
    for _ in range(args.repeats):
        for name in names:
            cmd = [sys.executable, __file__, "--child", "--workdir", str(work), "--reuse", "--models", shape,
                   "--batch", str(batch), "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--engines", name] + ([] if args.threads is None else ["--threads", str(args.threads)])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{name}: {out.stderr.strip().splitlines()[-1:]}")
            prefill, step = json.loads(out.stdout.strip().splitlines()[-1])
            times[name][0].append(prefill)
            times[name][1].append(step)
    return {name: (statistics.median(p), statistics.median(s)) for name, (p, s) in times.items()}


def main(argv=None) -> None:
    from mmfuse.ort.engine import OrtEngine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads of OrtEngine and of genai "
                    "(default: each its own; genai's is 1 on this box)")
    ap.add_argument("--workdir", default=None, help="keep checkpoints and exports here (default: a temp folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse exports already in --workdir (no export timing)")
    ap.add_argument("--engines", nargs="+", default=None, help="only these engine names (see the table)")
    ap.add_argument("--separate-processes", action="store_true",
                    help="time each engine in a fresh process of its own, every round")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one engine, one round: prints JSON
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_onnx_")).resolve()
    rows, exports = [], []
    for shape in args.models:
        ckpt, theirs = work / f"{shape}-hf", work / f"{shape}-builder"
        ours = {v: work / f"{shape}-{v}" for v in ("portable", "optimized", "portable-int8", "optimized-int8")}
        if not (ckpt / "config.json").exists():
            ckpt.mkdir(parents=True, exist_ok=True)
            build_checkpoint(shape, ckpt)
        mmfuse = [sys.executable, "-m", "mmfuse.cli", "export", "onnx", "--model", str(ckpt)]
        done = lambda folder, name: (folder / name).exists() and args.reuse  # noqa: E731
        t_export = {}
        for v, folder in ours.items():
            flags = (["--optimize"] if v.startswith("optimized") else []) + (["--quantize", "int8"] if "int8" in v else [])
            t_export[v] = None if done(folder, MANIFEST) else timed_subprocess(mmfuse + ["--out", str(folder)] + flags)
        t_b = None
        if not done(theirs, "genai_config.json"):
            try:
                t_b = timed_subprocess([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt),
                                        "-o", str(theirs), "-p", "fp32", "-e", "cpu"],
                                       cwd=work)  # not the repository root, whose kernels/ shadows HF's kernels package
            except RuntimeError as e:
                print(f"{shape}: the model builder failed: {str(e).splitlines()[-1]}")
        has_builder = (theirs / "genai_config.json").exists()
        exports.append((shape, t_export, t_b))
        print(f"{shape}: export s: {', '.join(f'{v} {_s(t)}' for v, t in t_export.items())}, builder {_s(t_b)}",
              flush=True)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        # engines are built when first timed: a process holds only the engines it runs
        makers = {"PyTorch Engine fp32": lambda p: engine_runner(Engine.from_pretrained(ckpt), p)}
        for v in ours:
            makers[f"OrtEngine {v}"] = lambda p, v=v: engine_runner(
                OrtEngine.from_pretrained(ours[v], threads=args.threads), p)
        makers["genai on our optimized"] = lambda p: genai_runner(ours["optimized"], p, args.threads)
        makers["genai on our optimized-int8"] = lambda p: genai_runner(ours["optimized-int8"], p, args.threads)
        if has_builder:
            makers["genai on builder export"] = lambda p: genai_runner(theirs, p, args.threads)
        if args.engines:
            makers = {k: v for k, v in makers.items() if k in args.engines}
        for batch in args.batch:
            prompts = random_prompts(vocab, batch, args.prompt_len)
            if args.child:
                (prefill, step), = time_interleaved({k: make(prompts) for k, make in makers.items()},
                                                    args.new_tokens, 1).values()
                print(json.dumps([prefill, step]))
                return
            if args.separate_processes:
                res = time_separately(list(makers), work, shape, batch, args)
            else:
                res = time_interleaved({k: make(prompts) for k, make in makers.items()}, args.new_tokens, args.repeats)
            for name, (prefill, step) in res.items():
                rows.append((shape, batch, name, prefill, batch / step))
                print(f"{shape} b{batch} {name}: decode {batch / step:.1f} tok/s, TTFT {1000 * prefill:.0f} ms", flush=True)
    print(f"\n| model | batch | engine | decode tok/s | time to first token ms | decode vs genai/builder | "
          f"decode vs OrtEngine optimized |")
    print("|---|---|---|---|---|---|---|")
    for shape, batch, name, prefill, tok_s in rows:
        def ratio(peer_name):
            peer = [t for s, b, n, _, t in rows if s == shape and b == batch and n == peer_name]
            return f"{tok_s / peer[0]:.2f}x" if peer else "-"

        print(f"| {shape} | {batch} | {name} | {tok_s:.1f} | {1000 * prefill:.0f} | {ratio('genai on builder export')} "
              f"| {ratio('OrtEngine optimized')} |")
    print("\n| model | " + " | ".join(f"mmfuse export {v} s" for v in ours) + " | model builder s |")
    print("|---|" + "---|" * (len(ours) + 1))
    for shape, t_export, t_b in exports:
        print(f"| {shape} | " + " | ".join(_s(t) for t in t_export.values()) + f" | {_s(t_b)} |")


if __name__ == "__main__":
    main()
