"""ONNX export of a vision-language checkpoint folder (`model_type` llava, llava_next, idefics3,
smolvlm), in the three-graph layout of onnxruntime-genai's vision-language models, and its check
against `mmfuse.vlm`.

    out/vision.onnx       pixel_values (N, 3, S, S) float32 -> image_features (N, T, d_text): each
                          tile's projected features, traced from mmfuse.vlm's `tile_features` (llava:
                          tower at the feature layers + MLP projector; idefics3: tower + pixel
                          shuffle + projection); llava_next adds the output image_newline (d_text,)
    out/embedding.onnx    input_ids (B, T) int64 -> inputs_embeds (B, T, d_text): one Gather (+ .data)
    out/decoder/          the text model, `onnx_decoder`'s inputs_embeds export (its own manifest)
    out/...               config, tokenizer, chat template, processor and generation files: the
                          runtime prepares prompts and images with mmfuse.vlm's torch-free processor
    out/mmfuse_export.json  kind "vlm": model type, image token id, tile size, the checks'
                          differences, every file's size (written last)

An image's tiles' features fill its placeholder tokens in order (llava_next: the base tile, then
the unpadded tile grid with image_newline after each row, `anyres.pack_order`); a prompt's
embeddings are embedding.onnx's rows with the image tokens' replaced by them.
`mmfuse.ort.vlm.OrtVLM` runs the folder without torch.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..jsonfile import read_config
from ..errors import ConfigError, ExportCheckError
from ..ort.manifest import MANIFEST, publish, write_manifest
from .decoder_graph import MIN_OPSET, check_opset
from .graph import GraphBuilder, save_with_external_data
from .onnx_decoder import check_graph, export_decoder

VISION_FILE, EMBEDDING_FILE, DECODER_DIR = "vision.onnx", "embedding.onnx", "decoder"
# Checkpoint files copied into the export (tokenizer, chat template, image preprocessing, defaults).
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                "preprocessor_config.json", "processor_config.json")
# Largest |difference| of the image features to mmfuse.vlm, relative to max(1, largest |feature|).
TOLERANCE = 1e-4


def export_vlm(model_dir, out_dir, dtype: str = "fp32", opset: Optional[int] = None, optimize: bool = False,
               quantize: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Export, check and write the folder; returns its manifest."""
    from ..vlm.config import vlm_config
    from ..vlm.loader import load_vlm
    from ..vlm.processor import VlmProcessor

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    hf = read_config(model_dir)
    mt = hf.get("model_type")
    cfg = vlm_config(hf, source=str(model_dir / "config.json"))  # refuses unsupported types and fields
    if dtype != "fp32" or quantize:
        raise ConfigError(f"--dtype {dtype} / --quantize {quantize}: a {mt} export is fp32 only")
    opset = int(opset or MIN_OPSET)
    check_opset(opset)
    if out_dir.resolve() == model_dir.resolve():
        raise ConfigError(f"{out_dir}: the export folder must differ from the checkpoint folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
    VlmProcessor.from_pretrained(model_dir, cfg)  # refuses unsupported preprocessing before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # a folder being rewritten is not a complete export

    model = load_vlm(model_dir, dtype="fp32")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with torch.no_grad():
            vision = export_vision(model, tmp / VISION_FILE, opset, log)
            embedding = export_embedding(model.decoder, tmp / EMBEDDING_FILE, opset, log)
        decoder = export_decoder(model_dir, tmp / DECODER_DIR, opset=max(opset, MIN_OPSET), optimize=optimize,
                                 inputs_embeds=True, log=log, model=model.decoder, hf=cfg.text.to_hf())
        copied = [f for f in COPIED_FILES if (model_dir / f).is_file()]
        for f in copied:
            shutil.copyfile(model_dir / f, tmp / f)
        files = [VISION_FILE, EMBEDDING_FILE, EMBEDDING_FILE + ".data", *copied,
                 *(f"{DECODER_DIR}/{f}" for f in (*decoder["files"], MANIFEST))]
        manifest = write_manifest(
            tmp, "vlm", files, dtype=dtype, opset=opset, model_type=mt, variant=decoder["variant"],
            image_token_id=cfg.image_token_id, image_size=cfg.vision.image_size, d_model=cfg.text.d_model,
            vocab_size=cfg.text.vocab_size, decoder=DECODER_DIR,
            vision={"file": VISION_FILE, "inputs": ["pixel_values"], "outputs": vision.pop("outputs")},
            embedding={"file": EMBEDDING_FILE, "inputs": ["input_ids"], "output": "inputs_embeds"},
            check={"vision": vision, "embedding": embedding, "decoder": decoder["check"]})
        publish(tmp, out_dir, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


class VisionGraph(nn.Module):
    """The traced module: a model's `tile_features` (and llava_next's image_newline)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.newline = getattr(model, "image_newline", None)

    def forward(self, pixel_values):  # (N, 3, S, S) -> (N, T, d_text)[, (d_text,)]
        feats = self.model.tile_features(pixel_values)
        return feats if self.newline is None else (feats, self.newline + 0)  # + 0: a node's output, not an initializer


def export_vision(model, path: Path, opset: int, log: Callable[[str], None] = print) -> dict:
    """Trace the vision graph to `path`, onnx.checker (full), then onnxruntime against
    `model.tile_features` on fresh random pixels (another batch size than the trace)."""
    from ..ort.session import make_session

    S = model.cfg.vision.image_size
    graph = VisionGraph(model).eval()
    outputs = ["image_features"] + (["image_newline"] if graph.newline is not None else [])
    trace = torch.randn(2, 3, S, S)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks, exporter notices
        torch.onnx.export(graph, (trace,), str(path), dynamo=False, opset_version=max(opset, 14),
                          input_names=["pixel_values"], output_names=outputs,
                          dynamic_axes={"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
                          do_constant_folding=True)
    check_graph(path)
    fresh = torch.randn(3, 3, S, S)
    ref = [t.float().numpy() for t in ((model.tile_features(fresh),) + ((graph.newline,) if len(outputs) > 1 else ()))]
    got = make_session(path).run(None, {"pixel_values": fresh.numpy()})
    for name, g, r in zip(outputs, got, ref):
        if g.shape != r.shape:
            raise ExportCheckError(f"{path}: {name} of shape {g.shape}, mmfuse.vlm gives {r.shape}")
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    tol = TOLERANCE * max(1.0, float(np.abs(ref[0]).max()))
    log(f"check: {path.name}: onnx.checker full check passed; largest |image feature difference| vs mmfuse.vlm "
        f"{diff:.3g} (tolerance {tol:.3g})")
    if not diff <= tol:
        raise ExportCheckError(f"{path}: image features differ from mmfuse.vlm by {diff:.3g} > tolerance {tol:.3g}")
    return {"max_abs_diff": diff, "tolerance": tol, "outputs": outputs}


def export_embedding(decoder, path: Path, opset: int, log: Callable[[str], None] = print) -> dict:
    """input_ids (B, T) -> inputs_embeds (B, T, d): a Gather of the decoder's token embeddings,
    checked against `decoder.embed` on random ids."""
    from onnx import TensorProto

    from ..ort.session import make_session

    table = decoder.embed.weight.detach().float().numpy()  # (V, d)
    g = GraphBuilder("embedding", opset)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    g.output("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", table.shape[1]])
    g.op_to("Gather", [g.weight("embed_tokens.weight", table), ids], ["inputs_embeds"], axis=0)
    save_with_external_data(g.model(), path)
    check_graph(path)
    x = np.random.default_rng().integers(0, table.shape[0], (2, 7))
    got = make_session(path).run(None, {"input_ids": x})[0]
    diff = float(np.abs(got - decoder.embed(torch.as_tensor(x)).float().numpy()).max())
    log(f"check: {path.name}: largest |embedding difference| vs the decoder {diff:.3g}")
    if diff != 0.0:
        raise ExportCheckError(f"{path}: embeddings differ from the decoder's by {diff:.3g}")
    return {"max_abs_diff": diff}
