"""The contrastive training loop: a tiny CLIP learns generated shape/caption pairs, its checkpoint
loads in transformers' CLIPModel, gradient accumulation equals one big batch, the schedule and the
logit_scale clamp behave."""
import json
import math

import pytest
import torch

from mmfuse.encoders import ClipModel, ImageProcessor, SiglipModel, TextTokenizer, clip_config, load_encoder
from mmfuse.encoders.synthetic import COLOURS, SHAPES, caption, shapes_dataset, write_word_tokenizer
from mmfuse.encoders.train import TrainConfig, lr_at, tensor_batches, train, train_step

IMG, CTX = 32, 8
PROC = {"size": {"height": IMG, "width": IMG}}  # preprocessor_config.json: plain resize, CLIP mean/std


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_config(vocab):
    return clip_config(embed_dim=32, image_size=IMG, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
                       text_width=64, text_layers=2, text_heads=4, vocab_size=vocab, context_length=CTX,
                       eos_token_id=vocab - 1, pad_token_id=0)


def _siglip_config(vocab):
    tower = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    return {"model_type": "siglip", "architectures": ["SiglipModel"],
            "vision_config": dict(model_type="siglip_vision_model", image_size=IMG, patch_size=8, **tower),
            "text_config": dict(model_type="siglip_text_model", vocab_size=vocab, max_position_embeddings=CTX, **tower)}


def _data(folder, n, seed):
    vocab = write_word_tokenizer(folder, ["a", *COLOURS, *SHAPES], CTX)
    proc = ImageProcessor.from_config(PROC)
    pairs = shapes_dataset(n, IMG, seed=seed)
    ids, _ = TextTokenizer(folder, CTX)([c for _, c in pairs])
    return vocab, proc([im for im, _ in pairs]), ids, [c for _, c in pairs]


def test_tiny_clip_learns_shapes_and_saves_hf_checkpoint(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    vocab, px, ids, _ = _data(tmp_path, 640, seed=0)
    model = ClipModel.random(_tiny_config(vocab), seed=0)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(PROC))
    cfg = TrainConfig(steps=80, lr=3e-3, warmup_steps=5, accum_steps=2, progress=False, out_dir=str(tmp_path / "run"),
                      save_every=40, assets_from=str(tmp_path))
    losses = train(model, tensor_batches(px, ids, 32, seed=0), cfg)
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert start > 3.0 and end < 0.7 * start, (start, end)
    assert model.logit_scale.item() <= math.log(100) + 1e-6

    # zero-shot on held-out images: the learned captions classify colour + shape far above chance (1/12)
    _, test_px, _, test_caps = _data(tmp_path, 96, seed=1)
    names = [caption(c, s) for c in COLOURS for s in SHAPES]
    name_ids, _ = TextTokenizer(tmp_path, CTX)(names)
    with torch.no_grad():
        img, txt = model(test_px, name_ids)
    pred = (img @ txt.T).argmax(-1)
    acc = (pred == torch.tensor([names.index(c) for c in test_caps])).float().mean().item()
    assert acc > 0.4, acc

    assert (tmp_path / "run" / "step-000040" / "model.safetensors").is_file()
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "run" / "final").eval()
    with torch.no_grad():
        out = hf(pixel_values=test_px[:6], input_ids=name_ids)
        ours = model.logits(*model(test_px[:6], name_ids))
    torch.testing.assert_close(ours, out.logits_per_image, atol=1e-4, rtol=1e-4)
    reloaded = ClipModel.from_pretrained(tmp_path / "run" / "final")
    torch.testing.assert_close(reloaded.logits(*reloaded(test_px[:6], name_ids)), ours, atol=1e-5, rtol=0)
    enc = load_encoder(tmp_path / "run" / "final")  # tokenizer and preprocessor travelled with it
    torch.testing.assert_close(enc.encode_text(names), txt, atol=1e-5, rtol=0)
    assert enc.processor.output_size == (IMG, IMG)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_gradient_accumulation_equals_one_batch(tmp_path, family, one_thread):
    vocab, px, ids, _ = _data(tmp_path, 24, seed=2)
    cls, cfg = (ClipModel, _tiny_config(vocab)) if family == "clip" else (SiglipModel, _siglip_config(vocab))
    grads = []
    for accum in (1, 3):
        model = cls.random(cfg, seed=3).double()
        train_cfg = TrainConfig(accum_steps=accum)
        loss = train_step(model, px.double(), ids, train_cfg, torch.autocast("cpu", enabled=False))
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l3, g3) = grads
    assert l1 == pytest.approx(l3, rel=1e-9)
    assert g1.keys() == g3.keys() and "logit_scale" in g1
    for n in g1:
        torch.testing.assert_close(g3[n], g1[n], atol=1e-9, rtol=1e-7, msg=n)


def test_schedule_clamp_and_errors(tmp_path):
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(109, cfg) == pytest.approx(0.1, abs=1e-3)
    lrs = [lr_at(s, cfg) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))

    vocab, px, ids, _ = _data(tmp_path, 8, seed=4)
    model = ClipModel.random(_tiny_config(vocab))
    with torch.no_grad():
        model.logit_scale.fill_(7.0)  # exp(7) = 1097 > 100
    train(model, tensor_batches(px, ids, 8), TrainConfig(steps=1, lr=1e-6, warmup_steps=1, progress=False))
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with pytest.raises(ValueError, match="CUDA"):
        train(model, tensor_batches(px, ids, 8), TrainConfig(steps=1, precision="bf16", progress=False))
    with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
        train(model, tensor_batches(px, ids, 8), TrainConfig(steps=1, accum_steps=3, progress=False))
    with pytest.raises(ValueError, match="ran out after 0"):
        train(model, iter([]), TrainConfig(steps=1, progress=False))
