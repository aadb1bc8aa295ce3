"""Quality of weight-only quantization on a trained decoder: perplexity and next-token agreement.

    python bench/quant_quality.py [--train-seconds 150] [--family llama]
    python bench/quant_quality.py --model world-imagine [--held-out 400]

Default: trains a small decoder on tests/data/kenlm/train.txt (bench_speculative's loop), then for
each format measures held-out perplexity on tests/data/kenlm/test.txt (windows of 128 tokens) and
the share of positions whose greedy next token equals the fp32 model's.
`--model world-imagine`: the shipped text-to-image decoder (trained by `mmfuse world train`) on
held-out scenes (seeds from the world's HELD_OUT): <s> caption <boi> and the VQ codes of the
rendered scene, perplexity and agreement over the image-token positions only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speculative import train_decoder, train_tokenizer  # noqa: E402

from mmfuse.decoder.config import DecoderConfig  # noqa: E402
from mmfuse.decoder.transformer import Decoder  # noqa: E402
from mmfuse.quant import QuantConfig, quantize_decoder  # noqa: E402
from mmfuse.quant.quantize_model import quantized_linears  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "kenlm")
FORMATS = ["int8", "int8-asym", "int4-g32", "int4-g32-asym", "int4-g64", "int4-g128", "int4-g128-asym"]


def clone(model, cfg):
    """A copy of the trained model (Decoder holds a lock, so no deepcopy)."""
    twin = Decoder(cfg).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@torch.inference_mode()
def evaluate(model, windows: torch.Tensor, scored=None):
    """(mean NLL, greedy next tokens) over windows (W, T+1), at the target positions where `scored`
    (W, T) is True (default: all)."""
    x, y = windows[:, :-1], windows[:, 1:]
    keep = torch.ones_like(y, dtype=torch.bool) if scored is None else scored
    pos = torch.arange(x.shape[1]).expand_as(x)
    nll, preds = [], []
    for i in range(0, len(x), 8):
        logits = model(x[i:i + 8], pos[i:i + 8]).float()
        k = keep[i:i + 8]
        nll.append(torch.nn.functional.cross_entropy(logits[k], y[i:i + 8][k], reduction="none"))
        preds.append(logits.argmax(-1)[k])
    return torch.cat(nll).mean().item(), torch.cat(preds)


def trained_here(args):
    """(decoder trained here on tests/data text, its config, held-out windows)."""
    train = open(os.path.join(DATA, "train.txt"), encoding="utf-8").read().splitlines()
    test = open(os.path.join(DATA, "test.txt"), encoding="utf-8").read().splitlines()
    tok = train_tokenizer(train, args.vocab)
    ids = np.array([t for line in train for t in tok.encode(line).ids], dtype=np.int64)
    held = torch.tensor([t for line in test for t in tok.encode(line).ids], dtype=torch.long)
    n = (len(held) - 1) // args.seq
    windows = torch.stack([held[i * args.seq: i * args.seq + args.seq + 1] for i in range(n)])
    common = dict(vocab_size=tok.get_vocab_size(), d_model=256, n_head=4, n_kv_head=4, head_dim=64, n_layer=4,
                  d_ff=1024, max_seq_len=args.seq + 1)
    if args.family == "llama":
        cfg = DecoderConfig(family="llama", norm="rmsnorm", act="silu", gated_mlp=True, learned_pos=False, qkv_bias=False,
                            o_bias=False, mlp_bias=False,
                            tie_embeddings=True, **common)
    else:
        cfg = DecoderConfig(family="gpt2", **common)
    print(f"training a {args.family}-shaped decoder ({cfg.n_layer} layers, d={cfg.d_model}) for {args.train_seconds:.0f} s "
          f"on {len(ids):,} tokens; held-out: {n} windows of {args.seq}")
    return train_decoder(ids, cfg, args.train_seconds, batch=args.batch, seq=args.seq), cfg, windows


def world_imagine(held_out: int):
    """(shipped text-to-image decoder, its config, windows, scored) on held-out scenes."""
    from mmfuse.world.imagine import Imaginer, prompt_ids
    from mmfuse.world.language import caption
    from mmfuse.world.scene import generate_scene, render
    from mmfuse.world.shipped import shipped_path
    from mmfuse.world.train import HELD_OUT

    im = Imaginer.from_pretrained(shipped_path("world-imagine"))
    scenes = [generate_scene(HELD_OUT + i) for i in range(held_out)]
    with torch.inference_mode():
        codes = im.vq.encode(np.stack([render(s) for s in scenes])).reshape(held_out, -1) + im.first_image_id
    heads = [prompt_ids(im.engine.tokenizer, caption(s)) for s in scenes]
    T = max(len(h) for h in heads) + codes.shape[1]
    windows = torch.zeros(held_out, T, dtype=torch.long)
    scored = torch.zeros(held_out, T - 1, dtype=torch.bool)
    for i, h in enumerate(heads):  # right-padded rows; only the image tokens are scored
        n = len(h) + codes.shape[1]
        windows[i, :n] = torch.cat([torch.tensor(h), codes[i]])
        scored[i, len(h) - 1: n - 1] = True
    model = im.engine.model.eval()
    return model, model.cfg, windows, scored


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["train", "world-imagine"], default="train",
                    help="train a decoder here (default) or measure the shipped text-to-image decoder")
    ap.add_argument("--train-seconds", type=float, default=150)
    ap.add_argument("--family", default="llama", choices=["llama", "gpt2"])
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=24, help="training windows per step")
    ap.add_argument("--held-out", type=int, default=400, help="world-imagine: held-out scenes")
    args = ap.parse_args(argv)
    scored = None
    if args.model == "world-imagine":
        model, cfg, windows, scored = world_imagine(args.held_out)
        print(f"world-imagine: {cfg.n_layer} layers, d={cfg.d_model}, vocabulary {cfg.vocab_size}; held-out: "
              f"{len(windows)} scenes, {int(scored.sum())} image tokens scored")
    else:
        model, cfg, windows = trained_here(args)
    base_nll, base_pred = evaluate(model, windows, scored)
    print("\n| format | bits/weight (linears) | perplexity | vs fp32 | next-token agreement |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | 32 | {math.exp(base_nll):.3f} | - | - |")
    bf = clone(model, cfg).to(torch.bfloat16)
    nll, pred = evaluate(bf, windows, scored)
    print(f"| bf16 | 16 | {math.exp(nll):.3f} | {math.exp(nll - base_nll) * 100 - 100:+.2f}% | "
          f"{(pred == base_pred).float().mean().item() * 100:.2f}% |")
    for name in FORMATS:
        q = quantize_decoder(clone(model, cfg), QuantConfig.parse(name))
        lins = quantized_linears(q)
        bits = 8 * sum(m.nbytes for m in lins.values()) / sum(m.in_features * m.out_features for m in lins.values())
        nll, pred = evaluate(q, windows, scored)
        print(f"| {name} | {bits:.2f} | {math.exp(nll):.3f} | {math.exp(nll - base_nll) * 100 - 100:+.2f}% | "
              f"{(pred == base_pred).float().mean().item() * 100:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
