"""Reliability of the decoder, encoder and CLI side (issue 9): an Engine shared by threads and
interleaved streams, non-finite logits, bounded image preprocessing, RoPE tables sized by the KV
cache, checkpoint paths that stay inside the folder, typed config errors, one-line CLI errors,
and atomic outputs."""
import errno
import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_hf_decoder
from mmfuse.cli import main as cli_main
from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.generate import Engine
from mmfuse.decoder.loader import load_decoder
from mmfuse.errors import (CheckpointError, ConfigError, ImageError, MMFuseError, NumericalError, OutputError,
                           PromptError, SamplingParamsError)
from mmfuse.generation.params import SamplingParams
from mmfuse.generation.sampling import Sampler


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("llama_rel")
    build_hf_decoder("llama", folder, tokenizer)
    return folder


def _requests():
    """(prompt, options) pairs: greedy and seeded sampling, text and ids, different lengths."""
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(8):
        ids = torch.randint(0, 300, (3 + 5 * i % 17,), generator=g).tolist()
        prompt = ids if i % 2 else "the quick brown fox " * (1 + i % 3)
        opts = dict(max_new_tokens=12 + i, temperature=0.0) if i % 3 == 0 else \
            dict(max_new_tokens=12 + i, temperature=0.9, top_p=0.9, seed=100 + i, logprobs=True)
        out.append((prompt, opts))
    return out


# ----------------------------------------------------------------------------- 1. Engine and threads


def test_engine_shared_by_threads_gives_single_threaded_completions(llama_folder):
    engine = Engine.from_pretrained(llama_folder)
    reqs = _requests()
    expected = [engine.generate(p, **o)[0] for p, o in reqs]
    errors, results = [], {}
    start = threading.Barrier(4)

    def worker(t):
        try:
            start.wait()
            for rep in range(2):
                for i in range(t, len(reqs) + t):  # every thread runs every request, in a shifted order
                    p, o = reqs[i % len(reqs)]
                    results[(t, rep, i % len(reqs))] = engine.generate(p, **o)[0]
        except Exception as e:  # collected: an exception in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 4 * 2 * len(reqs)
    for (t, rep, i), got in results.items():
        assert got.token_ids == expected[i].token_ids, (t, rep, i)
        assert got.text == expected[i].text
        if got.logprobs is not None:
            torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(expected[i].logprobs), atol=1e-4, rtol=0)


def test_interleaved_streams_in_one_thread_do_not_share_a_cache(gpt2_folder):
    engine = Engine.from_pretrained(gpt2_folder)
    (pa, oa), (pb, ob) = _requests()[1], _requests()[2]
    ref_a, ref_b = engine.generate(pa, **oa)[0], engine.generate(pb, **ob)[0]
    sa, sb = engine.stream(pa, **oa), engine.stream(pb, **ob)
    got_a, got_b = [], []
    for ca, cb in zip(sa, sb):  # alternate: each stream holds its cache across the other's steps
        got_a.append(ca.token_id)
        got_b.append(cb.token_id)
        if len(got_a) % 6 == 1:
            mid = engine.generate(pa, **oa)[0]  # and whole calls in between
            assert mid.token_ids == ref_a.token_ids
    got_a += [c.token_id for c in sa]
    got_b += [c.token_id for c in sb]
    assert got_a == ref_a.token_ids and got_b == ref_b.token_ids


def test_abandoned_stream_does_not_leak_into_later_calls(gpt2_folder):
    engine = Engine.from_pretrained(gpt2_folder)
    p, o = _requests()[0]
    ref = engine.generate(p, **o)[0]
    s = engine.stream(p, **o)
    next(s)
    s.close()  # returns its cache to the engine
    assert engine.generate(p, **o)[0].token_ids == ref.token_ids


# ----------------------------------------------------------------------------- 2. non-finite logits


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_weights_raise_naming_the_step(gpt2_folder, temperature):
    engine = Engine.from_pretrained(gpt2_folder)
    with torch.no_grad():
        engine.model.norm_f.weight[3] = float("nan")
    with pytest.raises(NumericalError, match=r"step 0: .*NaN or infinite"):
        engine.generate([1, 2, 3], temperature=temperature, max_new_tokens=4, seed=0)


def test_sampler_refuses_non_finite_processed_logits():
    V = 11
    for bad_row in ([float("nan")] * V, [0.0] * (V - 1) + [float("inf")], [float("-inf")] * V):
        logits = torch.stack([torch.randn(V), torch.tensor(bad_row)])
        for temp in (0.0, 1.0):
            sampler = Sampler([SamplingParams(temperature=temp, seed=1)] * 2, V, "cpu", [[1], [2]])
            with pytest.raises(NumericalError, match=r"step 5: the logits of row\(s\) \[1\]"):
                sampler.sample(logits, 5)
    # an in-range penalty that overflows huge logits is caught too
    sampler = Sampler([SamplingParams(temperature=0.0, repetition_penalty=0.01)], V, "cpu", [[4]])
    logits = torch.zeros(1, V)
    logits[0, 4] = 3e37
    with pytest.raises(NumericalError, match="step 2"):
        sampler.sample(logits, 2)


@pytest.mark.parametrize("value", [1e-40, 1e-3, 1e3, float("inf")])
def test_repetition_penalty_range_is_checked(value):
    with pytest.raises(SamplingParamsError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value).validate()


@pytest.mark.parametrize("theta", [0, -1.0, float("nan"), "10000"])
@pytest.mark.parametrize("where", ["config", "rope_parameters"])
def test_rope_theta_must_be_positive(llama_folder, tmp_path, theta, where):
    folder = tmp_path / "m"
    shutil.copytree(llama_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (cfg if where == "config" else cfg["rope_parameters"])["rope_theta"] = theta
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json: (rope_parameters: )?rope_theta"):
        load_decoder(folder)


# ----------------------------------------------------------------------------- 3. image bombs


def _clip_processor(**kw):
    from mmfuse.encoders import ImageProcessor
    return ImageProcessor.from_config({"size": {"shortest_edge": 40}, "do_center_crop": True,
                                       "crop_size": {"height": 40, "width": 40}, **kw})


def test_thin_image_is_resampled_in_bounded_work(tmp_path, monkeypatch):
    path = tmp_path / "thin.png"
    Image.new("RGB", (200_000, 1), (200, 10, 30)).save(path)
    assert path.stat().st_size < 2000
    sizes = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        if size[0] * size[1] > 10**6:
            raise AssertionError(f"resize to {size} does work far beyond the output size")
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    proc = _clip_processor()
    for image in (str(path), Image.new("L", (1, 150_000))):
        x = proc(image)
        assert x.shape == (1, 3, 40, 40) and torch.isfinite(x).all()
    assert sizes and max(w * h for w, h in sizes) <= 40 * 40


@pytest.mark.parametrize("shape", [(40, 3000, 3), (3001, 40, 3), (1, 997, 3), (23, 1500, 3)])
def test_bounded_resize_equals_the_plain_path(shape, monkeypatch):
    import mmfuse.encoders.preprocess as pp
    arr = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    proc = _clip_processor()
    plain = proc(arr)
    monkeypatch.setattr(pp, "MAX_RESIZE_PIXELS", 100)  # force the crop-region path
    got = proc(arr)
    # Equal but for PIL's fixed-point rounding at a rare pixel (one level of 255, times 1/std).
    one_level = 1.001 / 255 / min(proc.image_std)
    torch.testing.assert_close(got, plain, atol=one_level, rtol=0)
    assert ((got - plain).abs() > 1e-5).float().mean() < 0.01


def test_pixel_budget_and_decompression_bombs(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    proc = _clip_processor()
    proc.max_pixels = 300 * 200 - 1
    for image, where in ((str(path), "big.png"), (Image.new("RGB", (300, 200)), "image 0"),
                         (np.zeros((200, 300, 3), np.uint8), "image 0")):
        with pytest.raises(ImageError, match=f"{where}.*300 x 200 pixels exceed the budget"):
            proc([image])
    proc.max_pixels = 300 * 200
    assert proc(str(path)).shape == (1, 3, 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own check, inside Image.open
    with pytest.raises(ImageError, match="big.png: refused as a decompression bomb"):
        proc(str(path))


def test_shortest_edge_without_crop_refuses_huge_intermediates():
    from mmfuse.encoders import ImageProcessor
    proc = ImageProcessor.from_config({"size": {"shortest_edge": 64}, "do_center_crop": False})
    with pytest.raises(ImageError, match="aspect ratio too extreme"):
        proc(Image.new("RGB", (1, 300_000)))


# ----------------------------------------------------------------------------- 4. RoPE tables


def test_rope_tables_follow_the_kv_cache_not_the_context(llama_folder, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(llama_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 2**27  # eager tables: 2 x 2^27 x 4 x 4 bytes = 4 GiB
    (folder / "config.json").write_text(json.dumps(cfg))
    engine = Engine.from_pretrained(folder)
    ref = Engine.from_pretrained(llama_folder)
    assert engine.model.rope_cos.numel() == 0
    out = engine.generate([5, 6, 7], temperature=0.0, max_new_tokens=30)[0]
    assert out.token_ids == ref.generate([5, 6, 7], temperature=0.0, max_new_tokens=30)[0].token_ids
    assert 33 <= engine.model.rope_cos.shape[0] <= 128
    # rows built in several steps equal one eager build
    from mmfuse.nn.rope import rope_tables
    m = engine.model
    m.ensure_positions(500)
    cos, sin = rope_tables(m.rope_inv_freq, 0, m.rope_cos.shape[0])
    assert torch.equal(m.rope_cos, cos) and torch.equal(m.rope_sin, sin)


# ----------------------------------------------------------------------------- 5. paths in checkpoints


def _sharded(folder, src):
    """Copy a single-file checkpoint as a one-shard index checkpoint; return the index dict."""
    shutil.copytree(src, folder)
    (folder / "model.safetensors").rename(folder / "shard-1.safetensors")
    from safetensors import safe_open
    with safe_open(str(folder / "shard-1.safetensors"), "pt") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": {k: "shard-1.safetensors" for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_weight_map_entries_must_stay_inside_the_folder(gpt2_folder, tmp_path):
    folder = tmp_path / "ck"
    index = _sharded(folder, gpt2_folder)
    assert load_decoder(folder) is not None
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.copy(folder / "shard-1.safetensors", outside / "model.safetensors")
    key = next(iter(index["weight_map"]))
    for entry in ("../other/model.safetensors", str(outside / "model.safetensors"), "sub/../../other/model.safetensors"):
        bad = dict(index, weight_map={k: entry for k in index["weight_map"]})
        (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map\[.*\]: entry"):
            load_decoder(folder)
    # a symlink inside the folder that resolves outside it
    (folder / "link.safetensors").symlink_to(outside / "model.safetensors")
    bad = dict(index, weight_map={k: "link.safetensors" for k in index["weight_map"]})
    (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match=f"weight_map\\['{key}'\\]: entry 'link.safetensors' resolves to"):
        load_decoder(folder)


def test_hub_cache_snapshot_symlinks_into_blobs_are_allowed(gpt2_folder, tmp_path):
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    tmp = tmp_path / "plain"
    _sharded(tmp, gpt2_folder)
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tmp.iterdir():
        shutil.copy(f, blobs / f"sha-{f.name}")
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", f"sha-{f.name}"))
    assert load_decoder(snap).cfg.n_layer == 2


def test_modules_json_paths_must_stay_inside_the_folder(tmp_path):
    from mmfuse.encoders import SentenceEncoder
    folder, outside = tmp_path / "st", tmp_path / "evil"
    folder.mkdir()
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    for entry in ("../evil", str(outside)):
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": entry, "type": "sentence_transformers.models.Pooling"}]))
        with pytest.raises(CheckpointError, match=r"modules\.json: Pooling module path: entry"):
            SentenceEncoder.from_pretrained(folder)


# ----------------------------------------------------------------------------- 6. typed errors


_LLAMA = dict(model_type="llama", vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
              intermediate_size=16)
_GPT2 = dict(model_type="gpt2", vocab_size=10, n_embd=8, n_head=2, n_layer=1, n_positions=16)


@pytest.mark.parametrize("base, change, field", [
    (_GPT2, {"n_head": 0}, "n_head"),
    (_GPT2, {"n_head": "2"}, "n_head"),
    (_GPT2, {"n_embd": 8.0}, "n_embd"),
    (_GPT2, {"n_positions": -5}, "n_positions"),
    (_GPT2, {"vocab_size": 2**40}, "vocab_size"),
    (_GPT2, {"vocab_size": True}, "vocab_size"),
    (_GPT2, {"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"),
    (_GPT2, {"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    (_GPT2, {"activation_function": ["gelu"]}, "activation_function"),
    (_GPT2, {"eos_token_id": -1}, "eos_token_id"),
    (_LLAMA, {"num_key_value_heads": 0}, "num_key_value_heads"),
    (_LLAMA, {"num_attention_heads": 3}, "hidden_size=8 is not divisible"),
    (_LLAMA, {"head_dim": 3}, "head_dim=3 must be even"),
    (_LLAMA, {"rope_parameters": [1, 2]}, "rope_parameters must be an object"),
    (_LLAMA, {"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    (_LLAMA, {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 32}}, "high_freq_factor"),
    (_LLAMA, {"max_position_embeddings": 1e6}, "max_position_embeddings"),
    (_LLAMA, {"layer_types": "full_attention"}, "layer_types"),
])
def test_bad_decoder_config_fields_are_config_errors(base, change, field):
    with pytest.raises(ConfigError, match=f"cfg.json: .*{field}"):
        DecoderConfig.from_hf({**base, **change}, source="cfg.json")


@pytest.mark.parametrize("where, change, field", [
    ("vision_config", {"patch_size": 0}, "patch_size"),
    ("vision_config", {"image_size": "224"}, "image_size"),
    ("vision_config", {"num_attention_heads": 0}, "num_attention_heads"),
    ("vision_config", {"num_channels": 1}, "num_channels"),
    ("text_config", {"hidden_size": 32.0}, "hidden_size"),
    ("text_config", {"eos_token_id": 10**6}, "eos_token_id"),
    ("text_config", {"layer_norm_eps": float("inf")}, "layer_norm_eps"),
    (None, {"projection_dim": -1}, "projection_dim"),
])
def test_bad_encoder_config_fields_are_config_errors(where, change, field):
    from mmfuse.encoders import ClipModel
    from mmfuse.encoders.clip import clip_config
    cfg = clip_config(image_size=32, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2, text_width=16,
                      text_layers=1, text_heads=2, vocab_size=50, context_length=8, eos_token_id=49, pad_token_id=0)
    ClipModel.parse_config(cfg, "cfg.json")  # the base config is fine
    (cfg[where] if where else cfg).update(change)
    with pytest.raises(ConfigError, match=f"cfg.json.*{field}"):
        ClipModel.parse_config(cfg, "cfg.json")


@pytest.mark.parametrize("change, field", [
    ({"size": {"shortest_edge": 0}}, "shortest_edge"),
    ({"size": {"height": "224", "width": 224}}, "height"),
    ({"crop_size": 10**9}, "height"),
    ({"image_mean": 0.5}, "image_mean"),
    ({"image_std": [0.5, 0.5, 0.0]}, "image_std"),
    ({"resample": "bicubic"}, "resample"),
    ({"do_normalize": "yes"}, "do_normalize"),
])
def test_bad_preprocessor_config_fields_are_config_errors(change, field):
    from mmfuse.encoders import ImageProcessor
    cfg = {"size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": 40, **change}
    with pytest.raises(ConfigError, match=f"pp.json.*{field}"):
        ImageProcessor.from_config(cfg, "pp.json")


def test_lone_surrogate_prompt_is_a_prompt_error(gpt2_folder, capsys):
    engine = Engine.from_pretrained(gpt2_folder)
    with pytest.raises(PromptError, match=r"prompt 1: character 2 is a lone surrogate"):
        engine.generate(["fine", "ab\udc80c"], max_new_tokens=2)
    with pytest.raises(PromptError, match="prompt: character 0"):
        list(engine.stream("\ud800", max_new_tokens=2))
    assert cli_main(["generate", "--model", str(gpt2_folder), "--prompt", "x\udcff"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mmfuse generate: error: prompt 0: character 1 is a lone surrogate" in err


def _bad_config_folder(tmp_path, gpt2_folder, **change):
    folder = tmp_path / "bad"
    shutil.copytree(gpt2_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("change", [{"n_head": 0}, {"n_embd": "64"}, {"n_positions": -1}])
def test_cli_bad_config_is_one_line(gpt2_folder, tmp_path, capsys, change):
    folder = _bad_config_folder(tmp_path, gpt2_folder, **change)
    for argv in (["info", "--model", str(folder)], ["generate", "--model", str(folder), "--prompt", "hi"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        name = next(iter(change))
        assert err.count("\n") == 1 and err.startswith(f"mmfuse {argv[0]}: error: ") and name in err, err


@pytest.mark.parametrize("exc, code, text", [
    (ZeroDivisionError("division by zero"), 1, "internal error: ZeroDivisionError: division by zero (rerun with --traceback"),
    (TypeError("bad operand"), 1, "internal error: TypeError: bad operand"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried"),
     1, "error: out of memory"),
    (MemoryError(), 1, "error: out of memory"),
    (OverflowError("cannot convert float infinity to integer"), 1, "internal error: OverflowError"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "error: [Errno 28] No space left on device"),
    (CheckpointError("x.safetensors: bad\nsecond line"), 2, "error: x.safetensors: bad second line"),
])
def test_cli_turns_every_exception_into_one_line(monkeypatch, capsys, gpt2_folder, exc, code, text):
    import mmfuse.decoder.cli as dcli

    def boom(args):
        raise exc
    monkeypatch.setattr(dcli, "cmd_info", boom)
    assert cli_main(["info", "--model", str(gpt2_folder)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmfuse info: ") and text in err, err
    assert "Traceback" not in err
    if code == 1 and "internal" in text:
        assert cli_main(["--traceback", "info", "--model", str(gpt2_folder)]) == 1
        assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_cli_ctrl_c_exits_130_quietly(monkeypatch, capsys, gpt2_folder):
    import mmfuse.decoder.cli as dcli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(dcli, "cmd_info", interrupted)
    assert cli_main(["info", "--model", str(gpt2_folder)]) == 130
    assert capsys.readouterr().err == ""


def test_every_mmfuse_error_is_a_typed_subclass():
    for cls in (CheckpointError, ConfigError, ImageError, NumericalError, OutputError, PromptError, SamplingParamsError):
        assert issubclass(cls, MMFuseError)


# ----------------------------------------------------------------------------- 7. atomic outputs


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from mmfuse.encoders import ClipModel
    from mmfuse.encoders.clip import clip_config
    from mmfuse.encoders.synthetic import write_word_tokenizer
    folder = tmp_path_factory.mktemp("clip_rel")
    V = write_word_tokenizer(folder, ["a", "red", "circle"], 8)
    cfg = clip_config(embed_dim=8, image_size=16, patch_size=8, vision_width=16, vision_layers=1, vision_heads=2,
                      text_width=16, text_layers=1, text_heads=2, vocab_size=V, context_length=8,
                      eos_token_id=V - 1, pad_token_id=0)
    ClipModel.random(cfg, seed=0).save_pretrained(folder)
    return folder


def test_embed_unwritable_out_fails_before_model_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = blocker / "emb.npy"  # a folder that is a file: nothing can be written there
    assert cli_main(["embed", str(tmp_path / "no-such-checkpoint"), "--text", "a", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "emb.npy: cannot write here" in err, err  # not the checkpoint error


def test_embed_failure_while_writing_keeps_the_old_file(clip_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "emb.npy"
    assert cli_main(["embed", str(clip_folder), "--text", "a red circle", "--out", str(out)]) == 0
    good = out.read_bytes()
    capsys.readouterr()

    def full_disk(f, arr, *a, **k):
        (f.write(b"\x93NUMPY partial") if hasattr(f, "write") else open(f, "wb").write(b"partial"))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", full_disk)
    assert cli_main(["embed", str(clip_folder), "--text", "a circle", "--text", "red", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert out.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"]  # no temporary left behind


def test_saved_encoder_checkpoint_survives_a_failed_save(clip_folder, tmp_path, monkeypatch):
    from mmfuse.encoders import ClipModel
    import mmfuse.weight_map as weights
    model = ClipModel.from_pretrained(clip_folder)
    folder = tmp_path / "ck"
    model.save_pretrained(folder)
    good = (folder / "model.safetensors").read_bytes()
    real = weights.save_file

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(weights, "save_file", full_disk)
    with pytest.raises(OutputError, match="model.safetensors: write failed"):
        model.save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    monkeypatch.setattr(weights, "save_file", real)
    ClipModel.from_pretrained(folder)
