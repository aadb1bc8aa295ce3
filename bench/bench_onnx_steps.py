"""Decode-step time of one exported decoder graph run different ways, interleaved: mmfuse's
`DecoderSession` (OrtEngine's loop) with onnxruntime's spinning on (mmfuse's default, stopped after
each run) and off, on model_last_logits.onnx and model.onnx, with 1 thread; onnxruntime-genai on
the same folder and on its model builder's export, at its default threads and at `--genai-threads`
(a copy of each folder's genai_config.json with session_options.intra_op_num_threads set). It
separates the graph from the way it is run; with `--genai-threads`, also mmfuse's session loaded with
MMFUSE_HUGE_PAGES=0 (onnxruntime's weight buffers left in 4 KiB pages).

    python bench/bench_onnx.py --workdir W --models smollm2-135m --engines none   # the exports
    python -m onnxruntime_genai.models.builder -i W/smollm2-135m-hf -o W/smollm2-135m-builder -p fp32 -e cpu
    python bench/bench_onnx_steps.py --workdir W --steps 16 --rounds 3 --genai-threads 2

Batch 1, a 128-token random prompt, then greedy steps; each round runs every variant once; medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np

from mmfuse.ort.decoder_session import GRAPH_FILE, RUNTIME_GRAPH, DecoderSession
from mmfuse.ort.manifest import read_manifest
from mmfuse.ort.session import make_session


def session_runner(folder: Path, graph: str, prompt: np.ndarray, steps: int, huge_pages: bool = True, **options):
    """mmfuse's DecoderSession on `folder/graph`; huge_pages=False: loaded with MMFUSE_HUGE_PAGES=0."""
    saved = os.environ.get("MMFUSE_HUGE_PAGES")
    os.environ["MMFUSE_HUGE_PAGES"] = "1" if huge_pages else "0"
    try:
        sess = make_session(folder / graph, **options)
    finally:
        if saved is None:
            del os.environ["MMFUSE_HUGE_PAGES"]
        else:
            os.environ["MMFUSE_HUGE_PAGES"] = saved
    manifest = read_manifest(folder, "decoder")

    def run() -> float:
        s = DecoderSession(sess, manifest)
        s.allocate(1, len(prompt) + steps + 1)
        logits = s.prefill([prompt])
        t = time.perf_counter()
        for _ in range(steps):
            logits = s.decode(np.array([int(np.argmax(logits[0]))]))
        return (time.perf_counter() - t) / steps

    return run


def genai_runner(folder: Path, prompt: np.ndarray, steps: int, threads: Optional[int] = None):
    """onnxruntime-genai on `folder`; with `threads`, on a sibling folder whose genai_config.json sets them."""
    import onnxruntime_genai as og

    if threads is not None:
        folder = with_genai_threads(folder, threads)
    model = og.Model(str(folder))

    def run() -> float:
        params = og.GeneratorParams(model)
        n = len(prompt) + steps + 1
        params.set_search_options(max_length=n, min_length=n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt[None].astype(np.int32))
        gen.generate_next_token()
        t = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        return (time.perf_counter() - t) / steps

    return run


def with_genai_threads(folder: Path, threads: int) -> Path:
    """A sibling of `folder` (its files linked) whose genai_config.json runs `threads` intra-op threads."""
    out = folder.with_name(f"{folder.name}-genai{threads}t")
    out.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "genai_config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((folder / "genai_config.json").read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="bench_onnx.py's --workdir (with the exports)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--genai-threads", type=int, default=None,
                    help="also run both sides with this many intra-op threads (genai's default here is 1)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    ours, theirs = work / f"{args.model}-optimized", work / f"{args.model}-builder"
    vocab = read_manifest(ours, "decoder")["config"]["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, vocab, args.prompt_len)
    n = args.steps
    runners = {
        "DecoderSession, model_last_logits.onnx, spinning on (default)": session_runner(ours, RUNTIME_GRAPH, prompt, n),
        "DecoderSession, model_last_logits.onnx, spinning off": session_runner(ours, RUNTIME_GRAPH, prompt, n,
                                                                                spinning=False),
        "DecoderSession, model.onnx, spinning on": session_runner(ours, GRAPH_FILE, prompt, n),
        "DecoderSession, model_last_logits.onnx, 1 thread": session_runner(ours, RUNTIME_GRAPH, prompt, n, threads=1),
        "genai on our optimised export": genai_runner(ours, prompt, n),
    }
    builder = (theirs / "genai_config.json").exists()
    if builder:
        runners["genai on its builder's export"] = genai_runner(theirs, prompt, n)
    if args.genai_threads:
        t = args.genai_threads
        runners[f"DecoderSession, model_last_logits.onnx, {t} threads, spinning on"] = session_runner(
            ours, RUNTIME_GRAPH, prompt, n, threads=t)
        runners[f"DecoderSession, model_last_logits.onnx, {t} threads, spinning on, MMFUSE_HUGE_PAGES=0"] = \
            session_runner(ours, RUNTIME_GRAPH, prompt, n, huge_pages=False, threads=t)
        runners[f"genai on our optimised export, {t} threads"] = genai_runner(ours, prompt, n, t)
        if builder:
            runners[f"genai on its builder's export, {t} threads"] = genai_runner(theirs, prompt, n, t)
    times = {k: [] for k in runners}
    for run in runners.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for k, run in runners.items():
            times[k].append(run())
    huge = sum(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages"))
    print(f"AnonHugePages in this process: {huge >> 10} MiB\n")
    print("| way of running (batch 1) | ms per decode step (median) | rounds |\n|---|---|---|")
    for k, ts in times.items():
        print(f"| {k} | {1e3 * statistics.median(ts):.1f} | {', '.join(f'{1e3 * t:.0f}' for t in ts)} |")


if __name__ == "__main__":
    main()
