"""CLIP and SigLIP encoders against transformers (random-init checkpoints saved with
save_pretrained), preprocessing against transformers' image processors, zero-shot
classification, chunked search, the `mmfuse embed` command and bad-input errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmfuse.encoders import (ClipModel, ImageProcessor, SiglipModel, build_zero_shot_classifier,
                             load_encoder, search, search_reference)
from mmfuse.encoders.synthetic import COLOURS, SHAPES, shapes_dataset, write_word_tokenizer
from mmfuse.errors import CheckpointError, ConfigError, ImageError

transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "the", "small", "large", "drawing", *COLOURS, *SHAPES]
TEXTS = ["a red circle", "a photo of the large blue square", "green", "a drawing of a small yellow triangle " * 3,
         "a circle"]
IMG = 40  # image side; patch 8 -> 25 patches
TOWER = dict(hidden_size=32, intermediate_size=50, num_hidden_layers=2, num_attention_heads=4)


def _images(n, seed=0):
    """PIL images of various sizes and modes, so resizing and cropping do real work."""
    rng = np.random.default_rng(seed)
    sizes = [(53, 71), (64, 40), (40, 40), (97, 45), (33, 50)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    out[1 % n] = out[1 % n].convert("L")
    return out


def _hf_clip(folder, eos_legacy=False, act="quick_gelu"):
    V = write_word_tokenizer(folder, WORDS, 12)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=V, max_position_embeddings=12, hidden_act=act, eos_token_id=2 if eos_legacy else V - 1,
                         bos_token_id=V - 2, pad_token_id=0, **TOWER),
        vision_config=dict(image_size=IMG, patch_size=8, hidden_act=act, **TOWER), projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a mixed-up key shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG}).save_pretrained(folder)
    return model


def _hf_siglip(folder):
    V = write_word_tokenizer(folder, WORDS, 12)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=V, max_position_embeddings=12, eos_token_id=V - 1, bos_token_id=V - 2, pad_token_id=0,
                         **TOWER),
        vision_config=dict(image_size=IMG, patch_size=8, **TOWER))
    torch.manual_seed(1)
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "logit" in n:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    with open(folder / "preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": IMG, "width": IMG},
                   "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f)
    return model


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, _hf_clip(folder)


@pytest.fixture(scope="module")
def siglip_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    return folder, _hf_siglip(folder)


def _hf_ids(folder, texts, pad_to=None):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_truncation(12)  # keeps the end-of-text token, as CLIPTokenizer(truncation=True) does
    enc = [e.ids for e in tok.encode_batch(texts)]
    assert all(e[-1] == tok.get_vocab_size() - 1 for e in enc)
    T = pad_to or max(len(e) for e in enc)
    return torch.tensor([e + [0] * (T - len(e)) for e in enc])


def _pooled(out):
    return getattr(out, "pooler_output", out)


# ----------------------------------------------------------------------------- models vs transformers


@pytest.mark.parametrize("variant", ["eos_id", "eos_legacy_argmax", "gelu"])
def test_clip_matches_transformers(tmp_path, variant):
    hf = _hf_clip(tmp_path, eos_legacy=variant == "eos_legacy_argmax", act="gelu" if variant == "gelu" else "quick_gelu")
    enc = load_encoder(tmp_path)
    images = _images(5)
    proc = transformers.CLIPImageProcessor.from_pretrained(tmp_path)
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    ids = _hf_ids(tmp_path, TEXTS)
    with torch.no_grad():
        out = hf(pixel_values=px, input_ids=ids)
        ref_img = F.normalize(_pooled(hf.get_image_features(pixel_values=px)), dim=-1)
        ref_txt = F.normalize(_pooled(hf.get_text_features(input_ids=ids)), dim=-1)
    img, txt = enc.encode_image(images), enc.encode_text(TEXTS)
    torch.testing.assert_close(img, ref_img, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-4, rtol=0)
    torch.testing.assert_close(enc.logits(img, txt), out.logits_per_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(img, out.image_embeds, atol=1e-4, rtol=0)


def test_siglip_matches_transformers(siglip_ckpt):
    folder, hf = siglip_ckpt
    enc = load_encoder(folder)
    images = _images(4, seed=3)
    proc = transformers.SiglipImageProcessor.from_pretrained(folder) if hasattr(transformers, "SiglipImageProcessor") \
        else transformers.AutoImageProcessor.from_pretrained(folder)
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    ids = _hf_ids(folder, TEXTS, pad_to=12)  # SigLIP: max-length padding, no mask, last-token pooling
    with torch.no_grad():
        out = hf(pixel_values=px, input_ids=ids)
    img, txt = enc.encode_image(images), enc.encode_text(TEXTS)
    torch.testing.assert_close(img, out.image_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(txt, out.text_embeds, atol=1e-4, rtol=0)
    torch.testing.assert_close(enc.logits(img, txt), out.logits_per_image, atol=1e-4, rtol=1e-4)
    probs = enc.classify(img, txt.T)
    torch.testing.assert_close(probs, out.logits_per_image.sigmoid(), atol=1e-5, rtol=1e-4)


def test_batching_and_order_do_not_change_embeddings(clip_ckpt):
    enc = load_encoder(clip_ckpt[0])
    full = enc.encode_text(TEXTS)
    one_by_one = torch.cat([enc.encode_text([t]) for t in TEXTS])
    torch.testing.assert_close(enc.encode_text(TEXTS, batch_size=2), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, full, atol=1e-5, rtol=0)
    images = _images(5, seed=7)
    torch.testing.assert_close(enc.encode_image(images, batch_size=2), enc.encode_image(images), atol=1e-5, rtol=0)


def test_bf16_weights_close_to_fp32(clip_ckpt):
    enc32, enc16 = load_encoder(clip_ckpt[0]), load_encoder(clip_ckpt[0], dtype="bf16")
    images = _images(3)
    cos = (enc32.encode_image(images) * enc16.encode_image(images)).sum(-1)
    assert cos.min() > 0.98
    assert enc16.encode_text(TEXTS).dtype == torch.float32


# ----------------------------------------------------------------------------- preprocessing


def _inputs(tmp_path):
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, (37, 61, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (50, 45, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (29, 31), dtype=np.uint8)  # smaller than the crop: zero-padded
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 256, (80, 44, 3), dtype=np.uint8)).save(path)
    return [arr, Image.fromarray(rgba, "RGBA"), Image.fromarray(gray, "L"), Image.open(path)], [arr, rgba, gray, str(path)]


@pytest.mark.parametrize("config", [
    dict(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}),
    dict(size={"shortest_edge": 47}, crop_size={"height": 33, "width": 41}),
    dict(size={"height": 36, "width": 52}, do_center_crop=False, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3),
])
def test_preprocessing_matches_transformers(tmp_path, config):
    hf_proc = transformers.CLIPImageProcessor(**config)
    hf_proc.save_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path, image_size=40)
    pil_inputs, our_inputs = _inputs(tmp_path)
    ref = hf_proc(images=pil_inputs, return_tensors="pt")["pixel_values"]
    got = ours(our_inputs)
    assert got.shape == ref.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # one image, and a 4-D uint8 batch, are accepted too
    torch.testing.assert_close(ours(our_inputs[0]), ref[:1], atol=1e-5, rtol=0)
    batch = np.stack([our_inputs[0]] * 2)
    torch.testing.assert_close(ours(batch), ref[:1].expand(2, -1, -1, -1), atol=1e-5, rtol=0)


def test_image_errors(tmp_path):
    proc = ImageProcessor.from_config({"size": {"shortest_edge": 8}, "do_center_crop": True, "crop_size": 8})
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageError, match="corrupt.jpg"):
        proc([str(bad)])
    with pytest.raises(ImageError, match="not found"):
        proc(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match=r"image 1.*\(10, 10, 2\)"):
        proc([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10, 2), np.uint8)])
    with pytest.raises(ImageError, match="float32"):
        proc(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ImageError, match="empty"):
        proc([])
    with pytest.raises(ImageError, match="unsupported image type"):
        proc([3])


# ----------------------------------------------------------------------------- API: zero-shot, search


def test_zero_shot_classifier_like_openclip(clip_ckpt):
    enc = load_encoder(clip_ckpt[0])
    names = ["red circle", "blue square", "green triangle"]
    templates = ["a photo of a {}.", "a drawing of the {}.", lambda c: f"the small {c}"]
    clf = enc.zero_shot_classifier(names, templates)
    assert clf.shape == (24, 3)
    for j, name in enumerate(names):  # OpenCLIP: mean of normalised prompt embeddings, renormalised
        e = enc.encode_text([t(name) if callable(t) else t.format(name) for t in templates]).mean(0)
        torch.testing.assert_close(clf[:, j], e / e.norm(), atol=1e-6, rtol=0)
    images = _images(4)
    probs = enc.classify(images, clf)
    img = enc.encode_image(images)
    ref = (enc.model.logit_scale.detach().exp() * img @ clf).softmax(-1)
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="class names"):
        build_zero_shot_classifier(enc.encode_text, [], templates)


@pytest.mark.parametrize("N,E,Q,k,chunk", [(1, 5, 1, 1, 7), (300, 17, 3, 10, 64), (1000, 33, 5, 7, 1000), (257, 8, 2, 257, 13)])
def test_search_matches_full_scoring(N, E, Q, k, chunk):
    g = torch.Generator().manual_seed(N)
    index, q = torch.randn(N, E, generator=g), torch.randn(Q, E, generator=g)
    s, i = search(q, index, k, chunk_size=chunk)
    rs, ri = search_reference(q, index, k)
    torch.testing.assert_close(s, rs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(index[i].mul(q[:, None]).sum(-1), s, atol=1e-5, rtol=1e-5)  # scores belong to the ids
    assert (ri == i).float().mean() > 0.99  # exact ties aside, the same rows


def test_search_over_memmap(tmp_path):
    rng = np.random.default_rng(0)
    index = rng.standard_normal((5000, 16)).astype(np.float32)
    path = tmp_path / "index.f32"
    index.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(5000, 16))
    q = torch.from_numpy(index[[4321, 17]])
    s, i = search(q, mm, 3, chunk_size=999)
    assert i[:, 0].tolist() == [4321, 17] or s[:, 0].ge(s[:, 1]).all()
    torch.testing.assert_close(s, search_reference(q, index, 3).values, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dimension"):
        search(torch.randn(1, 15), mm, 3)
    with pytest.raises(ValueError, match="k=6000"):
        search(q, mm, 6000)


# ----------------------------------------------------------------------------- errors, CLI


def test_bad_inputs(clip_ckpt, tmp_path):
    enc = load_encoder(clip_ckpt[0])
    with pytest.raises(ValueError, match="empty text list"):
        enc.encode_text([])
    with pytest.raises(ValueError, match="text 1 is a int"):
        enc.encode_text(["ok", 3])
    with pytest.raises(ValueError, match="empty image batch"):
        enc.encode_image([])
    with pytest.raises(ValueError, match=r"pixel batch has shape \(1, 3, 20, 20\)"):
        enc.encode_pixels(torch.zeros(1, 3, 20, 20))
    # a checkpoint whose tensors do not match its config
    import shutil
    bad = tmp_path / "mismatch"
    shutil.copytree(clip_ckpt[0], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vision_config"]["hidden_size"] = 48
    cfg["vision_config"]["num_attention_heads"] = 4
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"vision_model.*has shape"):
        load_encoder(bad)
    cfg["vision_config"]["hidden_size"] = 32
    cfg["vision_config"]["use_qk_norm"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="vision_config: use_qk_norm=True changes what the model computes"):
        load_encoder(bad)
    with pytest.raises(ConfigError, match="model_type 'clip' is not 'siglip'"):
        SiglipModel.from_pretrained(clip_ckpt[0])
    (bad / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ConfigError, match="not an encoder"):
        load_encoder(bad)


def test_unexpected_tensor_is_reported(tmp_path):
    hf = _hf_clip(tmp_path)
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    sd["text_model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor.*text_model.extra.weight"):
        ClipModel.from_pretrained(tmp_path)


def test_cli_embed(clip_ckpt, tmp_path, capsys):
    from mmfuse.cli import main
    folder = clip_ckpt[0]
    paths = []
    for n, (img, _) in enumerate(shapes_dataset(3, 50, seed=2)):
        p = tmp_path / f"{n}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    out = tmp_path / "img.npy"
    assert main(["embed", "--model", str(folder), "--images", *paths, "--out", str(out)]) == 0
    emb = np.load(out)
    torch.testing.assert_close(torch.from_numpy(emb), load_encoder(folder).encode_image(paths), atol=1e-6, rtol=0)
    texts = tmp_path / "t.txt"
    texts.write_text("a red circle\n\na blue square\n")
    with pytest.warns(DeprecationWarning, match="--model"):  # the positional checkpoint still works
        assert main(["embed", str(folder), "--texts", str(texts), "--out", str(tmp_path / "t.npy")]) == 0
    assert np.load(tmp_path / "t.npy").shape == (2, 24)
    assert main(["embed", "--model", str(folder), "--images", str(tmp_path / "nope.png"), "--out", str(out)]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_legacy_config_fields_are_accepted(clip_ckpt, tmp_path):
    """Configs written by older transformers (e.g. openai/clip-vit-base-patch32) repeat every generic
    PretrainedConfig field in each tower and carry text_config_dict / vision_config_dict."""
    import shutil
    folder = tmp_path / "legacy"
    shutil.copytree(clip_ckpt[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    legacy = {"_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
              "chunk_size_feed_forward": 0, "diversity_penalty": 0.0, "do_sample": False, "dropout": 0.0,
              "early_stopping": False, "finetuning_task": None, "id2label": {"0": "LABEL_0"}, "is_decoder": False,
              "initializer_factor": 1.0, "length_penalty": 1.0, "max_length": 20, "num_beams": 1, "prefix": None,
              "pruned_heads": {}, "return_dict": True, "tie_encoder_decoder": False, "torchscript": False,
              "typical_p": 1.0, "use_bfloat16": False, "projection_dim": 24, "torch_dtype": None}
    cfg["text_config"].update(legacy)
    cfg["vision_config"].update(legacy)
    cfg["text_config_dict"], cfg["vision_config_dict"] = None, None
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.testing.assert_close(load_encoder(folder).encode_text(TEXTS), load_encoder(clip_ckpt[0]).encode_text(TEXTS))
