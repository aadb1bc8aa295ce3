"""Speculative decoding with n-gram drafters vs plain greedy decoding, on a decoder trained here.

    python bench/bench_speculative.py [--corpus ../shared/reference/kenlm/train.txt] [--train-seconds 180]

Random weights agree with no draft, so the script first trains a small GPT-2-shaped decoder on
real text for a few minutes (CPU), plus a byte-level BPE tokenizer and an order-4 n-gram model on
the same token ids. It then decodes greedily (temperature 0) with no drafter, the prompt-lookup
drafter and the n-gram LM drafter, on prompts that copy from themselves (a paragraph followed by
its own beginning: the summarisation/code-edit pattern) and on free text (the beginnings of
held-out lines), checks that every drafter gives exactly the plain greedy tokens, and prints
tokens/s, acceptance rate and tokens per decoder forward. `--per-op-verify` adds each drafter
with its verification forwards on the per-op PyTorch path instead of the fused CPU step (as before
the fused step ran several tokens per row), in the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time

import numpy as np
import torch

from mmfuse.decoder.config import DecoderConfig
import mmfuse.decoder.generate as generate
from mmfuse.decoder.generate import Engine
from mmfuse.decoder.transformer import Decoder
from mmfuse.ngram import NGramModel
from mmfuse.decoder.speculative import NGramLMDrafter, PromptLookupDrafter, speculative_generate

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CORPUS = os.path.join(HERE, "..", "..", "shared", "reference", "kenlm", "train.txt")


def train_tokenizer(lines, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|eos|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def train_decoder(ids: np.ndarray, cfg: DecoderConfig, seconds: float, batch: int = 24, seq: int = 128) -> Decoder:
    """AdamW with warm-up and cosine decay on random windows of the token stream, for `seconds`."""
    torch.manual_seed(0)
    model = Decoder.random(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = torch.from_numpy(ids.astype(np.int64))
    pos = torch.arange(seq).expand(batch, seq)
    start, step, est_steps = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        if step == 20:  # estimate the step budget from the first steps, for the schedule
            est_steps = int(seconds / ((time.perf_counter() - start) / 20))
        total = est_steps or 10**6
        lr = 2e-3 * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0))))
        for gr in opt.param_groups:
            gr["lr"] = lr
        idx = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[i: i + seq] for i in idx])
        y = torch.stack([data[i + 1: i + seq + 1] for i in idx])
        loss = torch.nn.functional.cross_entropy(model(x, pos).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"  train step {step:5d}  loss {loss.item():.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
        step += 1
    print(f"  trained {step} steps in {time.perf_counter() - start:.0f} s, last loss {loss.item():.3f}")
    return model.eval()


@contextlib.contextmanager
def per_op_verify():
    """Multi-token forwards (verification) through the per-op PyTorch path inside the block."""
    old, generate.FUSED_MAX_ROWS = generate.FUSED_MAX_ROWS, 0
    try:
        yield
    finally:
        generate.FUSED_MAX_ROWS = old


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=DEFAULT_CORPUS, help="training text, one paragraph per line")
    ap.add_argument("--heldout", default=None, help="held-out text for free-text prompts (default: corpus sibling test.txt)")
    ap.add_argument("--train-seconds", type=float, default=180)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per kind")
    ap.add_argument("--per-op-verify", action="store_true", help="also each drafter with per-op verification")
    args = ap.parse_args(argv)
    lines = [l.strip() for l in open(args.corpus, encoding="utf-8") if l.strip()]
    heldout_path = args.heldout or os.path.join(os.path.dirname(args.corpus), "test.txt")
    heldout = [l.strip() for l in open(heldout_path, encoding="utf-8") if len(l.split()) > 30]
    tok = train_tokenizer(lines, args.vocab)
    eos = tok.token_to_id("<|eos|>")
    seqs = [tok.encode(l).ids + [eos] for l in lines]
    stream = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    print(f"corpus {args.corpus}: {len(lines)} lines, {len(stream)} tokens, vocab {tok.get_vocab_size()}")
    cfg = DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=4, n_head=4, n_kv_head=4, d_model=256,
                        head_dim=64, d_ff=1024, max_seq_len=512, eos_token_ids=(eos,))
    model = train_decoder(stream, cfg, args.train_seconds)
    lm = NGramModel.build([np.asarray(s[:-1], dtype=np.int32) for s in seqs], order=4)
    engine = Engine(model, tok)

    copy_prompts, free_prompts = [], []
    for l in heldout[: args.prompts]:
        ids = tok.encode(l).ids[:120]
        copy_prompts.append(ids + tok.encode(" in other words, " + l).ids[:12])
        free_prompts.append(ids[:24])
    drafters = {"none": None, "prompt-lookup": PromptLookupDrafter(), "ngram-lm": NGramLMDrafter(lm)}
    runs = [(name, False) for name in drafters] + [(name, True) for name in drafters if args.per_op_verify and drafters[name]]
    torch.set_grad_enabled(False)
    print(f"\ngreedy, {args.new_tokens} new tokens, k={args.k}, {torch.get_num_threads()} CPU threads, "
          f"median over {args.prompts} prompts per kind")
    print(f"{'prompts':<8} {'drafter':<30} {'tok/s':>7} {'speed-up':>8} {'accept':>7} {'tok/fwd':>7} {'same':>5}")
    for kind, prompts in (("copy", copy_prompts), ("free", free_prompts)):
        base_rate, base_tokens = None, None
        for name, per_op in runs:
            drafter = drafters[name]
            rates, acc, per_fwd, same = [], [], [], True
            outs = []
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                if drafter is None:
                    c = engine.generate(p, temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)[0]
                else:
                    with per_op_verify() if per_op else contextlib.nullcontext():
                        c, st = speculative_generate(engine, p, drafter, k=args.k, temperature=0.0,
                                                     max_new_tokens=args.new_tokens, ignore_eos=True)
                    acc.append(st.acceptance_rate)
                    per_fwd.append(len(c.token_ids) / max(st.forwards + 1, 1))
                rates.append(len(c.token_ids) / (time.perf_counter() - t0))
                outs.append(c.token_ids)
                if base_tokens is not None:
                    same &= c.token_ids == base_tokens[i]
            rate = statistics.median(rates)
            if drafter is None:
                base_rate, base_tokens = rate, outs
            print(f"{kind:<8} {name + (' (per-op verify)' if per_op else ''):<30} {rate:>7.1f} {rate / base_rate:>8.2f} "
                  f"{(statistics.median(acc) if acc else float('nan')):>7.2f} "
                  f"{(statistics.median(per_fwd) if per_fwd else 1.0):>7.2f} {str(same):>5}", flush=True)


if __name__ == "__main__":
    main()
