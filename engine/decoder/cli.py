"""CLI for the decoder: `mmfuse generate`, `mmfuse info`, `mmfuse bench`. torch is imported when a
command runs, not when the CLI starts."""
from __future__ import annotations

import re
import sys

from ..cli_options import add_device_options, add_model_options, add_output_options, emit_json, prepare_model_args

# SamplingParams fields whose flag is not simply --field-name
_FLAGS = {"stop_strings": "--stop", "stop_token_ids": "--stop-id"}


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a checkpoint folder")
    add_model_options(g)
    g.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: generation_config.json, else 64)")
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
    _quant_args(g)
    add_output_options(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="parameters, dtype and KV-cache bytes of a checkpoint")
    add_model_options(i)
    add_output_options(i)
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="prefill/decode throughput on a built-in config with random weights")
    b.add_argument("--preset", default="gpt2-124m", help="built-in config (gpt2-124m, llama-1.1b)")
    b.add_argument("--model", help="a checkpoint folder instead of a preset")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    b.add_argument("--new-tokens", type=int, default=128, help="generated tokens")
    b.add_argument("--repeats", type=int, default=3, help="runs per batch size (median)")
    b.add_argument("--bandwidth-gbs", type=float, default=30.0, help="memory bandwidth for the floor (GB/s)")
    b.add_argument("--cuda-graph", action="store_true")
    add_device_options(b)
    _quant_args(b)
    add_output_options(b)
    b.set_defaults(func=cmd_bench)


def _flag_error(e: Exception) -> Exception:
    """A SamplingParams error, its field names turned into this command's flags."""
    def flag(m):
        return _FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-"))

    return type(e)(re.sub(r"SamplingParams\.(\w+)", flag, str(e)))


def _quant_args(p) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization at load time")
    p.add_argument("--group-size", type=int, help="input columns per scale (-1: per output channel; int4 default 128)")
    p.add_argument("--asym", action="store_true", help="a zero point per group (default: symmetric)")
    p.add_argument("--float-head", action="store_true", help="keep the LM head (and tied embeddings) in float")


def _quant_config(args):
    from ..quant import QuantConfig

    if args.quantize is None:
        if args.group_size is not None or args.asym or args.float_head:
            raise ValueError("--group-size / --asym / --float-head need --quantize")
        return None
    return QuantConfig.parse(args.quantize, group_size=args.group_size, symmetric=False if args.asym else None,
                             lm_head=False if args.float_head else None)


def cmd_generate(args) -> int:
    from ..errors import SamplingParamsError
    from .generate import Engine

    prepare_model_args(args)
    opts = sampling_options(args)
    opts["logprobs"] = args.logprobs
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=_quant_config(args))
    try:
        engine.params(**opts)  # checks the flags before any generation
    except SamplingParamsError as e:
        raise _flag_error(e) from None
    if args.stream:
        for i, prompt in enumerate(args.prompt):
            lps = []
            for chunk in engine.stream(prompt, **opts):
                if args.json:
                    emit_json({"index": i, "token_id": chunk.token_id, "text": chunk.text, "logprob": chunk.logprob,
                               "finish_reason": chunk.finish_reason})
                    continue
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                lps.append(chunk.logprob)
            if not args.json:
                sys.stdout.write("\n")
                if args.logprobs:
                    print("logprobs:", " ".join(f"{x:.4f}" for x in lps))
        return 0
    for i, c in enumerate(engine.generate(args.prompt, **opts)):
        if args.json:
            emit_json({"index": i, "prompt": args.prompt[i], "text": c.text, "token_ids": c.token_ids,
                       "logprobs": c.logprobs, "finish_reason": c.finish_reason})
            continue
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

    prepare_model_args(args)
    model = load_decoder(args.model, dtype=args.dtype, device=args.device)
    cfg = model.cfg
    dtype = model.norm_f.weight.dtype  # float in quantized models too
    item = dtype.itemsize
    kv = cfg.kv_bytes_per_token * item
    name = str(dtype).removeprefix("torch.")
    if args.json:
        emit_json({"model": args.model, "family": cfg.family, "layers": cfg.n_layer, "d_model": cfg.d_model,
                   "heads": cfg.n_head, "kv_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "d_ff": cfg.d_ff,
                   "vocab_size": cfg.vocab_size, "parameters": model.num_params(), "dtype": name,
                   "context": cfg.max_seq_len, "kv_cache_bytes_per_token": kv})
        return 0
    print(f"model:         {args.model}")
    print(f"family:        {cfg.family} ({cfg.n_layer} layers, d_model {cfg.d_model}, heads {cfg.n_head}/{cfg.n_kv_head} "
          f"q/kv, head_dim {cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size})")
    print(f"parameters:    {model.num_params():,} ({model.num_params() * item / 2**20:.1f} MiB in {name})")
    print(f"dtype:         {name}")
    print(f"context:       {cfg.max_seq_len} positions")
    print(f"KV cache:      {kv:,} bytes per token per sequence ({kv * cfg.max_seq_len / 2**20:.1f} MiB for a full context)")
    return 0


def cmd_bench(args) -> int:
    import torch

    from ..checkpoint import resolve_dtype
    from ..cli_options import progress
    from .benchmark import bench_engine, weight_bytes
    from .config import PRESETS
    from .loader import load_decoder
    from .transformer import Decoder

    from ..quant import quantize_decoder

    for flag, values in (("--batch", args.batch), ("--prompt-len", [args.prompt_len]),
                         ("--new-tokens", [args.new_tokens]), ("--repeats", [args.repeats])):
        if min(values) < 1:
            raise ValueError(f"{flag} {min(values)}: must be >= 1")
    prepare_model_args(args)
    qcfg = _quant_config(args)
    if args.model:
        model, name = load_decoder(args.model, dtype=args.dtype, device=args.device, quantize=qcfg), args.model
    else:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r}: unknown; choose from {sorted(PRESETS)}")
        dtype = resolve_dtype("fp32" if args.dtype == "auto" else args.dtype)
        model, name = Decoder.random(PRESETS[args.preset], dtype=dtype, device=args.device), args.preset
        if qcfg is not None:
            quantize_decoder(model, qcfg)
    quant = getattr(model, "quant_config", None)
    dname = str(model.norm_f.weight.dtype).removeprefix("torch.") + ("" if quant is None else " + " + quant.name)
    if not args.json:
        print(f"mmfuse bench: {name}, {model.num_params() / 1e6:.1f}M float params, {dname}, {args.device}, "
              f"{torch.get_num_threads()} threads, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
              f"median of {args.repeats}")
        print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} {'floor ms':>9} {'x floor':>8}")
    for bs in progress(args.batch, desc="bench", quiet=args.quiet, unit="batch"):
        r = bench_engine(model, bs, args.prompt_len, args.new_tokens, repeats=args.repeats, cuda_graph=args.cuda_graph)
        floor = weight_bytes(model) / (args.bandwidth_gbs * 1e9)
        if args.json:
            emit_json({"model": name, "dtype": dname, "device": args.device, "batch": bs,
                       "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                       "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
                       "step_ms": r["step_s"] * 1e3, "floor_ms": floor * 1e3, "x_floor": r["step_s"] / floor})
            continue
        print(f"{bs:>5} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.1f} {r['step_s'] * 1e3:>8.2f} "
              f"{floor * 1e3:>9.2f} {r['step_s'] / floor:>8.2f}")
    return 0
