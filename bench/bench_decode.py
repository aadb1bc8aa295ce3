"""Decoder throughput: mmfuse vs transformers `generate`, same random-init weights, same run.

    python bench/bench_decode.py                       # GPT-2-124M shape, fp32, CPU, batch 1 and 8
    python bench/bench_decode.py --device cuda --dtype bf16 --batch 1 --models gpt2-124m llama-1.1b --cuda-graph

Both sides generate greedily from the same random prompts (128 + 128 tokens by default); prefill
is the time for one new token, decode the marginal time per further step (engine/benchmark.py).
The weight-bandwidth floor is weight bytes / --bandwidth-gbs (30 GB/s measured on the CPU box).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from mmfuse.decoder.benchmark import bench_engine, random_prompts, time_generation, weight_bytes
from mmfuse.checkpoint import resolve_dtype
from mmfuse.decoder.config import PRESETS
from mmfuse.decoder.loader import load_decoder


def hf_model(preset: str, folder: str):
    """A random-init transformers model of the preset's shape, saved as a checkpoint folder."""
    import transformers

    c = PRESETS[preset]
    if c.family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
                                      n_layer=c.n_layer, n_head=c.n_head)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                       num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
                                       max_position_embeddings=c.max_seq_len, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return model


def bench_hf(model, batch, prompt_len, new_tokens, repeats, device):
    prompts = torch.tensor(random_prompts(model.config.vocab_size, batch, prompt_len), device=device)
    mask = torch.ones_like(prompts)

    def run(n):
        model.generate(prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        return time_generation(run, batch, prompt_len, new_tokens, repeats, device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2-124m"], choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bandwidth-gbs", type=float, default=30.0)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers side")
    args = ap.parse_args(argv)
    dtype = resolve_dtype(args.dtype)
    dev = torch.device(args.device)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"{args.dtype}, prompt {args.prompt_len} + {args.new_tokens} new, median of {args.repeats}")
    print(f"{'model':<11} {'batch':>5} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} {'ours ms/step':>12} "
          f"{'floor ms':>8} {'x floor':>7} {'ours prefill tok/s':>18} {'hf prefill tok/s':>16}")
    for preset in args.models:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            hf = hf_model(preset, folder)
            hf = hf.to(device=dev, dtype=dtype).eval()
            ours = load_decoder(folder, dtype=dtype, device=dev)
            floor = weight_bytes(ours) / (args.bandwidth_gbs * 1e9)
            for bs in args.batch:
                o = bench_engine(ours, bs, args.prompt_len, args.new_tokens, args.repeats, args.cuda_graph)
                h = None if args.no_hf else bench_hf(hf, bs, args.prompt_len, args.new_tokens, args.repeats, dev)
                hd = f"{h['decode_tok_s']:>9.1f} {o['decode_tok_s'] / h['decode_tok_s']:>6.2f}" if h else f"{'-':>9} {'-':>6}"
                hp = f"{h['prefill_tok_s']:>16.0f}" if h else f"{'-':>16}"
                print(f"{preset:<11} {bs:>5} {o['decode_tok_s']:>10.1f} {hd} {o['step_s'] * 1e3:>12.2f} "
                      f"{floor * 1e3:>8.2f} {o['step_s'] / floor:>7.2f} {o['prefill_tok_s']:>18.0f} {hp}", flush=True)
            del hf, ours


if __name__ == "__main__":
    main()
