"""Several tokens per cache row: the fused CPU step vs the per-op PyTorch forward, same run.

    python bench/bench_fused_rows.py [--models vlm spec gpt2-124m] [--ks 1 2 4 7 16 32 64] [--repeats 9]

For each random-init model shape and k: `DecodeState.forward` of k tokens after 40 cached ones
(speculative verification; the cache is rolled back after each call) and `DecodeState.prefill`
of a k-token continuation after a 40-token cached prefix (a follow-up question), each with the
fused step and with it switched off (MMFUSE_FUSED_DECODE=0), alternating. `FUSED_MAX_ROWS` in
engine/decoder/generate.py is chosen from these columns (lifted here so that every k runs fused).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import unfused
from mmfuse.decoder.config import PRESETS, DecoderConfig
from mmfuse.decoder.generate import DecodeState
import mmfuse.decoder.generate as generate
from mmfuse.decoder.transformer import Decoder

LLAMA = dict(family="llama", norm="rmsnorm", act="silu", gated_mlp=True, learned_pos=False)
SHAPES = {  # the world demo's VLM text decoder; bench_speculative's decoder; GPT-2 small
    "vlm": DecoderConfig(vocab_size=52, n_layer=2, n_head=4, n_kv_head=4, d_model=128, head_dim=32, d_ff=384,
                         max_seq_len=256, norm_eps=1e-6, **LLAMA),
    "spec": DecoderConfig(vocab_size=2048, n_layer=4, n_head=4, n_kv_head=4, d_model=256, head_dim=64, d_ff=1024,
                          max_seq_len=512),
    "gpt2-124m": PRESETS["gpt2-124m"],
}
PREFIX = 40


def timed(fn, repeats: int) -> list:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 7, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    generate.FUSED_MAX_ROWS = max(args.ks)
    print(f"{torch.get_num_threads()} threads, {PREFIX} cached positions, median ms of {args.repeats}")
    print("| model | k | verify fused | verify per-op | x | prefill fused | prefill per-op | x |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model = Decoder.random(SHAPES[name], seed=0).eval()
        V = model.cfg.vocab_size
        state = DecodeState(model, 1, PREFIX + max(args.ks) + 1)
        prefix = [(7 * i + 3) % V for i in range(PREFIX)]
        state.prefill([prefix])
        for k in args.ks:
            toks = [(5 * i + 1) % V for i in range(k)]

            def verify():
                state.forward(torch.tensor([toks]))
                state.cache.truncate([PREFIX])

            def follow_up():
                state.prefill([toks], start=[PREFIX])
                state.cache.truncate([PREFIX])

            t = {key: [] for key in ("vf", "vu", "pf", "pu")}
            for _ in range(3):  # alternating rounds: load from other jobs spreads over both
                t["vf"] += timed(verify, args.repeats)
                t["pf"] += timed(follow_up, args.repeats)
                with unfused():
                    t["vu"] += timed(verify, args.repeats)
                    t["pu"] += timed(follow_up, args.repeats)
            m = {key: 1e3 * statistics.median(v) for key, v in t.items()}
            print(f"| {name} | {k} | {m['vf']:.3f} | {m['vu']:.3f} | {m['vu'] / m['vf']:.2f} | {m['pf']:.3f} | "
                  f"{m['pu']:.3f} | {m['pu'] / m['pf']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
