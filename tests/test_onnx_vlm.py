"""ONNX export of vision-language checkpoints and the torch-free OrtVLM, against mmfuse.vlm on tiny
random-init odd-shaped checkpoints: llava (CLIP tower + Llama with the "default" select strategy;
CLIP tower with three feature layers, "full" strategy, pad-to-square images and a tied Llama),
llava_next (anyres tiling: CLIP + Llama; SigLIP with two feature layers + Qwen2, old weight layout)
and idefics3 / smolvlm (pixel shuffle 2 and 3, tiles plus a global image)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

sys.path.insert(0, str(Path(__file__).parent))
from vlm_models import build_vlm, random_image  # noqa: E402

from mmfuse.errors import ConfigError, ExportFolderError, ImageError, PromptError  # noqa: E402
from mmfuse.export import export_onnx  # noqa: E402
from mmfuse.ort.manifest import MANIFEST  # noqa: E402
from mmfuse.ort.vlm import OrtVLM  # noqa: E402
from mmfuse.vlm.engine import VisionLanguageModel  # noqa: E402

NAMES = ("clip_llama", "clip_list_pad", "next_clip_llama", "next_siglip_qwen2", "idefics3", "smolvlm")


def _ask(text, n_images=1):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (checkpoint folder, export folder)."""
    out = {}
    for name in NAMES:
        folder = tmp_path_factory.mktemp(name)
        build_vlm(name, folder)
        dest = tmp_path_factory.mktemp(f"{name}_onnx")
        export_onnx(folder, dest)
        out[name] = folder, dest
    return out


@pytest.fixture(scope="module")
def engines(exported):
    return {n: (VisionLanguageModel.from_pretrained(f), OrtVLM.from_pretrained(d)) for n, (f, d) in exported.items()}


@pytest.mark.parametrize("name", NAMES)
def test_image_features_match_mmfuse_vlm(engines, name):
    vlm, ort = engines[name]
    S = ort.manifest["image_size"]
    pixels = np.random.default_rng().standard_normal((3, 3, S, S)).astype(np.float32)  # another batch than the trace
    with torch.no_grad():
        ref = vlm.vlm.tile_features(torch.from_numpy(pixels)).numpy()
    got = ort.image_features(pixels)
    assert got.shape == ref.shape and got.shape[0] == 3
    assert np.abs(got - ref).max() <= 1e-4
    # the prompt's embeddings: each image's packed features at its image tokens, in order; token embeddings elsewhere
    images = [random_image(20, 31, 1), random_image(44, 12, 2), random_image(61, 58, 3)]
    req = ort.prepare(_ask("what is in the images", 3), images)
    emb = ort.prompt_embeddings([req])[0]  # (T, d)
    with torch.no_grad():
        feats = torch.cat(vlm.vlm.image_features(req.images))
        ref_emb = vlm.vlm.embed_prompt(torch.tensor(req), feats).numpy()
    assert emb.shape == ref_emb.shape and np.abs(emb - ref_emb).max() <= 1e-4
    assert sum(len(im.pixels) for im in req.images) > 3 or name.startswith("clip")  # tiled images


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_mmfuse_vlm(engines, name):
    vlm, ort = engines[name]
    image = random_image(33, 51, 3)
    msgs = _ask("describe a red photo")
    ref = vlm.generate(msgs, images=image, temperature=0.0, max_new_tokens=20, ignore_eos=True)[0]
    got = ort.generate(msgs, images=image, temperature=0.0, max_new_tokens=20, ignore_eos=True)[0]
    assert len(got.token_ids) == 20
    assert got.token_ids == ref.token_ids and got.text == ref.text
    streamed = [c.token_id for c in ort.stream(msgs, images=image, temperature=0.0, max_new_tokens=20, ignore_eos=True)]
    assert streamed == ref.token_ids


@pytest.mark.parametrize("name", ["clip_llama", "next_siglip_qwen2", "smolvlm"])
def test_batch_of_different_image_counts_equals_one_by_one(engines, name):
    vlm, ort = engines[name]
    a, b = random_image(30, 30, 4), random_image(17, 40, 5, "L")
    reqs = [_ask("what is in the image", 2), _ask("a cat", 0), _ask("photo")]
    imgs = [[a, b], None, [b]]
    opts = dict(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    batched = [c.token_ids for c in ort.generate(reqs, images=imgs, **opts)]
    alone = [ort.generate(r, images=i, **opts)[0].token_ids for r, i in zip(reqs, imgs)]
    ref = [c.token_ids for c in vlm.generate(reqs, images=imgs, **opts)]
    assert batched == alone == ref


def test_sampled_tokens_follow_the_seed(engines):
    _, ort = engines["clip_llama"]
    image = random_image(20, 20, 7)
    opts = dict(temperature=1.0, top_k=20, max_new_tokens=10, seed=3, ignore_eos=True)
    a = ort.generate(_ask("a cat"), images=image, **opts)[0].token_ids
    assert a == ort.generate(_ask("a cat"), images=image, **opts)[0].token_ids


def test_bad_requests_are_typed_errors(engines):
    _, ort = engines["clip_llama"]
    with pytest.raises(PromptError, match="1 image placeholder"):
        ort.generate(_ask("a cat"), max_new_tokens=2)  # the image is missing
    with pytest.raises(PromptError, match="0 image placeholder"):
        ort.generate("USER: a cat ASSISTANT:", images=random_image(9, 9, 1), max_new_tokens=2)
    S = ort.manifest["image_size"]
    with pytest.raises(ImageError, match=rf"\(1, 3, {S + 1}, {S}\)"):
        ort.image_features(np.zeros((1, 3, S + 1, S), np.float32))  # the wrong image size
    with pytest.raises(ImageError):
        ort.generate(_ask("a cat"), images=np.zeros((0, 5, 3), np.uint8), max_new_tokens=2)  # an empty image


def test_unsupported_vlm_types_and_options_are_refused_naming_them(exported, tmp_path):
    with pytest.raises(ConfigError, match="int4"):
        export_onnx(exported["clip_llama"][0], tmp_path / "q", quantize="int4")
    with pytest.raises(ConfigError, match="--dtype fp16"):
        export_onnx(exported["clip_llama"][0], tmp_path / "q", quantize="int8", dtype="fp16")
    with pytest.raises(ConfigError, match="bf16"):
        export_onnx(exported["clip_llama"][0], tmp_path / "q", dtype="bf16")
    with pytest.raises(ConfigError, match="inputs-embeds"):
        export_onnx(exported["clip_llama"][0], tmp_path / "e", inputs_embeds=True)
    for mt in ("llava_onevision", "qwen2_vl"):
        d = tmp_path / mt
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": mt}))
        with pytest.raises(ConfigError, match=mt):
            export_onnx(d, tmp_path / f"{mt}_out")


@pytest.mark.parametrize("name", ["next_siglip_qwen2", "smolvlm"])
@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_fp16_and_int8_exports_against_fp32(engines, exported, tmp_path, name, variant):
    """The smaller graphs, their checks recorded, and prompt embeddings (vision, packing, embedding
    graphs) near the fp32 export's; greedy generation runs on the converted decoder."""
    folder, fp32_dir = exported[name]
    kw = {"dtype": "fp16"} if variant == "fp16" else {"quantize": "int8"}
    m = export_onnx(folder, tmp_path / variant, **kw)
    assert (m["dtype"], m["quantize"]) == (("fp16", None) if variant == "fp16" else ("fp32", "int8"))
    fp32 = json.loads((fp32_dir / MANIFEST).read_text())
    for f in ("vision.onnx", "embedding.onnx.data", "decoder/model.onnx.data"):
        assert m["files"][f] < 0.7 * fp32["files"][f], f
    assert m["check"]["prompt"]["max_rel_diff"] <= m["check"]["prompt"]["tolerance"]
    _, ref = engines[name]
    ort = OrtVLM.from_pretrained(tmp_path / variant)
    req = ref.prepare(_ask("what is in the image", 2), [random_image(50, 23, 1), random_image(31, 66, 2)])
    a, b = ort.prompt_embeddings([req])[0], ref.prompt_embeddings([req])[0]
    assert np.abs(a - b).max() <= (2e-2 if variant == "fp16" else 0.25) * max(1.0, np.abs(b).max())
    assert np.abs(a - b).max() > 0  # really another graph
    out = ort.generate(req, temperature=0.0, max_new_tokens=8, ignore_eos=True)[0]
    assert len(out.token_ids) == 8


@pytest.mark.parametrize("name", ["clip_list_pad", "next_clip_llama", "smolvlm"])
def test_onnxruntime_genai_runs_the_export_with_our_tokens(engines, exported, name):
    """genai loads the folder's top-level genai_config.json (its gemma3 multimodal pipeline) and, fed
    mmfuse's prompt ids and pixels, gives mmfuse.vlm's greedy tokens; llava_next has no genai
    config (its anyres packing is no genai pipeline's)."""
    og = pytest.importorskip("onnxruntime_genai")
    folder = exported[name][1]
    if name.startswith("next"):
        assert not (folder / "genai_config.json").exists()
        return
    vlm, _ = engines[name]
    req = vlm.prepare(_ask("describe a red photo", 2), [random_image(43, 29, 4), random_image(25, 61, 5)])
    n_new = 20
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(req) + n_new, min_length=len(req) + n_new, do_sample=False)
    gen = og.Generator(model, params)
    inputs = og.NamedTensors()
    inputs["input_ids"] = np.asarray([list(req)], np.int32)
    pixels = np.concatenate([im.pixels for im in req.images])  # (tiles, 3, S, S)
    inputs["pixel_values"] = pixels
    # genai sizes the vision output (its leading pixel_values dimension, num_image_tokens, d): features per tile
    inputs["num_image_tokens"] = np.asarray([sum(im.tokens for im in req.images) // len(pixels)], np.int64)
    gen.set_inputs(inputs)
    theirs = []
    while not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == vlm.generate(req, temperature=0.0, max_new_tokens=n_new, ignore_eos=True)[0].token_ids


def test_damaged_folder_is_a_typed_error(exported, tmp_path):
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(exported["clip_llama"][1], dest)
    with open(dest / "vision.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportFolderError, match="vision.onnx"):
        OrtVLM.from_pretrained(dest)
    (dest / MANIFEST).unlink()
    with pytest.raises(ExportFolderError):
        OrtVLM.from_pretrained(dest)


def test_runtime_imports_no_torch(engines, exported, tmp_path):
    """OrtVLM in a subprocess where `import torch` fails; same tokens as mmfuse.vlm (llava, anyres
    llava_next, smolvlm: their preprocessing, tiling and packing run without torch)."""
    stub = tmp_path / "stub" / "torch"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    names = ["clip_list_pad", "next_siglip_qwen2", "smolvlm"]
    folders = [str(exported[n][1]) for n in names]
    image = tmp_path / "image.png"
    random_image(41, 67, 9).save(image)
    code = textwrap.dedent(f"""
        import json, sys
        from mmfuse.ort.vlm import OrtVLM
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "a dog"}}]}}]
        got = [OrtVLM.from_pretrained(f).generate(msgs, images={str(image)!r}, temperature=0.0, max_new_tokens=20,
                                                  ignore_eos=True)[0].token_ids for f in {folders!r}]
        assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules)
        print(json.dumps(got))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    ref = [engines[n][0].generate(_ask("a dog"), images=str(image), temperature=0.0, max_new_tokens=20,
                                  ignore_eos=True)[0].token_ids for n in names]
    assert got == ref and all(len(g) == 20 for g in got)
