"""CLI for the decoder: `mmfuse generate`, `mmfuse info`, `mmfuse bench`."""
from __future__ import annotations

import sys

import torch

from ..checkpoint import resolve_dtype


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a checkpoint folder")
    g.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    g.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-id", type=int, action="append", default=None, help="stop token id (repeatable)")
    g.add_argument("--seed", type=int)
    g.add_argument("--logprobs", action="store_true", help="print per-token logprobs")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    _device_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="parameters, dtype and KV-cache bytes of a checkpoint")
    i.add_argument("--model", required=True)
    _device_args(i)
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="prefill/decode throughput on a built-in config with random weights")
    b.add_argument("--preset", default="gpt2-124m", help="built-in config (gpt2-124m, llama-1.1b)")
    b.add_argument("--model", help="a checkpoint folder instead of a preset")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--bandwidth-gbs", type=float, default=30.0, help="memory bandwidth for the floor (GB/s)")
    b.add_argument("--cuda-graph", action="store_true")
    _device_args(b)
    b.set_defaults(func=cmd_bench)


def _device_args(p) -> None:
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")


def cmd_generate(args) -> int:
    from .generate import Engine

    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device)
    opts = sampling_options(args)
    opts["logprobs"] = args.logprobs
    if args.stream:
        for prompt in args.prompt:
            lps = []
            for chunk in engine.stream(prompt, **opts):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                lps.append(chunk.logprob)
            sys.stdout.write("\n")
            if args.logprobs:
                print("logprobs:", " ".join(f"{x:.4f}" for x in lps))
        return 0
    for c in engine.generate(args.prompt, **opts):
        print(c.text if c.text is not None else c.token_ids)
        if args.logprobs:
            print("logprobs:", " ".join(f"{x:.4f}" for x in c.logprobs))
    return 0


def sampling_options(args) -> dict:
    """SamplingParams overrides from the sampling flags that were given."""
    opts = {k: getattr(args, k) for k in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p",
                                          "min_p", "repetition_penalty", "presence_penalty",
                                          "frequency_penalty", "seed") if getattr(args, k, None) is not None}
    if args.stop:
        opts["stop_strings"] = tuple(args.stop)
    if args.stop_id:
        opts["stop_token_ids"] = tuple(args.stop_id)
    return opts


def cmd_info(args) -> int:
    from .loader import load_decoder

    model = load_decoder(args.model, dtype=args.dtype, device=args.device)
    cfg = model.cfg
    item = resolve_dtype(args.dtype).itemsize
    kv = cfg.kv_bytes_per_token * item
    print(f"model:         {args.model}")
    print(f"family:        {cfg.family} ({cfg.n_layer} layers, d_model {cfg.d_model}, heads {cfg.n_head}/{cfg.n_kv_head} "
          f"q/kv, head_dim {cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size})")
    print(f"parameters:    {model.num_params():,} ({model.num_params() * item / 2**20:.1f} MiB in {args.dtype})")
    print(f"dtype:         {args.dtype}")
    print(f"context:       {cfg.max_seq_len} positions")
    print(f"KV cache:      {kv:,} bytes per token per sequence ({kv * cfg.max_seq_len / 2**20:.1f} MiB for a full context)")
    return 0


def cmd_bench(args) -> int:
    from .benchmark import bench_engine, weight_bytes
    from .config import PRESETS
    from .loader import load_decoder
    from .transformer import Decoder

    dtype = resolve_dtype(args.dtype)
    if args.model:
        model, name = load_decoder(args.model, dtype=dtype, device=args.device), args.model
    else:
        if args.preset not in PRESETS:
            raise ValueError(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
        model, name = Decoder.random(PRESETS[args.preset], dtype=dtype, device=args.device), args.preset
    print(f"mmfuse bench: {name}, {model.num_params() / 1e6:.1f}M params, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} {'floor ms':>9} {'x floor':>8}")
    for bs in args.batch:
        r = bench_engine(model, bs, args.prompt_len, args.new_tokens, repeats=args.repeats, cuda_graph=args.cuda_graph)
        floor = weight_bytes(model) / (args.bandwidth_gbs * 1e9)
        print(f"{bs:>5} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} {r['step_s'] * 1e3:>8.2f} "
              f"{floor * 1e3:>9.2f} {r['step_s'] / floor:>8.2f}")
    return 0
