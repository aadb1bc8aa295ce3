"""ONNX export of a vision-language checkpoint folder (`model_type` llava, llava_next, idefics3,
smolvlm), in the three-graph layout of onnxruntime-genai's vision-language models, and its check
against `mmfuse.vlm`.

    out/vision.onnx       pixel_values (N, 3, S, S) float32 -> image_features (N, T, d_text): each
                          tile's projected features, traced from mmfuse.vlm's `tile_features` (llava:
                          tower at the feature layers + MLP projector; idefics3: tower + pixel
                          shuffle + projection); llava_next adds the output image_newline (d_text,)
    out/embedding.onnx    input_ids (B, T) int64, image_features (N, K, d_text) float32 -> inputs_embeds
                          (B, T, d_text): token embeddings with the image tokens' rows replaced in
                          order by the N * K feature rows ((0, 0, d_text) for text) (+ .data)
    out/decoder/          the text model, `onnx_decoder`'s inputs_embeds export (its own manifest)
    out/genai_config.json onnxruntime-genai's multimodal layout (vision, embedding, decoder sections;
                          model type gemma3, whose pipeline these graphs fit); not for llava_next,
                          whose tile packing no genai pipeline does
    out/...               config, tokenizer, chat template, processor and generation files: the
                          runtime prepares prompts and images with mmfuse.vlm's torch-free processor
    out/mmfuse_export.json  kind "vlm": model type, image token id, tile size, the checks'
                          differences, every file's size (written last)

An image's tiles' features fill its placeholder tokens in order (llava_next: the base tile, then
the unpadded tile grid with image_newline after each row, `anyres.pack_order`), and embedding.onnx
splices them into the prompt's token embeddings.
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

from ..errors import ConfigError, ExportCheckError
from ..files import write_json
from ..jsonfile import read_config, read_json
from ..ort.manifest import MANIFEST, publish, write_manifest
from .decoder_graph import MIN_OPSET, check_opset
from .genai_config import GENAI_VLM_TYPE, vlm_genai_config
from .graph import GraphBuilder, save_with_external_data, topological_sort
from .onnx_decoder import check_graph, export_decoder

VISION_FILE, EMBEDDING_FILE, DECODER_DIR = "vision.onnx", "embedding.onnx", "decoder"
# Checkpoint files copied into the export (tokenizer, chat template, image preprocessing, defaults).
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
                "preprocessor_config.json", "processor_config.json")
# Largest |difference| of the image features to mmfuse.vlm, relative to max(1, largest |feature|).
TOLERANCE = 1e-4
# fp16 / int8 vision and embedding graphs against the fp32 ones on the check inputs: the largest
# |difference| relative to max(1, largest |fp32 value|). The whole prompt's logits (image features
# into the decoder) against mmfuse.vlm in fp32: the same measure, bounded per variant; the share of
# positions whose top token is unchanged is reported, not bounded (random-init models are full of
# near ties).
CONVERTED_TOLERANCE = {"fp16": 2e-2, "int8": 0.25}
PROMPT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.5}


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
    if dtype not in PROMPT_TOLERANCE or dtype == "int8":
        raise ConfigError(f"--dtype {dtype!r}: expected fp32 or fp16")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize!r}: expected int8")
    if quantize and dtype != "fp32":
        raise ConfigError(f"--quantize {quantize} with --dtype {dtype}: int8 quantizes an fp32 export (drop --dtype)")
    variant = quantize or dtype
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
            embedding = export_embedding(model.decoder, cfg.image_token_id, tmp / EMBEDDING_FILE, opset, log)
        if variant != "fp32":
            S = cfg.vision.image_size
            vision[variant] = convert_graph(tmp / VISION_FILE, {"pixel_values": np.random.default_rng().standard_normal(
                (2, 3, S, S)).astype(np.float32)}, variant, log)
            ids = np.random.default_rng().integers(0, cfg.text.vocab_size, (2, 9))
            ids[ids == cfg.image_token_id] = (cfg.image_token_id + 1) % cfg.text.vocab_size
            ids[0, 3:6] = cfg.image_token_id
            embedding[variant] = convert_graph(tmp / EMBEDDING_FILE, {"input_ids": ids, "image_features": np.random.default_rng(
                ).standard_normal((1, 3, cfg.text.d_model)).astype(np.float32)}, variant, log)
        decoder = export_decoder(model_dir, tmp / DECODER_DIR, dtype=dtype, opset=max(opset, MIN_OPSET),
                                 optimize=optimize, inputs_embeds=True, quantize=quantize, log=log, model=model.decoder,
                                 hf=cfg.text.to_hf())
        with torch.no_grad():
            prompt = check_prompt_logits(model, tmp, variant, log)
        copied = [f for f in COPIED_FILES if (model_dir / f).is_file()]
        for f in copied:
            shutil.copyfile(model_dir / f, tmp / f)
        files = [VISION_FILE, EMBEDDING_FILE, EMBEDDING_FILE + ".data", *copied,
                 *(f"{DECODER_DIR}/{f}" for f in (*decoder["files"], MANIFEST))]
        genai = getattr(cfg, "grid_pinpoints", None) is None  # llava_next's tile packing is no genai pipeline's
        if genai:
            write_json(tmp / "genai_config.json", vlm_genai_config(
                read_json(tmp / DECODER_DIR / "genai_config.json"), DECODER_DIR, VISION_FILE, EMBEDDING_FILE), indent=4)
            files.append("genai_config.json")
        manifest = write_manifest(
            tmp, "vlm", files, dtype=dtype, quantize=quantize, opset=opset, model_type=mt, variant=decoder["variant"],
            image_token_id=cfg.image_token_id, image_size=cfg.vision.image_size, d_model=cfg.text.d_model,
            vocab_size=cfg.text.vocab_size, decoder=DECODER_DIR, genai_type=GENAI_VLM_TYPE if genai else None,
            vision={"file": VISION_FILE, "inputs": ["pixel_values"], "outputs": vision.pop("outputs")},
            embedding={"file": EMBEDDING_FILE, "inputs": ["input_ids", "image_features"], "output": "inputs_embeds"},
            check={"vision": vision, "embedding": embedding, "decoder": decoder["check"], "prompt": prompt})
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
        return feats if self.newline is None else (feats, self.newline)


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
    outputs_from_nodes(path)
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


def outputs_from_nodes(path: Path) -> None:
    """Give each graph output that the exporter wired straight to an initializer (image_newline) an
    Identity node, as converters (fp16) expect every output to come from a node."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for out in model.graph.output:
        if out.name in inits:
            inits[out.name].name = f"{out.name}.value"
            model.graph.node.append(helper.make_node("Identity", [f"{out.name}.value"], [out.name]))
    onnx.save_model(model, str(path))


def export_embedding(decoder, image_token_id: int, path: Path, opset: int, log: Callable[[str], None] = print) -> dict:
    """input_ids (B, T) and image_features (N, K, d) -> inputs_embeds (B, T, d): the decoder's token
    embeddings with the image-token rows replaced, in order, by the N * K feature rows (as
    onnxruntime-genai's embedding models do; text and decode steps pass no features: (0, 0, d)). Checked against `decoder.embed` and the splice on random ids and features."""
    from onnx import TensorProto

    from ..ort.session import make_session

    table = decoder.embed.weight.detach().float().numpy()  # (V, d)
    d = table.shape[1]
    g = GraphBuilder("embedding", opset)
    ids = g.input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    feats = g.input("image_features", TensorProto.FLOAT, ["images", "image_tokens", d])  # (0, 0, d) for text
    g.output("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", d])
    mask = g.op("Equal", [ids, g.const(image_token_id)])  # (B, T); the id may lie outside the vocabulary
    rows = g.op("Gather", [g.weight("embed_tokens.weight", table), g.op("Where", [mask, g.const(0), ids])], axis=0)
    where = g.op("Transpose", [g.op("NonZero", [mask])], perm=[1, 0])  # (n, 2): (row, position) of each image token
    g.op_to("ScatterND", [rows, where, g.op("Reshape", [feats, g.const([-1, d])])], ["inputs_embeds"])
    save_with_external_data(g.model(), path)
    check_graph(path)
    rng = np.random.default_rng()
    x = rng.integers(0, table.shape[0], (2, 9))
    x[x == image_token_id] = (image_token_id + 1) % table.shape[0]
    x[0, 2:5] = x[1, 7] = image_token_id
    f = rng.standard_normal((2, 2, d)).astype(np.float32)
    sess = make_session(path)
    got = sess.run(None, {"input_ids": x, "image_features": f})[0]
    ref = decoder.embed(torch.as_tensor(np.where(x == image_token_id, 0, x))).float().numpy()
    ref[x == image_token_id] = f.reshape(-1, d)
    text = x[:, :2]
    diff = max(float(np.abs(got - ref).max()),
               float(np.abs(sess.run(None, {"input_ids": text, "image_features": f[:0, :0]})[0] - ref[:, :2]).max()))
    log(f"check: {path.name}: largest |embedding difference| vs the decoder's with the features spliced in {diff:.3g}")
    if diff != 0.0:
        raise ExportCheckError(f"{path}: embeddings differ from the decoder's by {diff:.3g}")
    return {"max_abs_diff": diff}


def graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def convert_graph(path: Path, feed: dict, variant: str, log: Callable[[str], None] = print) -> dict:
    """Replace the checked fp32 graph at `path` (and its .data file, if any) by its fp16 version
    (weights and arithmetic in fp16, float32 inputs and outputs: onnxruntime.transformers' converter)
    or its dynamic-int8 one (`quantize.quantize_int8`), after checking it against the fp32 graph on
    `feed`. -> sizes and the largest relative difference."""
    import os

    import onnx

    from ..ort.session import make_session
    from .quantize import quantize_int8

    external = path.with_name(path.name + ".data").is_file()
    work = path.parent / f".{variant}"  # the same file name there: the graph records its data file's name
    out = work / path.name
    if variant == "int8":
        quantize_int8(path, out, external_data=external)
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        work.mkdir(exist_ok=True)
        half = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=True)
        topological_sort(half.graph)
        save_with_external_data(half, out) if external else onnx.save_model(half, str(out))
    check_graph(out)
    ref = make_session(path).run(None, feed)
    got = make_session(out).run(None, feed)
    diff = max(float(np.abs(g.astype(np.float32) - r).max()) / max(1.0, float(np.abs(r).max())) for g, r in zip(got, ref))
    size32, size = graph_bytes(path), graph_bytes(out)
    log(f"{variant}: {path.name} {size / 1e6:.2f} MB ({size / size32:.2f}x fp32's {size32 / 1e6:.2f} MB); largest "
        f"|difference| to the fp32 graph {diff:.3g} of max(1, |value|) (tolerance {CONVERTED_TOLERANCE[variant]})")
    if not diff <= CONVERTED_TOLERANCE[variant]:
        raise ExportCheckError(f"{out}: {variant} outputs differ from the fp32 graph's by {diff:.3g} of max(1, |value|) "
                               f"(tolerance {CONVERTED_TOLERANCE[variant]})")
    for f in (path.name, path.name + ".data") if external else (path.name,):
        os.replace(work / f, path.parent / f)
    shutil.rmtree(work, ignore_errors=True)
    return {"bytes": size, "fp32_bytes": size32, "max_rel_diff": diff}


def check_prompt_logits(model, folder: Path, variant: str, log: Callable[[str], None] = print) -> dict:
    """The exported graphs end to end on a fresh random multimodal prompt (random tiles' features
    at image tokens between random text tokens): vision.onnx -> embedding.onnx -> decoder (every
    position's logits), against mmfuse.vlm in fp32. -> the largest difference relative to
    max(1, |logit|) and the share of positions with the same top token."""
    from ..ort.decoder_session import GRAPH_FILE, DecoderSession
    from ..ort.manifest import read_manifest
    from ..ort.session import make_session

    rng = np.random.default_rng()
    cfg = model.cfg
    S, V = cfg.vision.image_size, cfg.text.vocab_size
    pixels = rng.standard_normal((2, 3, S, S)).astype(np.float32)
    ref_feats = model.tile_features(torch.from_numpy(pixels)).flatten(0, 1)  # (k, d)
    k = len(ref_feats)
    text = rng.integers(0, V, int(rng.integers(2, 11)))
    text[text == cfg.image_token_id] = (cfg.image_token_id + 1) % V  # the image tokens are only the features'
    cut = int(rng.integers(1, len(text)))
    ids = np.concatenate([text[:cut], np.full(k, cfg.image_token_id), text[cut:]])
    embeds = model.embed_prompt(torch.from_numpy(ids), ref_feats)
    ref = model.decoder(None, torch.arange(len(ids))[None], embeds=embeds[None])[0].float().numpy()  # (T, V)

    feats = make_session(folder / VISION_FILE).run(None, {"pixel_values": pixels})[0]  # (2, K, d)
    x = make_session(folder / EMBEDDING_FILE).run(None, {"input_ids": ids[None], "image_features": feats})[0][0]
    sess = DecoderSession(make_session(folder / DECODER_DIR / GRAPH_FILE), read_manifest(folder / DECODER_DIR, "decoder"))
    sess.allocate(1, len(ids))
    got = sess.prefill([x.astype(sess.dtype)], all_logits=True)[0].astype(np.float32)  # (T, V)
    diff = float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    tol = PROMPT_TOLERANCE[variant]
    log(f"check: the whole prompt ({len(ids)} tokens, {k} image tokens) through vision, embedding and decoder graphs "
        f"({variant}) vs mmfuse.vlm fp32: largest |logit difference| {diff:.3g} of max(1, |logit|) (tolerance {tol}), "
        f"top token unchanged at {top1:.1%} of positions")
    if not diff <= tol:
        raise ExportCheckError(f"{folder}: the prompt's logits differ from mmfuse.vlm's by {diff:.3g} of "
                               f"max(1, |logit|) > tolerance {tol}")
    return {"max_rel_diff": diff, "top1_agreement": top1, "tolerance": tol}
