"""Vision-language models against transformers on tiny random-init checkpoints (fp32): LLaVA (CLIP
and SigLIP towers, Llama and Qwen2 text models, the current, old and transformers-saved weight
layouts, single and list-valued vision_feature_layer, pad-to-square preprocessing), LLaVA-NeXT
(anyres tiling, unpadding, image_newline, both select strategies) and Idefics3 / SmolVLM (image
splitting, pixel shuffle, tile header tokens)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfuse.decoder.generate import DecodeState
from mmfuse.decoder.speculative import PromptLookupDrafter, speculative_generate
from mmfuse.encoders.preprocess import ImageError
from mmfuse.errors import CapacityError, CheckpointError, ConfigError, PromptError
from mmfuse.vlm import multimodal
from mmfuse.vlm.engine import VisionLanguageModel
from mmfuse.vlm.loader import detect_layout
from mmfuse.vlm.prompt import render_messages
from mmfuse.checkpoint import Checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from vlm_models import (ALL_SPECS, IDEFICS3_SPECS, NEXT_SPECS, SPECS, build_idefics3, build_llava,  # noqa: E402
                        build_llava_next, build_vlm, flat_pixels, image_processor, random_image)

TOL = 1e-4


def _ask(text, n_images=1):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module", params=ALL_SPECS)
def llava(request, tmp_path_factory):
    """(name, folder, transformers model, transformers processor, our engine) of each test model."""
    folder = tmp_path_factory.mktemp(request.param)
    hf, proc = build_vlm(request.param, folder)
    return request.param, folder, hf, proc, VisionLanguageModel.from_pretrained(folder)


def test_layouts_are_the_ones_asked_for(llava):
    name, folder, *_ = llava
    if name in IDEFICS3_SPECS:
        pytest.skip("idefics3 / smolvlm have one layout")
    layout = (SPECS.get(name) or NEXT_SPECS[name])[-1]
    assert detect_layout(Checkpoint(folder))[0] == {"current": "current", "old": "old", "transformers": "old"}[layout]


@torch.no_grad()
def test_full_multimodal_prompt_logits_match_transformers(llava):
    """Three images of different aspect ratios (a different anyres grid / tile split each)."""
    name, folder, hf, proc, vlm = llava
    images = [random_image(37, 23, 1), random_image(19, 44, 2, "RGBA"), random_image(70, 90, 3)]
    msgs = _ask("what is in the image", 3)
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert render_messages(vlm.processor.template, msgs)[0] == text
    inputs = proc(images=images, text=text, return_tensors="pt")
    req = vlm.prepare(msgs, images)
    assert list(req) == inputs["input_ids"][0].tolist()
    want = flat_pixels(inputs, [len(im.pixels) for im in req.images])
    torch.testing.assert_close(torch.from_numpy(np.concatenate([im.pixels for im in req.images])), want, atol=1e-5,
                               rtol=0)
    ref = hf(**inputs).logits[0]  # (T, V)
    feats = vlm.image_features(req.images)
    assert [len(f) for f in feats] == [im.tokens for im in req.images]
    x = vlm.vlm.embed_prompt(torch.tensor(req), torch.cat(feats))
    ours = vlm.model(None, torch.arange(len(req))[None], embeds=x[None])[0]
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_tower_in_tile_groups_equals_one_call(llava, monkeypatch):
    """Image features computed one tile per tower call (TOWER_ROWS below one tile) equal one call over
    all tiles, image by image and in order."""
    name, folder, hf, proc, vlm = llava
    images = [random_image(41, 29, 7), random_image(23, 61, 8), random_image(50, 50, 9)]
    req = vlm.prepare(_ask("what is in the image", 3), images)
    model = vlm.vlm
    one_call = model.tile_features(torch.from_numpy(np.concatenate([im.pixels for im in req.images])))
    want = [model.pack(f, im.size) for f, im in zip(one_call.split([len(im.pixels) for im in req.images]), req.images)]
    monkeypatch.setattr(multimodal, "TOWER_ROWS", 1)
    calls = []
    monkeypatch.setattr(model, "tile_features", lambda px, f=model.tile_features: calls.append(len(px)) or f(px))
    got = vlm.image_features(req.images)
    assert calls == [1] * sum(len(im.pixels) for im in req.images)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_decode_is_the_engines_decode_step(llava, monkeypatch):
    """The VLM only overrides prefill: every token after the first comes from the decoder Engine's
    `DecodeState.decode`, so work on that step (fused kernels, CUDA graphs) serves VLMs too."""
    name, folder, hf, proc, vlm = llava
    assert not {"_start", "decode", "_decode_step"} & set(vars(VisionLanguageModel))
    steps = []
    real = DecodeState.decode
    monkeypatch.setattr(DecodeState, "decode", lambda self, tok, active=None: steps.append(len(tok)) or real(self, tok, active))
    out = vlm.generate(_ask("describe a red photo"), images=random_image(33, 51, 3), temperature=0.0,
                       max_new_tokens=7, ignore_eos=True)[0]
    assert len(out.token_ids) == 7 and steps == [1] * 6


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(llava):
    name, folder, hf, proc, vlm = llava
    image = random_image(33, 51, 3)
    msgs = _ask("describe a red photo")
    inputs = proc(images=[image], text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    ref = hf.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, n:].tolist()
    ours = vlm.generate(msgs, images=image, temperature=0.0, max_new_tokens=40)[0]
    assert ours.token_ids == ref
    assert ours.finish_reason == "length"


def test_batch_of_different_image_counts_equals_one_by_one(llava):
    name, folder, hf, proc, vlm = llava
    a, b, c = random_image(30, 30, 4), random_image(17, 40, 5, "L"), random_image(52, 26, 6)
    reqs = [_ask("what is in the image", 2), "USER: a cat ASSISTANT:", _ask("describe the blue dog picture it"),
            "<image>USER: <image> photo of <image> ASSISTANT:"]
    imgs = [[a, b], None, [c], [c, a, c]]
    batched = vlm.generate(reqs, images=imgs, temperature=0.0, max_new_tokens=12, logprobs=True)
    single = VisionLanguageModel.from_pretrained(folder, prefix_reuse=False)
    for r, im, got in zip(reqs, imgs, batched):
        alone = single.generate(r, images=im, temperature=0.0, max_new_tokens=12, logprobs=True)[0]
        assert got.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)


def test_follow_up_reuses_the_prefix_and_gives_cold_start_tokens(llava):
    name, folder, hf, proc, vlm = llava
    warm = VisionLanguageModel.from_pretrained(folder)
    cold = VisionLanguageModel.from_pretrained(folder, prefix_reuse=False)
    image = random_image(41, 29, 7)
    msgs = _ask("what is in the image")
    first = warm.generate(msgs, images=image, temperature=0.0, max_new_tokens=10)[0]
    k = warm.prepare(msgs, image).images[0].tokens
    msgs = msgs + [{"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
                   {"role": "user", "content": [{"type": "text", "text": "and the dog"}]}]
    for step in range(2):  # a follow-up, then the same follow-up again (everything but the last token cached)
        got = warm.generate(msgs, images=image, temperature=0.0, max_new_tokens=16)[0]
        assert warm.reused_positions > k  # the image and the text before it were not recomputed
        ref = cold.generate(msgs, images=image, temperature=0.0, max_new_tokens=16)[0]
        assert cold.reused_positions == 0
        assert got.token_ids == ref.token_ids
    req = warm.prepare(msgs, image)
    assert warm.reused_positions == len(req) - 1
    # A different image invalidates the cached image positions: nothing after the first image token is reused.
    other = random_image(41, 29, 8)
    got = warm.generate(msgs, images=other, temperature=0.0, max_new_tokens=16)[0]
    assert warm.reused_positions <= list(req).index(warm.vlm.cfg.image_token_id)
    assert got.token_ids == cold.generate(msgs, images=other, temperature=0.0, max_new_tokens=16)[0].token_ids
    assert first.token_ids  # the first turn ran


def test_stream_stop_strings_and_speculative_decoding_work_for_images(llava):
    name, folder, hf, proc, vlm = llava
    image = random_image(26, 38, 9)
    msgs = _ask("picture it")
    full = vlm.generate(msgs, images=image, temperature=0.0, max_new_tokens=24)[0]
    chunks = list(vlm.stream(msgs, images=image, temperature=0.0, max_new_tokens=24))
    assert [c.token_id for c in chunks] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    if stop:
        cut = vlm.generate(msgs, images=image, temperature=0.0, max_new_tokens=24, stop_strings=(stop,))[0]
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    spec, stats = speculative_generate(vlm, vlm.prepare(msgs, image), PromptLookupDrafter(), k=3,
                                       temperature=0.0, max_new_tokens=24)
    assert spec.token_ids == full.token_ids and stats.forwards > 0
    sampled = [vlm.generate(msgs, images=image, temperature=0.9, top_p=0.9, seed=5, max_new_tokens=12)[0].token_ids
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_caption_and_ask(llava):
    name, folder, hf, proc, vlm = llava
    image = random_image(20, 20, 10)
    assert vlm.ask(image, "what is in the image", temperature=0.0, max_new_tokens=6) == \
        vlm.generate(_ask("what is in the image"), images=[image], temperature=0.0, max_new_tokens=6)[0].text
    assert isinstance(vlm.caption(image, temperature=0.0, max_new_tokens=6), str)


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("kind", ["clip", "siglip", "llava"])
def test_preprocessing_matches_transformers_image_processors(kind, tmp_path):
    from mmfuse.encoders.preprocess import ImageProcessor

    kw = {"clip": dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
          "siglip": dict(size={"height": 28, "width": 28}, resample=2),
          "llava": dict(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_pad=True)}[kind]
    ref = image_processor(kind, kw)
    ref.save_pretrained(tmp_path)
    ours = ImageProcessor.from_config(json.loads((tmp_path / "preprocessor_config.json").read_text()))
    for i, (h, w, mode) in enumerate([(37, 23, "RGB"), (19, 44, "RGBA"), (101, 7, "L"), (12, 13, "RGB"), (64, 64, "RGB")]):
        im = random_image(h, w, 20 + i, mode)
        want = torch.as_tensor(np.asarray(ref(images=[im], return_tensors="np")["pixel_values"][0]))
        torch.testing.assert_close(torch.as_tensor(ours.process_one(im)), want.float(), atol=1e-5, rtol=0)


SHAPES = [(37, 23, "RGB"), (19, 44, "RGBA"), (101, 7, "L"), (12, 13, "RGB"), (64, 64, "RGB"), (7, 150, "RGB"),
          (90, 30, "RGB"), (200, 121, "RGB"), (28, 56, "RGB"), (1, 1, "RGB")]


@pytest.fixture(scope="module", params=sorted(NEXT_SPECS) + sorted(IDEFICS3_SPECS) + ["idefics3_no_split"])
def tiled(request, tmp_path_factory):
    """(transformers processor, our engine) of the tiling families (models built but not run)."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "idefics3_no_split":
        spec = list(IDEFICS3_SPECS["idefics3"])
        spec[4] = dict(spec[4], do_image_splitting=False, resample=3)
        hf, proc = build_idefics3(tuple(spec), folder)
    else:
        hf, proc = build_vlm(request.param, folder)
    return proc, VisionLanguageModel.from_pretrained(folder)


@pytest.mark.parametrize("h,w,mode", SHAPES)
def test_tiling_preprocessing_and_token_counts_match_transformers(tiled, h, w, mode):
    """anyres (best resolution, fit, pad, tiles, base image, unpadded feature count) and idefics3
    splitting (longest edge, tile multiples, tiles + global image, header tokens) on odd shapes."""
    proc, vlm = tiled
    im = random_image(h, w, h * 7 + w, mode)
    text = "USER: <image> what is in the image ASSISTANT:"
    inputs = proc(images=[im], text=text, return_tensors="pt")
    req = vlm.prepare(text, im)
    assert list(req) == inputs["input_ids"][0].tolist()
    assert req.images[0].tokens == sum(1 for t in req if t == vlm.vlm.cfg.image_token_id)
    want = flat_pixels(inputs, [len(req.images[0].pixels)])
    torch.testing.assert_close(torch.from_numpy(req.images[0].pixels), want, atol=1e-5, rtol=0)


def test_tiling_settings_errors_name_them(tmp_path):
    hf, proc = build_llava_next("next_clip_llama", tmp_path / "next")
    pc_path = tmp_path / "next" / "processor_config.json"
    pc = json.loads(pc_path.read_text())
    pc["image_processor"]["image_grid_pinpoints"] = [[30, 30]]
    pc_path.write_text(json.dumps(pc))
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        VisionLanguageModel.from_pretrained(tmp_path / "next")
    cfg_path = tmp_path / "next" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_grid_pinpoints"] = [[30, 45]]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="multiples of the tower's image_size 30"):
        VisionLanguageModel.from_pretrained(tmp_path / "next")
    hf, proc = build_idefics3("idefics3", tmp_path / "id3")
    pc_path = tmp_path / "id3" / "processor_config.json"
    pc = json.loads(pc_path.read_text())
    for key, value, match in (("max_image_size", {"longest_edge": 56}, "max_image_size.longest_edge=56"),
                              ("size", {"height": 80, "width": 80}, "size="),
                              ("do_center_crop", True, "do_center_crop")):
        bad = json.loads(json.dumps(pc))
        bad["image_processor"][key] = value
        pc_path.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=match):
            VisionLanguageModel.from_pretrained(tmp_path / "id3")
    pc_path.write_text(json.dumps(pc))
    cfg_path = tmp_path / "id3" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["scale_factor"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="scale_factor=3"):
        VisionLanguageModel.from_pretrained(tmp_path / "id3")
    cfg["model_type"] = "idefics2"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="idefics2"):
        VisionLanguageModel.from_pretrained(tmp_path / "id3")


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_typed_errors_before_model_work(llava, tmp_path, monkeypatch):
    name, folder, hf, proc, vlm = llava
    calls = []
    monkeypatch.setattr(vlm, "image_features", lambda px: calls.append(px) or 1 / 0)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="bad.png"):
        vlm.generate(_ask("what"), images=[bad])
    with pytest.raises(ImageError, match="not-there"):
        vlm.generate(_ask("what"), images=[tmp_path / "not-there.jpg"])
    with pytest.raises(ImageError, match="unsupported image type"):
        vlm.generate(_ask("what"), images=[{"x": 1}])
    with pytest.raises(PromptError, match="2 image placeholder"):
        vlm.generate(_ask("what", 2), images=[random_image(9, 9, 0)])
    with pytest.raises(PromptError, match="0 image placeholder"):
        vlm.generate("USER: no image here ASSISTANT:", images=[random_image(9, 9, 0)])
    k = vlm.prepare(_ask("what"), random_image(9, 9, 0)).images[0].tokens
    n = vlm.model.cfg.max_seq_len // k + 1
    with pytest.raises(CapacityError, match="context"):
        vlm.generate(_ask("what", n), images=[random_image(9, 9, 0)] * n, max_new_tokens=1)
    assert not calls


def test_chat_template_runs_sandboxed_with_transformers_globals():
    from mmfuse.chat_template import ChatTemplate

    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(PromptError, match="rejected"):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render(msgs)
    with pytest.raises(PromptError, match="only user turns"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render(msgs)
    t = ChatTemplate("{% for m in messages %}{{ m | tojson }}{% if loop.first %}{% break %}{% endif %}{% endfor %}"
                     "{{ strftime_now('%Y')|length }}", special_tokens={"bos_token": "<s>"})
    assert t.render(msgs + msgs) == '{"role": "user", "content": "x"}4'
    with pytest.raises(CheckpointError, match="line 1"):
        ChatTemplate("{% for %}")


def test_unsupported_settings_are_errors_naming_them(tmp_path):
    hf, proc = build_llava("clip_llama", tmp_path)
    pc = json.loads((tmp_path / "processor_config.json").read_text())
    pc["image_processor"]["do_something_new"] = True
    (tmp_path / "processor_config.json").write_text(json.dumps(pc))
    with pytest.raises(ConfigError, match="do_something_new"):
        VisionLanguageModel.from_pretrained(tmp_path)
    del pc["image_processor"]["do_something_new"]
    pc["image_processor"]["crop_size"] = {"height": 24, "width": 24}
    (tmp_path / "processor_config.json").write_text(json.dumps(pc))
    with pytest.raises(ConfigError, match="vision tower takes 30x30"):
        VisionLanguageModel.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "cls_only"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cls_only"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_cli_chat_one_question_and_interactive(tmp_path, capsys, monkeypatch):
    import io

    from mmfuse.cli import main

    folder = tmp_path / "m"
    build_llava("siglip_qwen2", folder)
    img = tmp_path / "img.png"
    random_image(23, 31, 11).save(img)
    vlm = VisionLanguageModel.from_pretrained(folder)
    want = vlm.ask(img, "what is in the image", temperature=0.0, max_new_tokens=8)
    follow = vlm.generate(_ask("what is in the image") + [
        {"role": "assistant", "content": [{"type": "text", "text": want}]},
        {"role": "user", "content": [{"type": "text", "text": "and the dog"}]}], images=[img], temperature=0.0,
        max_new_tokens=8)[0].text
    cmd = ["chat", "--model", str(folder), "--image", str(img), "--temperature", "0", "--max-new-tokens", "8"]
    assert main(cmd + ["--prompt", "what is in the image"]) == 0
    assert capsys.readouterr().out == want + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("what is in the image\n\nand the dog\n"))
    assert main(cmd + ["--stream"]) == 0
    assert capsys.readouterr().out == want + "\n" + follow + "\n"
    assert main(["chat", "--model", str(folder), "--image", str(tmp_path / "missing.png"), "--prompt", "x"]) == 2
    assert "missing.png" in capsys.readouterr().err


def test_real_llava_1_5_config_reads_at_full_size(monkeypatch):
    from mmfuse import hf_config
    from mmfuse.vlm.config import VlmConfig

    monkeypatch.setattr(hf_config, "_warned", set())  # warned once per process: other tests may have seen it

    cfg = json.loads((Path(__file__).parent / "data" / "configs" / "llava-1.5-7b-hf.json").read_text())
    with pytest.warns(UserWarning):  # the tower's stray vocab_size is ignored with a warning
        vc = VlmConfig.from_hf(cfg, "llava-1.5")
    assert (vc.tokens_per_image, vc.image_token_id, vc.feature_layers, vc.text.vocab_size, vc.text.d_model,
            vc.vision.d_model, vc.vision.n_layer) == (576, 32000, (-2,), 32064, 4096, 1024, 24)


def test_prefix_record_lives_on_the_cache_threads_and_rollback(llava):
    """The positions a cache holds are recorded on the cache itself (decode, forward and truncate keep
    the record exact), so threads sharing one engine and speculative rollbacks never reuse a prefix
    the cache does not hold."""
    name, folder, hf, proc, vlm = llava
    warm = VisionLanguageModel.from_pretrained(folder)
    cold = VisionLanguageModel.from_pretrained(folder, prefix_reuse=False)
    images = [random_image(33, 27, s) for s in (11, 12, 13)]
    chats = [_ask(q) for q in ("what is it", "what colour", "how many")]
    want = [cold.generate(m, images=im, temperature=0.0, max_new_tokens=12)[0].token_ids
            for m, im in zip(chats, images)]
    import threading
    errors = []

    def run(i):
        for r in range(4):
            j = (i + r) % 3
            got = warm.generate(chats[j], images=images[j], temperature=0.0, max_new_tokens=12)[0].token_ids
            if got != want[j]:
                errors.append((i, r, j))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Speculative decoding writes drafts with forward() and rolls rejected ones back with truncate().
    spec, _ = speculative_generate(warm, warm.prepare(chats[0], images[0]), PromptLookupDrafter(), k=3,
                                   temperature=0.0, max_new_tokens=12)
    follow = chats[0] + [{"role": "assistant", "content": [{"type": "text", "text": "a shape"}]},
                         {"role": "user", "content": [{"type": "text", "text": "and then"}]}]
    got = warm.generate(follow, images=images[0], temperature=0.0, max_new_tokens=12)[0].token_ids
    assert got == cold.generate(follow, images=images[0], temperature=0.0, max_new_tokens=12)[0].token_ids
    state = warm._take_state(1, 8)  # the cache the last call gave back, with its record
    assert state.cache.tokens is not None and len(state.cache.tokens) >= state.cache.filled[0]
    n = state.cache.filled[0]
    state.cache.truncate([n - 2])
    state.decode(torch.tensor([5]))
    assert state.cache.tokens[n - 2] == 5 and len(state.cache.tokens) == n - 1


def test_real_llava_next_and_smolvlm_configs_read_at_full_size(monkeypatch):
    """Published config.json texts (written from the hub files, no network here): the anyres token
    count of llava-v1.6 against transformers' own processor arithmetic, SmolVLM's 64 tokens per tile."""
    import warnings

    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    from mmfuse.vlm.anyres import feature_count
    from mmfuse.vlm.config import vlm_config

    data = Path(__file__).parent / "data" / "configs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stray fields (the tower's vocab_size, use_image_newline_parameter, ...)
        nxt = vlm_config(json.loads((data / "llava-v1.6-mistral-7b-hf.json").read_text()), "llava-v1.6")
        smol = vlm_config(json.loads((data / "SmolVLM-256M-Instruct.json").read_text()), "smolvlm")
    assert (nxt.tokens_per_image, nxt.grid_side, nxt.text.family, len(nxt.grid_pinpoints)) == (576, 24, "llama", 5)
    assert (smol.tokens_per_tile, smol.scale_factor, smol.vision.d_model, smol.vision.n_layer, smol.vision.d_ff,
            smol.text.d_model, smol.text.n_layer, smol.text.norm_eps) == (64, 4, 768, 12, 3072, 576, 30, 1e-5)

    class Ref(LlavaNextProcessor):  # transformers' counting, without a tokenizer
        def __init__(self):
            self.patch_size, self.num_additional_image_tokens = 14, 1
            self.image_processor = type("P", (), {"image_grid_pinpoints": [list(p) for p in nxt.grid_pinpoints]})

    ref = Ref()
    for h, w in [(480, 640), (640, 480), (336, 336), (1000, 200), (123, 4567), (2000, 2001)]:
        assert feature_count(h, w, nxt.grid_pinpoints, 336, 24, 576) == ref._get_number_of_features(h, w, 336, 336) - 1
