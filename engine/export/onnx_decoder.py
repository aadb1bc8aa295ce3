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
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..checkpoint import read_config
from ..decoder.config import DecoderConfig
from ..errors import ConfigError, ExportCheckError
from ..files import atomic_open
from ..ort.decoder_session import DecoderSession
from ..ort.manifest import MANIFEST, write_manifest
from ..ort.session import make_session
from .decoder_graph import MIN_OPSET, ONNX_DTYPES, DecoderExportOptions, DecoderGraph, check_opset, weights_from_model
from .genai_config import genai_config
from .graph import save_with_external_data

GRAPH_FILE = "model.onnx"
# Checkpoint files copied beside the graph (tokenizer, generation defaults, chat template).
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                "chat_template.jinja")
# Largest |logit difference| to the fp32 PyTorch engine, relative to max(1, largest |logit|).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


def export_decoder(model_dir, out_dir, dtype: str = "fp32", opset: int = MIN_OPSET, optimize: bool = False,
                   inputs_embeds: bool = False, log: Callable[[str], None] = print) -> dict:
    """Export, check and write the folder; returns the manifest (with the check's differences)."""
    import torch

    from ..decoder.loader import load_decoder

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf = read_config(model_dir)
    cfg = DecoderConfig.from_hf(hf, source=str(model_dir / "config.json"))  # refuses unsupported fields
    if dtype not in ONNX_DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: expected one of {sorted(ONNX_DTYPES)}")
    check_opset(opset)
    opts = DecoderExportOptions(dtype=dtype, opset=int(opset), optimize=optimize, inputs_embeds=inputs_embeds)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)

    model = load_decoder(model_dir, dtype="fp32")
    model.ensure_positions(cfg.max_seq_len)  # RoPE tables for the whole context (they grow on demand)
    rope = None if cfg.learned_pos else (model.rope_cos.numpy(), model.rope_sin.numpy())
    graph = DecoderGraph(cfg, weights_from_model(model), rope, opts).build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_with_external_data(graph, tmp / GRAPH_FILE)
        del graph
        copied = [f for f in COPIED_FILES if (model_dir / f).is_file()]
        for f in copied:
            shutil.copyfile(model_dir / f, tmp / f)
        with atomic_open(tmp / "genai_config.json", encoding="utf-8") as f:
            json.dump(genai_config(model_dir, cfg, hf["model_type"], optimize, inputs_embeds, GRAPH_FILE), f, indent=4)
        files = [GRAPH_FILE, GRAPH_FILE + ".data", "genai_config.json", *copied]
        fields = dict(variant="optimized" if optimize else "portable", dtype=dtype, opset=int(opset),
                      inputs_embeds=inputs_embeds, model_type=hf["model_type"],
                      config=dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                                  head_dim=cfg.head_dim, d_model=cfg.d_model, vocab_size=cfg.vocab_size,
                                  max_seq_len=cfg.max_seq_len, eos_token_ids=list(cfg.eos_token_ids),
                                  bos_token_id=cfg.bos_token_id))
        manifest = write_manifest(tmp, "decoder", files, **fields)
        with torch.no_grad():
            diffs = check_decoder_export(tmp, model, manifest, log=log)
        manifest = write_manifest(tmp, "decoder", files, **fields, check=diffs)
        for f in files:  # the manifest last: a folder without it is not a finished export
            os.replace(tmp / f, out_dir / f)
        os.replace(tmp / MANIFEST, out_dir / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def check_decoder_export(folder: Path, model, manifest: dict, log: Callable[[str], None] = print,
                         seed: Optional[int] = None) -> dict:
    """onnx.checker (full check), then the graph in onnxruntime against the PyTorch model on fresh
    random prompts of two different lengths: prefill logits (no past) at every prompt position, then
    continuation logits with past. Raises ExportCheckError above tolerance; returns the differences."""
    import onnx
    import torch

    try:
        onnx.checker.check_model(str(folder / GRAPH_FILE), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportCheckError(f"{folder / GRAPH_FILE}: onnx.checker failed: {e}") from None
    cfg = model.cfg
    rng = np.random.default_rng(seed)  # fresh inputs on every export unless a seed is given
    steps = 3
    hi = max(2, min(12, cfg.max_seq_len - steps))
    lens = [int(rng.integers(1, hi)), int(rng.integers(1, hi))]
    if lens[0] == lens[1]:
        lens[1] = max(1, lens[0] - 1) if lens[0] > 1 else 2
    seqs = [rng.integers(0, cfg.vocab_size, n + steps) for n in lens]
    ref = [model(torch.as_tensor(s)[None], torch.arange(len(s))[None])[0].numpy() for s in seqs]  # (L+k, V) each

    sess = DecoderSession(make_session(folder / GRAPH_FILE), manifest)
    sess.allocate(len(seqs), max(lens) + steps)

    def inputs(s):
        if not sess.inputs_embeds:
            return s
        return model.embed(torch.as_tensor(s)).numpy().astype(sess.dtype)

    prefill = sess.prefill([inputs(s[:n]) for s, n in zip(seqs, lens)], all_logits=True).astype(np.float32)
    d_prefill = max(float(np.abs(prefill[b, :n] - r[:n]).max()) for b, (n, r) in enumerate(zip(lens, ref)))
    cont = np.stack([np.stack([inputs(s[n:]) for s, n in zip(seqs, lens)])])[0]  # (B, k) ids or (B, k, C)
    if sess.shared:
        got = np.stack([sess.extend(cont[:, j: j + 1])[:, 0] for j in range(steps)], axis=1)
    else:
        got = sess.extend(cont)
    got = got.astype(np.float32)
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
