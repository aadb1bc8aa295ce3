"""mmfuse vs llama.cpp on the CPU: the same random weights, prefill and decode, per format.

    python bench/bench_llamacpp.py --llama-cpp-src DIR [--models gpt2-124m smollm2-135m]
        [--formats fp32 int8 int4] [--prompt-len 128] [--new-tokens 128] [--repeats 5] [--batch 1] [--unfused]

Needs `llama-cpp-python` (built from PyPI's sdist) and the llama.cpp source tree it vendors
(`DIR` = .../vendor/llama.cpp, for `convert_hf_to_gguf.py` and `gguf-py`). Each shape is saved
once as a random-init transformers folder (with a synthetic byte-level BPE tokenizer, which
llama.cpp's converter needs but no timed run uses); llama.cpp's own converter writes it as GGUF
f32, and llama.cpp's quantizer makes Q8_0 and Q4_0 from that. The formats pair up as
fp32 ~ f32, int8 (per channel) ~ Q8_0, int4 with groups of 32 ~ Q4_0 (blocks of 32).

With `--batch B` both sides decode B different random prompts together (llama.cpp: B sequences
in one context, one llama_decode per step; tok/s count every sequence's tokens). The warm-up run
checks the harness: the share of greedy tokens both sides agree on is printed (fp32 ~ f32 agree
until the first near-tie of logits; the quantized formats round differently).
Both sides get the same token ids and decode greedily with eos ignored; both run on the same
number of threads (torch's). Method as bench_quant: prefill = median time of prompt + 1 token,
decode step = (median time of prompt + N tokens - prefill) / (N - 1); the engines are timed in
alternating rounds so load from other jobs spreads over both, with a 0.2 s pause before each
timed run (the engine that ran before may still have OpenMP threads spinning). `--unfused` adds mmfuse with its
fused CPU decode step switched off (MMFUSE_FUSED_DECODE=0) as a third engine in the same rounds.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmfuse.decoder.benchmark import random_prompts
from mmfuse.decoder.generate import Engine
from mmfuse.decoder.loader import load_decoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import SHAPES, save_random_model  # noqa: E402
from common import unfused  # noqa: E402

PAIRS = {"fp32": ("fp32", "f32"), "int8": ("int8", "q8_0"), "int4": ("int4-g32", "q4_0")}

# Run llama.cpp's converter on the synthetic tokenizer as a GPT-2 byte-level BPE: its hash is not in
# the pre-tokenizer table, and Llama folders would first try sentencepiece and the HF Llama vocab.
# The tokenizer plays no part in the timed runs (token ids in, logits out).
CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
def no_file(self):
    raise FileNotFoundError("not a sentencepiece tokenizer")
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
base.TextModel._set_vocab_sentencepiece = no_file
base.TextModel._set_vocab_llama_hf = no_file
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def save_synthetic_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with `vocab_size` entries (the 256 bytes, one merge, fillers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["\u0120t"] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"<f{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    last = f"<f{vocab_size - 1}>"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=last, eos_token=last).save_pretrained(folder)


def add_n_ctx(folder: Path) -> None:
    """GPT-2 configs published on the Hub carry `n_ctx` (the converter reads it); transformers no longer writes it."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") == "gpt2":
        cfg.setdefault("n_ctx", cfg["n_positions"])
        path.write_text(json.dumps(cfg, indent=2))


def to_gguf(src: Path, folder: Path, out: Path) -> None:
    cmd = [sys.executable, "-c", CONVERT, str(src), str(folder), "--outfile", str(out), "--outtype", "f32"]
    # not from the repository root: `python -c` puts the working directory on sys.path, where our
    # kernels/ would shadow Hugging Face's `kernels` package that transformers imports for Llama
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    if done.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf failed:\n{done.stderr[-3000:]}")


def quantize_gguf(src: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {kind} failed")


class LlamaCppRunner:
    """Greedy decoding of B sequences through llama.cpp's C API: the prompts in one llama_decode,
    then one llama_decode per step with one token per sequence; argmax in numpy."""

    def __init__(self, path: Path, n_ctx: int, threads: int, batch: int = 1, extra_bufts: bool = True):
        import llama_cpp
        from llama_cpp._utils import suppress_stdout_stderr

        self.api, self.batch, self.quiet = llama_cpp, batch, suppress_stdout_stderr
        mp = llama_cpp.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts  # llama.cpp's own model parameter; llama-cpp-python's Llama does not expose it
        with self.quiet(disable=False):
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx * batch  # split evenly between the sequences
        cp.n_batch = cp.n_ubatch = n_ctx * batch
        cp.n_seq_max = batch
        cp.n_threads = cp.n_threads_batch = threads
        with self.quiet(disable=False):
            self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.tokens = llama_cpp.llama_batch_init(cp.n_batch, 0, batch)

    def __del__(self):
        api = getattr(self, "api", None)
        if api is not None and getattr(self, "ctx", None):
            with self.quiet(disable=False):
                api.llama_batch_free(self.tokens)
                api.llama_free(self.ctx)
                api.llama_model_free(self.model)

    def _decode(self, rows: list) -> np.ndarray:
        """rows: (sequence, position, token, wants logits); -> logits (rows wanting them, V)."""
        b, api = self.tokens, self.api
        b.n_tokens = len(rows)
        for i, (seq, pos, tok, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        if api.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")
        want = [i for i, r in enumerate(rows) if r[3]]
        return np.stack([np.ctypeslib.as_array(api.llama_get_logits_ith(self.ctx, i), (self.vocab,)) for i in want])

    def generate(self, prompts: list, n: int) -> list:
        """Greedy continuations (n tokens) of `batch` prompts."""
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        rows = [(s, j, t, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        logits = self._decode(rows)
        out = [[] for _ in prompts]
        for step in range(n):
            nxt = logits.argmax(-1)
            for s, t in enumerate(nxt):
                out[s].append(int(t))
            if step + 1 < n:
                logits = self._decode([(s, len(p) + step, int(t), True) for s, (p, t) in enumerate(zip(prompts, nxt))])
        return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp-src", type=Path, required=True, help="llama.cpp source tree (vendor/llama.cpp)")
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--formats", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together (different random prompts)")
    ap.add_argument("--unfused", action="store_true", help="also time mmfuse without its fused decode step")
    ap.add_argument("--plain-buffers", action="store_true",
                    help="Q8_0/Q4_0 without llama.cpp's extra buffer types (its AMX / repacked weights), whose "
                         "Q8_0 and Q4_0 runs segfault in llama-cpp-python 0.3.36 on an AMX Xeon")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    n_ctx = args.prompt_len + args.new_tokens + 8
    print(f"{threads} threads, batch {args.batch}, prompt {args.prompt_len} + {args.new_tokens} new tokens, "
          f"median of {args.repeats} alternating rounds")
    extra = " unfused tok/s | unfused decode x |" if args.unfused else ""
    print("| model | mmfuse | llama.cpp | mmfuse tok/s | llama.cpp tok/s | decode x | "
          f"mmfuse prefill tok/s | llama.cpp prefill tok/s | prefill x |{extra}")
    print("|---" * (9 + 2 * args.unfused) + "|")
    for shape in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "hf"
            save_random_model(shape, folder)
            vocab = SHAPES[shape][1]["vocab_size"]
            save_synthetic_tokenizer(folder, vocab)
            add_n_ctx(folder)
            f32 = Path(tmp) / "f32.gguf"
            to_gguf(args.llama_cpp_src, folder, f32)
            prompts = random_prompts(vocab, args.batch, args.prompt_len)
            for fmt in args.formats:
                ours, theirs = PAIRS[fmt]
                gguf = f32 if theirs == "f32" else Path(tmp) / f"{theirs}.gguf"
                if theirs != "f32":
                    quantize_gguf(f32, gguf, theirs)
                engine = Engine(load_decoder(folder, dtype="fp32", quantize=None if ours == "fp32" else ours))
                peer = LlamaCppRunner(gguf, n_ctx, threads, args.batch,
                                      extra_bufts=theirs == "f32" or not args.plain_buffers)
                runs = {
                    "mmfuse": lambda n: engine.generate(prompts, temperature=0.0, max_new_tokens=n, ignore_eos=True),
                    "llama.cpp": lambda n: peer.generate(prompts, n),
                }
                if args.unfused:
                    def run_unfused(n):
                        with unfused():
                            return runs["mmfuse"](n)

                    runs["unfused"] = run_unfused
                t1 = {k: [] for k in runs}
                tn = {k: [] for k in runs}
                with torch.inference_mode():
                    warm = {k: run(args.new_tokens) for k, run in runs.items()}  # warm-up
                ours_ids = [c.token_ids for c in warm["mmfuse"]]
                agree = np.mean([a == b for x, y in zip(ours_ids, warm["llama.cpp"]) for a, b in zip(x, y)])
                with torch.inference_mode():
                    for _ in range(args.repeats):
                        for k, run in runs.items():
                            for n, store in ((1, t1), (args.new_tokens, tn)):
                                time.sleep(0.2)  # let the other engine's OpenMP threads stop spinning
                                t0 = time.perf_counter()
                                run(n)
                                store[k].append(time.perf_counter() - t0)
                pre = {k: statistics.median(t1[k]) for k in runs}
                step = {k: max(statistics.median(tn[k]) - pre[k], 1e-9) / (args.new_tokens - 1) for k in runs}
                dec = {k: args.batch / step[k] for k in runs}
                pf = {k: args.batch * args.prompt_len / pre[k] for k in runs}
                print(f"| {shape} | {ours} | {theirs} | {dec['mmfuse']:.1f} | {dec['llama.cpp']:.1f} | "
                      f"{dec['mmfuse'] / dec['llama.cpp']:.2f} | {pf['mmfuse']:.0f} | {pf['llama.cpp']:.0f} | "
                      f"{pf['mmfuse'] / pf['llama.cpp']:.2f} |"
                      + (f" {dec['unfused']:.1f} | {dec['unfused'] / dec['llama.cpp']:.2f} |" if args.unfused else "")
                      + f" tokens agree {agree:.0%}", flush=True)


if __name__ == "__main__":
    main()
