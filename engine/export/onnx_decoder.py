"""Export a GPT-2 or Llama/Mistral/Qwen2 checkpoint folder to an ONNX folder and check it.

The folder holds model.onnx + model.onnx.data (graph and weights), genai_config.json, the
checkpoint's config/tokenizer files, and mmfuse_export.json (variant, sizes, file sizes, the
check's largest difference). It is built in a temporary folder beside `out_dir`, checked
(onnx.checker full check, then onnxruntime on fresh random prompts of different lengths, without
and with past, against the PyTorch engine), and only then moved into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..jsonfile import read_config
from ..decoder.config import DecoderConfig
from ..errors import ConfigError, ExportCheckError
from ..files import atomic_open
from ..ort.decoder_session import GRAPH_FILE, RUNTIME_GRAPH, DecoderSession
from ..ort.manifest import publish, write_manifest
from ..ort.session import make_session
from .decoder_graph import MIN_OPSET, ONNX_DTYPES, DecoderExportOptions, DecoderGraph, check_opset, weights_from_model
from .genai_config import genai_config
from .graph import save_with_external_data

# Checkpoint files copied beside the graph (tokenizer, generation defaults, chat template).
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                "chat_template.jinja")
# Largest |logit difference| to the fp32 PyTorch engine, relative to max(1, largest |logit|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
# int8 against the fp32 graph on the check prompts: the largest |logit difference| relative to
# max(1, largest |logit|). Dynamic int8 (activations quantized per tensor) gives 0.05-0.16 on the
# tests' tiny random-init models (weights of std 0.2) and 0.08 on a SmolLM2-135M-shaped one; the bound
# catches a broken quantization (wrong scales, a missed layer). The share of positions whose top
# token is unchanged is reported, not bounded: random-init models are full of near ties.
INT8_TOLERANCE = 0.25


def export_decoder(model_dir, out_dir, dtype: str = "fp32", opset: int = MIN_OPSET, optimize: bool = False,
                   inputs_embeds: bool = False, quantize: Optional[str] = None,
                   log: Callable[[str], None] = print, model=None, hf: Optional[dict] = None) -> dict:
    """Export, check and write the folder; returns the manifest (with the check's differences).
    quantize="int8": the fp32 graph is exported and checked, then quantized (`quantize.quantize_int8`)
    and checked against it; the folder holds the int8 graph. `model` and `hf`: an fp32 `Decoder`
    already loaded and its config dict (the text model of a vision-language checkpoint in
    `model_dir`); then no checkpoint files are copied beside the graph."""
    import torch

    from ..decoder.loader import load_decoder

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf = read_config(model_dir) if hf is None else hf
    cfg = DecoderConfig.from_hf(hf, source=str(model_dir / "config.json"))  # refuses unsupported fields
    if dtype not in ONNX_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {sorted(ONNX_DTYPES)}")
    check_opset(opset)
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize!r}: expected int8")
    if quantize and dtype != "fp32":
        raise ConfigError(f"--quantize {quantize} with --dtype {dtype}: int8 quantizes an fp32 export (drop --dtype)")
    if optimize and cfg.head_dim % 8:
        raise ConfigError(f"--optimize: head size {cfg.head_dim} (hidden size / attention heads in "
                          f"{model_dir / 'config.json'}) is not a multiple of 8, which GroupQueryAttention needs; "
                          "export without --optimize")
    opts = DecoderExportOptions(dtype=dtype, opset=int(opset), optimize=optimize, inputs_embeds=inputs_embeds,
                                head_matmul=quantize is not None)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    own = model is None
    model = load_decoder(model_dir, dtype="fp32") if own else model
    model.ensure_positions(cfg.max_seq_len)  # RoPE tables for the whole context (they grow on demand)
    rope = None if cfg.learned_pos else (model.rope_cos.numpy(), model.rope_sin.numpy())
    graph = DecoderGraph(cfg, weights_from_model(model), rope, opts).build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_with_external_data(graph, tmp / GRAPH_FILE)
        del graph
        copied = [f for f in COPIED_FILES if own and (model_dir / f).is_file()]
        for f in copied:
            shutil.copyfile(model_dir / f, tmp / f)
        with atomic_open(tmp / "genai_config.json", encoding="utf-8") as f:
            json.dump(genai_config(model_dir, cfg, hf["model_type"], optimize, inputs_embeds, GRAPH_FILE), f, indent=4)
        files = [GRAPH_FILE, GRAPH_FILE + ".data", "genai_config.json", *copied]
        fields = dict(variant="optimized" if optimize else "portable", dtype=dtype, quantize=quantize, opset=int(opset),
                      inputs_embeds=inputs_embeds, model_type=hf["model_type"],
                      config=dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                                  head_dim=cfg.head_dim, d_model=cfg.d_model, vocab_size=cfg.vocab_size,
                                  max_seq_len=cfg.max_seq_len, eos_token_ids=list(cfg.eos_token_ids),
                                  bos_token_id=cfg.bos_token_id))
        manifest = write_manifest(tmp, "decoder", files, **fields)
        embed = (lambda s: model.embed(torch.as_tensor(s)).numpy()) if inputs_embeds else None  # ids -> (L, C)
        with torch.no_grad():
            diffs = check_decoder_export(tmp, model, manifest, log=log)
            if quantize:
                fields["int8"] = quantize_decoder(tmp, manifest, embed, log=log)
            write_runtime_graph(tmp)
            diffs["last_logits"] = check_runtime_graph(tmp, manifest, embed, log=log)
        files.append(RUNTIME_GRAPH)
        manifest = write_manifest(tmp, "decoder", files, **fields, check=diffs)
        publish(tmp, out_dir, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_prompts(vocab_size: int, context: int, rng, steps: int = 3) -> tuple:
    """Two random prompts of different lengths, each with `steps` continuation tokens: (seqs, lens)."""
    hi = max(2, min(12, context - steps))
    lens = [int(rng.integers(1, hi)), int(rng.integers(1, hi))]
    if lens[0] == lens[1]:
        lens[1] = max(1, lens[0] - 1) if lens[0] > 1 else 2
    return [rng.integers(0, vocab_size, n + steps) for n in lens], lens


def session_logits(sess: DecoderSession, seqs: list, lens: list, embed=None) -> tuple:
    """Run the graph on the prompts seqs[b][:lens[b]] (no past), then on the rest of each sequence
    with past (one token per call in the optimised variant). -> (prefill (B, S, V), continuation
    (B, k, V)) float32. `embed` maps ids to embeddings for an inputs_embeds graph."""
    steps = len(seqs[0]) - lens[0]
    sess.allocate(len(seqs), max(lens) + steps)

    def inputs(s):
        return s if embed is None else embed(s).astype(sess.dtype)

    prefill = sess.prefill([inputs(s[:n]) for s, n in zip(seqs, lens)], all_logits=True).astype(np.float32)
    cont = np.stack([inputs(s[n:]) for s, n in zip(seqs, lens)])  # (B, k) ids or (B, k, C)
    if sess.shared:
        got = np.stack([sess.extend(cont[:, j: j + 1])[:, 0] for j in range(steps)], axis=1)
    else:
        got = sess.extend(cont)
    return prefill, got.astype(np.float32)


def check_decoder_export(folder: Path, model, manifest: dict, log: Callable[[str], None] = print,
                         seed: Optional[int] = None) -> dict:
    """onnx.checker (full check), then the graph in onnxruntime against the PyTorch model on fresh
    random prompts of two different lengths: prefill logits (no past) at every prompt position, then
    continuation logits with past. Raises ExportCheckError above tolerance; returns the differences."""
    import torch

    check_graph(folder / GRAPH_FILE)
    cfg = model.cfg
    seqs, lens = check_prompts(cfg.vocab_size, cfg.max_seq_len, np.random.default_rng(seed))  # fresh inputs on every export unless seeded
    ref = [model(torch.as_tensor(s)[None], torch.arange(len(s))[None])[0].numpy() for s in seqs]  # (L+k, V) each
    sess = DecoderSession(make_session(folder / GRAPH_FILE), manifest)
    embed = (lambda s: model.embed(torch.as_tensor(s)).numpy()) if sess.inputs_embeds else None
    prefill, got = session_logits(sess, seqs, lens, embed)
    d_prefill = max(float(np.abs(prefill[b, :n] - r[:n]).max()) for b, (n, r) in enumerate(zip(lens, ref)))
    d_past = max(float(np.abs(got[b] - r[n:]).max()) for b, (n, r) in enumerate(zip(lens, ref)))
    scale = max(1.0, max(float(np.abs(r).max()) for r in ref))
    tol = TOLERANCE[manifest["dtype"]] * scale
    log(f"check: onnx.checker full check passed; largest |logit difference| vs the PyTorch engine "
        f"(prompts of {lens[0]} and {lens[1]} tokens): without past {d_prefill:.3g}, with past {d_past:.3g} "
        f"(tolerance {tol:.3g})")
    if not max(d_prefill, d_past) <= tol:
        raise ExportCheckError(f"{folder / GRAPH_FILE}: logits differ from the PyTorch engine by "
                               f"{max(d_prefill, d_past):.3g} > tolerance {tol:.3g}")
    return {"without_past": d_prefill, "with_past": d_past, "tolerance": tol}


def write_runtime_graph(folder: Path) -> None:
    """RUNTIME_GRAPH beside GRAPH_FILE: the same weights (its data file), logit_positions without its
    default, and the LM head's rows taken from it directly: the nodes that choose between the given
    positions and every position (a dozen small operators per call) go."""
    import onnx

    model = onnx.load(str(folder / GRAPH_FILE), load_external_data=False)
    graph = model.graph
    kept = [t for t in graph.initializer if t.name != "logit_positions"]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        if node.name == "/lm_head/positions":  # Concat(given, every position or none) -> the given ones
            node.op_type, node.domain = "Identity", ""
            del node.input[:], node.attribute[:]
            node.input.append("logit_positions")
    live = {o.name for o in graph.output}
    nodes = []
    for node in reversed(graph.node):  # the nodes an output depends on (graph.node is topologically sorted)
        if any(o in live for o in node.output):
            nodes.append(node)
            live.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(nodes))
    onnx.save_model(model, str(folder / RUNTIME_GRAPH))


def check_runtime_graph(folder: Path, manifest: dict, embed=None, log: Callable[[str], None] = print) -> float:
    """onnx.checker on RUNTIME_GRAPH, then its prefill logits (each row's last position) against
    GRAPH_FILE's at the same positions on random prompts, within the export's tolerance (relative to
    max(1, |logit|)); -> the largest difference."""
    check_graph(folder / RUNTIME_GRAPH)
    full = DecoderSession(make_session(folder / GRAPH_FILE), manifest)
    last = DecoderSession(make_session(folder / RUNTIME_GRAPH), manifest)
    if not last.logit_positions or full.logit_positions:
        raise ExportCheckError(f"{folder / RUNTIME_GRAPH}: logit_positions should be an input there and have a "
                               f"default in {GRAPH_FILE}")
    seqs, lens = check_prompts(full.vocab_size, full.context, np.random.default_rng(), steps=0)
    prompts = [s if embed is None else embed(s).astype(full.dtype) for s in seqs]
    full.allocate(len(prompts), max(lens))
    last.allocate(len(prompts), max(lens))
    ref = full.prefill(prompts).astype(np.float32)
    diff = float(np.abs(last.prefill(prompts).astype(np.float32) - ref).max())
    # int8 scales activations per tensor, so the head's input rows (B, not B x S) change its rounding
    rel = INT8_TOLERANCE if manifest.get("quantize") else TOLERANCE[manifest["dtype"]]
    tol = rel * max(1.0, float(np.abs(ref).max()))
    log(f"check: {RUNTIME_GRAPH} (last-position logits) vs {GRAPH_FILE}: largest difference {diff:.3g}")
    if not diff <= tol:
        raise ExportCheckError(f"{folder / RUNTIME_GRAPH}: last-position logits differ from {GRAPH_FILE}'s by "
                               f"{diff:.3g} > {tol:.3g}")
    return diff


def check_graph(path: Path) -> None:
    """onnx.checker's full check (with shape inference); ExportCheckError naming the file."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportCheckError(f"{path}: onnx.checker failed: {e}") from None


def decode_step_seconds(sess: DecoderSession, prompt_len: int = 16, steps: int = 16) -> float:
    """Median time of one batch-1 decode call after a `prompt_len` prefill (a rough speed figure
    for the export's report, not a benchmark: bench/bench_onnx.py is)."""
    n = max(1, min(prompt_len, sess.context - steps - 1))
    sess.allocate(1, n + steps + 1)
    rng = np.random.default_rng(0)
    if sess.inputs_embeds:
        logits = sess.prefill([rng.standard_normal((n, sess.d_model)).astype(sess.dtype)])
    else:
        logits = sess.prefill([np.arange(n) % sess.vocab_size])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        if sess.inputs_embeds:
            logits = sess.extend(rng.standard_normal((1, 1, sess.d_model)).astype(sess.dtype))[:, 0]
        else:
            logits = sess.decode(np.array([int(np.argmax(logits[0]))]))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def quantize_decoder(folder: Path, manifest: dict, embed: Optional[Callable] = None, log: Callable[[str], None] = print,
                     seed: Optional[int] = None) -> dict:
    """Replace the checked fp32 graph in `folder` by its dynamic-int8 version, after checking it
    (onnx.checker, then logits against the fp32 graph on fresh random prompts, with and without past)
    and timing a decode step of both. `embed` maps ids to embeddings for an inputs_embeds graph.
    -> the record for the manifest (sizes, differences, top-1 agreement, step times)."""
    from .quantize import quantize_int8

    fp32_path = folder / GRAPH_FILE
    q_dir = folder / "int8"
    q_path = quantize_int8(fp32_path, q_dir / GRAPH_FILE, external_data=True)
    check_graph(q_path)
    fp32 = DecoderSession(make_session(fp32_path), manifest)
    int8 = DecoderSession(make_session(q_path), manifest)
    seqs, lens = check_prompts(fp32.vocab_size, fp32.context, np.random.default_rng(seed), steps=4)

    def positions(logits):  # every real position: each row's prompt, then its continuation -> (N, V)
        prefill, cont = logits
        return np.concatenate([prefill[b, :n] for b, n in enumerate(lens)] + list(cont))

    ref_all = positions(session_logits(fp32, seqs, lens, embed))
    got_all = positions(session_logits(int8, seqs, lens, embed))
    scale = max(1.0, float(np.abs(ref_all).max()))
    diff = float(np.abs(ref_all - got_all).max()) / scale
    top1 = float(np.mean(ref_all.argmax(-1) == got_all.argmax(-1)))
    t32, t8 = decode_step_seconds(fp32), decode_step_seconds(int8)
    size32 = sum((folder / f).stat().st_size for f in (GRAPH_FILE, GRAPH_FILE + ".data"))
    size8 = sum((q_dir / f).stat().st_size for f in (GRAPH_FILE, GRAPH_FILE + ".data"))
    log(f"int8: {size8 / 1e6:.2f} MB ({size8 / size32:.2f}x fp32's {size32 / 1e6:.2f} MB); logits vs fp32 "
        f"(prompts of {lens[0]} and {lens[1]} tokens, with and without past): largest |difference| "
        f"{diff:.3g} of max(1, |logit|) (tolerance {INT8_TOLERANCE}), top token unchanged at {top1:.1%} of "
        f"{len(ref_all)} positions; batch-1 decode step {1e3 * t8:.2f} ms vs "
        f"fp32 {1e3 * t32:.2f} ms ({t32 / t8:.2f}x, one rough measure)")
    if not diff <= INT8_TOLERANCE:
        raise ExportCheckError(f"{q_path}: int8 logits differ from fp32 by {diff:.3g} of max(1, |logit|) "
                               f"(tolerance {INT8_TOLERANCE})")
    for f in (GRAPH_FILE, GRAPH_FILE + ".data"):
        os.replace(q_dir / f, folder / f)
    shutil.rmtree(q_dir, ignore_errors=True)
    return {"method": "dynamic int8 (onnxruntime quantize_dynamic, per-channel 7-bit weights)",
            "bytes": size8, "fp32_bytes": size32, "max_rel_diff": diff, "top1_agreement": top1,
            "tolerance": INT8_TOLERANCE, "decode_step_ms": 1e3 * t8, "fp32_decode_step_ms": 1e3 * t32}
