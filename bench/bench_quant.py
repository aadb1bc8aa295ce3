"""Decode speed of quantized weights on the CPU: fp32, bf16, int8, int4, beside llama.cpp.

    python bench/bench_quant.py [--models gpt2-124m smollm2-135m] [--batch 1 8] [--no-llama-cpp]

Random-init transformers models of each shape are saved as checkpoint folders; mmfuse loads them
(quantizing at load time) and, when `llama_cpp` (llama-cpp-python) is installed and the llama.cpp
converter is found (--convert-script, or $LLAMA_CPP_CONVERT), the same weights are converted to
GGUF f32 and Q8_0 by llama.cpp's `convert_hf_to_gguf.py` and to Q4_0 by its quantizer
(`llama_model_quantize`). Method as `mmfuse bench`: prefill = median time of a 1-token run,
decode step = (median of a full run - prefill) / (new tokens - 1); llama.cpp is timed the same way
(its `eval` of the prompt, then one `eval` per greedy token), batch 1 only. The floor is the bytes
of weights read per step / --bandwidth-gbs. Rounds alternate ours / llama.cpp per format.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmfuse.decoder.benchmark import bench_engine, random_prompts, weight_bytes
from mmfuse.decoder.loader import load_decoder

SHAPES = {
    "gpt2-124m": ("gpt2", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                   max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)),
}
FORMATS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "int8": ("fp32", "int8"), "int4": ("fp32", "int4")}
GGUF_OF = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}


def save_random_model(shape: str, folder: Path) -> None:
    """A random-init transformers model and a placeholder byte-level BPE tokenizer of its vocab size
    (llama.cpp's converter needs one; only token ids are fed)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    family, kw = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for i in range(len(vocab), kw["vocab_size"]):
        vocab[f"<t{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def to_gguf(folder: Path, script: str, outtype: str, out: Path) -> None:
    """llama.cpp's converter, run in a child with its pre-tokenizer check answered "gpt-2" (our
    placeholder tokenizer is not one of the hashes it knows)."""
    code = ("import sys, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, __import__('os').path.dirname(sys.argv[0]));"
            "import convert_hf_to_gguf as c; c.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2';"
            "c.main()")
    subprocess.run([sys.executable, "-c", code, script, str(folder), "--outfile", str(out), "--outtype", outtype],
                   check=True, capture_output=True, text=True)


def llama_cpp_decode(path: Path, prompt: list, new_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=len(prompt), verbose=False, logits_all=False)

    def run(n):
        llm.reset()
        llm.eval(prompt)
        for _ in range(n - 1):
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([tok])

    def timed(n):
        t0 = time.perf_counter()
        run(n)
        return time.perf_counter() - t0

    run(new_tokens)
    t1 = statistics.median(timed(1) for _ in range(repeats))
    tn = statistics.median(timed(new_tokens) for _ in range(repeats))
    step = max(tn - t1, 1e-9) / (new_tokens - 1)
    return {"prefill_tok_s": len(prompt) / t1, "step_s": step, "decode_tok_s": 1 / step}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth-gbs", type=float, default=30.0)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--convert-script", default=os.environ.get("LLAMA_CPP_CONVERT"),
                    help="llama.cpp's convert_hf_to_gguf.py (its gguf-py must be importable)")
    args = ap.parse_args(argv)
    peer = not args.no_llama_cpp and args.convert_script is not None
    if peer:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama_cpp is not installed: reporting mmfuse alone")
            peer = False
    threads = torch.get_num_threads()
    print(f"{threads} threads, prompt {args.prompt_len} + {args.new_tokens} new tokens, median of {args.repeats}, "
          f"floor at {args.bandwidth_gbs:.0f} GB/s; llama.cpp: {'yes' if peer else 'no'}")
    print("| model | format | batch | mmfuse tok/s | ms/step | weight MB | floor ms | x floor | prefill tok/s "
          "| llama.cpp | llama.cpp tok/s | ms/step | ours / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf"
            save_random_model(shape, folder)
            ggufs = {}
            if peer:
                import llama_cpp

                for fmt in args.formats:
                    if fmt not in GGUF_OF:
                        continue
                    out = Path(tmp) / f"{GGUF_OF[fmt]}.gguf"
                    if fmt == "int4":
                        src = Path(tmp) / "f32.gguf"
                        if not src.is_file():
                            to_gguf(folder, args.convert_script, "f32", src)
                        params = llama_cpp.llama_model_quantize_default_params()
                        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
                        params.nthread = threads
                        if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
                            raise RuntimeError("llama_model_quantize failed")
                    elif not out.is_file():
                        to_gguf(folder, args.convert_script, GGUF_OF[fmt], out)
                    ggufs[fmt] = out
            for fmt in args.formats:
                dtype, quant = FORMATS[fmt]
                model = load_decoder(folder, dtype=dtype, quantize=quant)
                nbytes = weight_bytes(model)
                floor = nbytes / (args.bandwidth_gbs * 1e9)
                for bs in args.batch:
                    o = bench_engine(model, bs, args.prompt_len, args.new_tokens, repeats=args.repeats)
                    peer_cols = "| - | - | - | - "
                    if bs == 1 and fmt in ggufs:
                        prompt = random_prompts(model.cfg.vocab_size, 1, args.prompt_len)[0]
                        p = llama_cpp_decode(ggufs[fmt], prompt, args.new_tokens, args.repeats, threads)
                        peer_cols = (f"| {GGUF_OF[fmt].upper()} | {p['decode_tok_s']:.1f} | {p['step_s'] * 1e3:.2f} "
                                     f"| {o['decode_tok_s'] / p['decode_tok_s']:.2f}x ")
                    name = fmt if quant is None else getattr(model.quant_config, "name", fmt)
                    print(f"| {shape} | {name} | {bs} | {o['decode_tok_s']:.1f} | {o['step_s'] * 1e3:.2f} | "
                          f"{nbytes / 1e6:.1f} | {floor * 1e3:.2f} | {o['step_s'] / floor:.2f} | "
                          f"{o['prefill_tok_s']:.0f} {peer_cols}|", flush=True)
                del model


if __name__ == "__main__":
    main()
