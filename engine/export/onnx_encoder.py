"""ONNX export of the encoders: CLIP and SigLIP (two graphs) and BERT sentence encoders (one graph).

    export_encoder("clip-folder", "out")   # -> out/vision_model.onnx, out/text_model.onnx, out/mmfuse_export.json

Layouts (batch dynamic everywhere, sequence dynamic for text):
- CLIP / SigLIP: `vision_model.onnx` pixel_values (B, 3, S, S) float32 -> image_embeds (B, E), and
  `text_model.onnx` input_ids (B, T) int64 -> text_embeds (B, E): the projected features, not
  L2-normalised (as transformers' CLIPVisionModelWithProjection / CLIPTextModelWithProjection);
  the runtime normalises. No attention_mask: CLIP pools the end-of-text token through a causal
  mask, so right padding never reaches it, and SigLIP is trained on max-length padding without one.
- BERT (sentence-transformers folders): `model.onnx` input_ids, attention_mask, token_type_ids
  (B, T) int64 -> sentence_embedding (B, C), pooling (mean or [CLS]) and the Normalize module inside
  the graph. attention_mask must be right padding (ones then zeros), as tokenizers produce.

The graphs are traced from the engine's own modules (engine/encoders/) with the TorchScript
exporter, which gives clean dynamic graphs of standard operators here without extra dependencies
(the dynamo exporter needs onnxscript); under tracing the CPU fast paths (kernels/cpu_linear.py,
kernels/attention.py) record plain linear layers and one masked SDPA. The folder also holds the
tokenizer, config and preprocessor files and `mmfuse_export.json` (kind, embedding size, logit
scale/bias, normalisation, tokenizer settings, file sizes), written last, so a folder with a
manifest is a complete export.

Every graph is checked before the export is reported done: onnx.checker's full check, then
onnxruntime on fresh random inputs (other batch and sequence sizes than the trace) against the
PyTorch encoder; the largest difference is printed and anything above tolerance raises
ExportCheckError (the graph is not written).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..jsonfile import read_config
from ..encoders.api import load_encoder
from ..encoders.zeroshot import l2_normalize
from ..errors import ConfigError, ExportCheckError
from ..files import atomic_path, write_json
from ..ort.manifest import LEGACY, MANIFEST, write_manifest

KINDS = ("clip", "siglip", "bert")
DEFAULT_OPSET = 17            # LayerNormalization is one operator from 17 on
MIN_OPSET, MAX_OPSET = 14, 20  # SDPA needs 14; 20 is the newest the TorchScript exporter writes
FP32_TOLERANCE = 1e-4         # largest |onnxruntime - torch| on L2-normalised embeddings
# int8 graphs: smallest cosine(onnxruntime int8, torch fp32) accepted on the random check inputs.
# Measured: real all-MiniLM-L6-v2 weights 0.990 on real sentences and 0.985 on random ids; tiny random
# models >= 0.9996. It rejects the failures seen while choosing the method: full-range int8 weights
# on AVX2 (int16 saturation) 0.965, per-tensor weights 0.915 (MiniLM, random ids).
INT8_MIN_COSINE = 0.98
# Files copied from the checkpoint folder when present (the runtime reads the same ones).
ASSETS = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
          "vocab.json", "merges.txt", "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
          "config_sentence_transformers.json")


class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):  # (B, 3, S, S) -> (B, E)
        return self.model.image_features(pixel_values)


class TextGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):  # (B, T) -> (B, E)
        return self.model.text_features(input_ids)


class SentenceGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):  # (B, T) each -> (B, C)
        return self.model(input_ids, attention_mask.sum(dim=1), token_type_ids)


def check_request(model_dir, dtype: str, opset: Optional[int], quantize: Optional[str]) -> tuple[str, dict]:
    """Refuse an unsupported checkpoint or option before any work; -> (kind, config)."""
    cfg = read_config(model_dir)
    kind = cfg.get("model_type")
    if kind not in KINDS:
        raise ConfigError(f"{Path(model_dir) / 'config.json'}: model_type {kind!r} has no ONNX encoder export "
                          f"(supported: {', '.join(KINDS)})")
    if dtype != "fp32":
        raise ConfigError(f"--dtype {dtype}: encoder exports are fp32 (use --quantize int8 for smaller graphs)")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"--opset {opset}: encoder exports support opsets {MIN_OPSET}..{MAX_OPSET}")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize}: supported: int8")
    return kind, cfg


def export_encoder(model_dir, out_dir, dtype: str = "fp32", opset: Optional[int] = None,
                   quantize: Optional[str] = None) -> Path:
    """Export a CLIP, SigLIP or BERT sentence-encoder checkpoint folder to ONNX in `out_dir`; every
    graph is verified against the PyTorch encoder before the manifest is written. -> out_dir."""
    import onnx  # noqa: F401  (the `onnx` extra; fail before any work when it is missing)
    import onnxruntime  # noqa: F401

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    kind, cfg = check_request(model_dir, dtype, opset, quantize)
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError(f"{out_dir}: the export folder must differ from the checkpoint folder")
    opset = opset or DEFAULT_OPSET
    enc = load_encoder(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST, *LEGACY):  # a folder being rewritten is not a complete export
        (out_dir / name).unlink(missing_ok=True)
    written = []  # files of this export, relative to out_dir (the manifest lists them with their sizes)
    for name in ASSETS + ("1_Pooling/config.json",):  # (sentence-transformers' pooling settings)
        if (model_dir / name).is_file():
            (out_dir / name).parent.mkdir(exist_ok=True)
            with atomic_path(out_dir / name) as tmp:
                shutil.copyfile(model_dir / name, tmp)
            written.append(name)

    manifest = {"opset": opset, "dtype": dtype, "quantize": quantize}
    checks = {}
    g = torch.Generator().manual_seed(0)
    if kind in ("clip", "siglip"):
        model = enc.model
        vc, tc = model.vision_cfg, model.text_cfg
        if not (model_dir / "preprocessor_config.json").is_file():  # record the defaults load_encoder used
            write_json(out_dir / "preprocessor_config.json", enc.processor.to_config())
            written.append("preprocessor_config.json")
        S, C = vc.image_size, vc.num_channels
        checks["vision_model.onnx"] = export_graph(
            VisionGraph(model), out_dir / "vision_model.onnx", opset, quantize,
            trace=(torch.randn(2, C, S, S, generator=g),),
            fresh=(torch.randn(3, C, S, S, generator=g),),
            input_names=["pixel_values"], output_name="image_embeds", dynamic={"pixel_values": {0: "batch"}})
        pad_id = enc.tokenizer.pad_id if enc.tokenizer is not None else (tc.pad_token_id or 0)
        ctx = tc.max_positions
        trace_len, fresh_len = (ctx, ctx) if kind == "siglip" else (min(ctx, 5), min(ctx, 9))
        checks["text_model.onnx"] = export_graph(
            TextGraph(model), out_dir / "text_model.onnx", opset, quantize,
            trace=(text_ids(tc, 2, trace_len, pad_id, g),), fresh=(text_ids(tc, 3, fresh_len, pad_id, g),),
            input_names=["input_ids"], output_name="text_embeds",
            dynamic={"input_ids": {0: "batch", 1: "sequence"}})
        manifest.update(
            embed_dim=model.embed_dim, image_size=S, num_channels=C,
            logit_scale=model.logit_scale.detach().float().reshape(-1)[0].item(),
            logit_bias=None if model.logit_bias is None else model.logit_bias.detach().float().reshape(-1)[0].item(),
            scores="softmax" if kind == "clip" else "sigmoid", normalized_in_graph=False,
            context_length=ctx, pad_to_context=kind == "siglip", pad_id=pad_id,
            vision={"file": "vision_model.onnx", "inputs": ["pixel_values"], "output": "image_embeds"},
            text={"file": "text_model.onnx", "inputs": ["input_ids"], "output": "text_embeds"})
    else:
        model = enc.model
        bc = model.encoder.cfg
        tok = enc.tokenizer
        ctx = tok.context_length
        checks["model.onnx"] = export_graph(
            SentenceGraph(model), out_dir / "model.onnx", opset, quantize,
            trace=bert_inputs(bc, [min(ctx, 6), min(ctx, 6) - 2], g), fresh=bert_inputs(bc, [min(ctx, 11), 1, 4], g),
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_name="sentence_embedding",
            dynamic={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "token_type_ids")})
        manifest.update(
            embed_dim=bc.d_model, logit_scale=None, logit_bias=None, scores=None, pooling=model.pooling,
            normalized_in_graph=model.normalize, context_length=ctx, pad_to_context=False, pad_id=tok.pad_id,
            text={"file": "model.onnx", "inputs": ["input_ids", "attention_mask", "token_type_ids"],
                  "output": "sentence_embedding"})
    manifest["checks"] = checks
    write_manifest(out_dir, kind, sorted(written + list(checks)), **manifest)
    return out_dir


def text_ids(tc, B: int, T: int, pad_id: int, g: torch.Generator) -> torch.Tensor:
    """Random CLIP/SigLIP token ids (B, T): rows of different lengths ending in the end-of-text token
    the tower pools (CLIP: the configured eos id, or the largest id for legacy eos_token_id=2),
    right-padded; SigLIP rows fill the context."""
    V = tc.vocab_size
    eot = V - 1 if tc.eos_token_id in (None, 2) else tc.eos_token_id
    ids = torch.randint(0, V - 1, (B, T), generator=g)
    ids[ids >= eot] += 1  # never the end-of-text id inside the text
    ids[ids == V] = V - 2
    for b in range(B):
        n = max(1, T - 2 * b)
        ids[b, n - 1] = eot
        ids[b, n:] = pad_id
    return ids


def bert_inputs(cfg, lengths: list, g: torch.Generator) -> tuple:
    """Random BERT inputs: ids, right-padded mask of the given row lengths, token types."""
    B, T = len(lengths), max(lengths)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    types = torch.randint(0, max(cfg.type_vocab_size, 1), (B, T), generator=g) * mask
    return ids * mask, mask, types


def export_graph(module: nn.Module, path: Path, opset: int, quantize: Optional[str], trace: tuple, fresh: tuple,
                 input_names: list, output_name: str, dynamic: dict) -> dict:
    """Trace `module` to `path`, check it and compare onnxruntime with torch on `fresh` inputs; with
    quantize="int8" the graph written is the int8 one, checked by cosine. `path` appears only once
    every check has passed. -> the check's record for the manifest."""
    from .quantize import quantize_int8

    with torch.no_grad():
        ref = l2_normalize(module(*fresh).float().numpy())
    feeds = {n: t.numpy() for n, t in zip(input_names, fresh)}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export.") as work:
        graph = Path(work) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks, exporter notices
            torch.onnx.export(module.eval(), trace, str(graph), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=[output_name],
                              dynamic_axes={**dynamic, output_name: {0: "batch"}}, do_constant_folding=True)
        check_graph(graph, path.name)
        diff = float(np.abs(run_graph(graph, feeds) - ref).max())
        print(f"{path.name}: fp32 max |onnxruntime - torch| = {diff:.2e} on L2-normalised embeddings "
              f"(tolerance {FP32_TOLERANCE:.0e})")
        if not diff <= FP32_TOLERANCE:
            raise ExportCheckError(f"{path.name}: onnxruntime differs from the PyTorch encoder by {diff:.3g} "
                                   f"(tolerance {FP32_TOLERANCE}); the graph was not written")
        record = {"max_abs_diff_fp32": diff}
        if quantize == "int8":
            fp32_bytes = graph.stat().st_size
            q = Path(work) / f"{path.stem}.int8.onnx"
            quantize_int8(graph, q)
            check_graph(q, f"{path.name} (int8)")
            cos = float((run_graph(q, feeds) * ref).sum(-1).min())
            size = q.stat().st_size
            print(f"{path.name}: int8 {size / 1e6:.2f} MB ({size / fp32_bytes:.2f}x fp32), smallest cosine to "
                  f"torch fp32 {cos:.5f} (threshold {INT8_MIN_COSINE})")
            if not cos >= INT8_MIN_COSINE:
                raise ExportCheckError(f"{path.name}: int8 embeddings have cosine {cos:.4f} to the fp32 encoder "
                                       f"(threshold {INT8_MIN_COSINE}); the graph was not written")
            record.update(min_cosine_int8=cos, fp32_bytes=fp32_bytes)
            graph = q
        with atomic_path(path) as tmp:
            os.replace(graph, tmp)
    return record


def check_graph(path: Path, name: str) -> None:
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportCheckError(f"{name}: onnx.checker rejects the exported graph ({e})") from None


def run_graph(path: Path, feeds: dict) -> np.ndarray:
    """L2-normalised output of the graph at `path` in onnxruntime (CPU)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return l2_normalize(sess.run(None, feeds)[0].astype(np.float32))
