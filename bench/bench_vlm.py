"""Vision-language model latency: mmfuse vs transformers, same random-init checkpoints, same run.

    python bench/bench_vlm.py                          # both models, fp32, CPU
    python bench/bench_vlm.py --models smolvlm --smolvlm-longest-edge 1024 --repeats 5

Models: `llava` = a CLIP ViT-B/16 tower (224 px, 196 image tokens) + a SmolLM2-135M-shaped text
model; `smolvlm` = SmolVLM-256M's shape (SigLIP-B/16 tower at 512 px per tile, pixel shuffle 4 ->
64 tokens per tile, SmolLM2-135M text model), with the processor's size.longest_edge set by
--smolvlm-longest-edge (the published folder's 2048 cuts a 640x480 image into 4x3 tiles + a global
image; 512 gives the global image only).

Batch 1, one 640x480 image in a chat-templated question. Time to first token is image in -> first
token out (preprocessing, tower, projector, prefill, one sample). Decode tok/s is the rate between
the first and the last generated token of one greedy run, read from per-token timestamps (our
`stream`, a transformers streamer's `put`), so a TTFT of seconds does not drown it. Follow-up time
to first token: after one turn about the image, the next question of the same conversation, with
prefix reuse (the image and the conversation so far stay in the KV cache) vs a cold start
(prefix_reuse=False) vs transformers (which recomputes everything). Both sides run interleaved;
medians are printed. `--clock cpu` times with the process's CPU time instead of wall time: on a
shared, loaded box it leaves out the time other jobs hold the cores (with 1 thread it is the
latency an idle box would show, cache contention aside; with more it sums the threads).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from vlm_models import BENCH_SPEC, build_idefics3, build_llava, random_image, smolvlm_bench_spec  # noqa: E402

from mmfuse.vlm.engine import VisionLanguageModel  # noqa: E402


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class _Stamps:
    """A transformers streamer that records the clock at each generated token (the first `put` is the prompt)."""

    def __init__(self, clock):
        self.clock, self.times, self.prompt_seen = clock, [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(self.clock())
        self.prompt_seen = True

    def end(self):
        pass


def _rate(times: list) -> float:
    """Tokens per second between the first and the last timestamp."""
    return (len(times) - 1) / (times[-1] - times[0])


def bench_model(name: str, folder: Path, hf, proc, args) -> dict:
    clock = CLOCKS[args.clock]
    hf.generation_config.pad_token_id = 0
    ours = VisionLanguageModel.from_pretrained(folder, prefix_reuse=False)
    warm = VisionLanguageModel.from_pretrained(folder)
    image = random_image(480, 640, 0)
    q1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"}]}]
    q2 = q1 + [{"role": "assistant", "content": [{"type": "text", "text": "a red cat and a blue dog"}]},
               {"role": "user", "content": [{"type": "text", "text": "what is the dog"}]}]
    req = ours.prepare(q1, image)
    n_image = req.images[0].tokens
    print(f"{name}: fp32, CPU, batch 1, prompt {len(req)} tokens "
          f"({n_image} image tokens, {len(req.images[0].pixels)} tiles), {args.new_tokens} new, "
          f"median of {args.repeats}, {args.clock} clock", flush=True)

    def timed(fn) -> float:
        t = clock()
        fn()
        return clock() - t

    def hf_run(msgs, n, streamer=None):
        inputs = proc(images=[image], text=proc.apply_chat_template(msgs, add_generation_prompt=True),
                      return_tensors="pt")
        with torch.inference_mode():
            hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)

    def our_run(engine, msgs, n):
        engine.generate(msgs, images=image, temperature=0.0, max_new_tokens=n, ignore_eos=True)

    def hf_decode() -> float:
        stamps = _Stamps(clock)
        hf_run(q1, args.new_tokens, stamps)
        return _rate(stamps.times)

    def our_decode() -> float:
        times = [clock() for _ in ours.stream(q1, images=image, temperature=0.0, max_new_tokens=args.new_tokens,
                                               ignore_eos=True)]
        return _rate(times)

    our_run(ours, q1, 2), hf_run(q1, 2)  # warm-up (packing, allocation)
    # numba's OpenMP layer (the GEMV) sets the process's OpenMP thread count to NUMBA_NUM_THREADS
    print(f"threads after warm-up: torch {torch.get_num_threads()} (both sides)", flush=True)
    r = {k: [] for k in ("ttft", "hf_ttft", "dec", "hf_dec", "fu_warm", "fu_cold", "fu_hf")}
    for _ in range(args.repeats):
        r["ttft"].append(timed(lambda: our_run(ours, q1, 1)))
        r["hf_ttft"].append(timed(lambda: hf_run(q1, 1)))
        r["dec"].append(our_decode())
        r["hf_dec"].append(hf_decode())
        our_run(warm, q1, 8)  # the first turn, then its follow-up
        r["fu_warm"].append(timed(lambda: our_run(warm, q2, 1)))
        assert warm.reused_positions > n_image
        r["fu_cold"].append(timed(lambda: our_run(ours, q2, 1)))
        r["fu_hf"].append(timed(lambda: hf_run(q2, 1)))
        print("repeat (s, tok/s): " + " ".join(f"{k} {v[-1]:.2f}" for k, v in r.items()), flush=True)
    m = {k: statistics.median(v) for k, v in r.items()}
    print(f"{'':<34} {'mmfuse':>9} {'transformers':>12} {'ratio':>6}")
    print(f"{'time to first token (ms)':<34} {m['ttft'] * 1e3:>9.1f} {m['hf_ttft'] * 1e3:>12.1f} "
          f"{m['hf_ttft'] / m['ttft']:>6.2f}")
    print(f"{'decode (tok/s)':<34} {m['dec']:>9.1f} {m['hf_dec']:>12.1f} {m['dec'] / m['hf_dec']:>6.2f}")
    print(f"{'follow-up TTFT, prefix reuse (ms)':<34} {m['fu_warm'] * 1e3:>9.1f} {m['fu_hf'] * 1e3:>12.1f} "
          f"{m['fu_hf'] / m['fu_warm']:>6.2f}")
    print(f"{'follow-up TTFT, cold (ms)':<34} {m['fu_cold'] * 1e3:>9.1f} {'':>12} "
          f"{'':>6}  reuse speed-up {m['fu_cold'] / m['fu_warm']:.2f}x", flush=True)
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    return m


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llava", "smolvlm"], choices=["llava", "smolvlm"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the process's CPU time (a shared, loaded box)")
    ap.add_argument("--smolvlm-longest-edge", type=int, default=2048,
                    help="the SmolVLM processor's size.longest_edge (a multiple of 512)")
    args = ap.parse_args(argv)
    for name in args.models:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as folder:
            if name == "llava":
                hf, proc = build_llava(BENCH_SPEC, Path(folder))
                title = "LLaVA CLIP ViT-B/16 + SmolLM2-135M shape"
            else:
                hf, proc = build_idefics3(smolvlm_bench_spec(args.smolvlm_longest_edge), Path(folder))
                title = f"SmolVLM-256M shape, longest_edge {args.smolvlm_longest_edge}"
            bench_model(title, Path(folder), hf, proc, args)


if __name__ == "__main__":
    main()
