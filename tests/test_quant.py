"""Weight-only quantization: kernels vs the dequantize-then-matmul reference, round-to-nearest
formats, quantized models vs float models with the dequantized weights, save/load, and GPTQ / AWQ
checkpoints written by an independent packer (from the published formats) vs transformers."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfuse.decoder.generate import Engine
from mmfuse.decoder.loader import load_decoder
from mmfuse.errors import CheckpointError, ConfigError
from mmfuse.kernels import quant_cpu
from mmfuse.kernels.quant_cpu import dequantize, pack_int4, quant_linear, quant_linear_reference, unpack_int4
from mmfuse.quant import QuantConfig, QuantizedLinear, quantize_weight
from mmfuse.quant.quantize_model import quantized_linears, save_quantized

from conftest import build_hf_decoder


def random_quant(N, K, bits, g, asym, seed):
    gen = torch.Generator().manual_seed(seed)
    G = -(-K // g)
    if bits == 8:
        q = torch.randint(-128, 128, (N, G * g), generator=gen, dtype=torch.int8)
        z = torch.randint(-128, 129, (N, G), generator=gen).to(torch.int16) if asym else None
    else:
        q = torch.randint(0, 256, (N, G * g // 2), generator=gen).to(torch.uint8)
        z = torch.randint(0, 17, (N, G), generator=gen).to(torch.uint8) if asym else None
    s = torch.rand(N, G, generator=gen) + 0.01
    return q, s, z


@pytest.mark.parametrize("bits,g,K,N", [(8, 37, 37, 29), (8, 16, 50, 33), (8, 64, 128, 7), (4, 32, 96, 41),
                                        (4, 16, 50, 19), (4, 128, 64 * 5, 9), (4, 38, 38, 3)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("asym", [False, True])
def test_kernel_matches_reference(bits, g, K, N, rows, asym):
    q, s, z = random_quant(N, K, bits, g, asym, seed=rows * 7 + K)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(N)
    ref = quant_linear_reference(x.double(), q, s.double(), z, bits, g, bias.double(), act="silu")
    out = quant_linear(x, q, s, z, bits, g, bias, act="silu")
    assert out.shape == (rows, N) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())


def test_kernel_leading_dims_bf16_and_unfused_path(monkeypatch):
    q, s, z = random_quant(23, 70, 4, 14, True, seed=3)
    x = torch.randn(2, 3, 70)
    ref = quant_linear_reference(x.double(), q, s.double(), z, 4, 14)
    torch.testing.assert_close(quant_linear(x, q, s, z, 4, 14).double(), ref, rtol=1e-5, atol=1e-4)
    out = quant_linear(x.bfloat16(), q, s, z, 4, 14)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 23)
    monkeypatch.setenv("MMFUSE_QUANT_FUSED", "0")
    monkeypatch.setattr(quant_cpu, "DEQUANT_BLOCK", 1)  # several dequantized blocks
    torch.testing.assert_close(quant_linear(x, q, s, z, 4, 14).double(), ref, rtol=1e-5, atol=1e-4)


def test_int4_packing_roundtrip_and_layout():
    v = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    p = pack_int4(v, 32)
    assert p.shape == (5, 32)
    assert torch.equal(unpack_int4(p, 32), v)
    # byte b of group t: column t*32 + b low, t*32 + 16 + b high
    assert int(p[2, 16 + 3]) == int(v[2, 32 + 3]) | (int(v[2, 32 + 16 + 3]) << 4)


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (8, -1, False), (8, 32, True), (4, 32, True),
                                            (4, 64, False), (4, 128, True), (4, -1, False)])
def test_round_to_nearest(bits, group, sym):
    w = torch.randn(37, 147, dtype=torch.float64) * torch.rand(37, 1, dtype=torch.float64)
    lin = quantize_weight(w, bits, group, sym)
    deq = lin.dequantize(torch.float64)
    g = lin.group_size
    assert deq.shape == w.shape and (group == -1 or g == group)
    # each element within half a step of its group's grid
    step = lin.scales.double().repeat_interleave(g, dim=1)[:, :147]
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    # the grid reproduces itself exactly
    again = quantize_weight(deq, bits, group, sym).dequantize(torch.float64)
    torch.testing.assert_close(again, deq, rtol=1e-6, atol=1e-7)
    # zero rows and groups stay zero
    assert (quantize_weight(torch.zeros(3, 40), bits, group, sym).dequantize() == 0).all()


def test_quant_config_parsing_and_errors():
    assert QuantConfig.parse("int4-g32-asym") == QuantConfig(bits=4, group_size=32, symmetric=False)
    assert QuantConfig.parse("int8") == QuantConfig(bits=8, group_size=-1)
    assert QuantConfig.parse("int4", group_size=64, lm_head=False) == QuantConfig(4, 64, True, False)
    assert QuantConfig.parse(None) is None
    for bad in ("int3", "int4-g7", "int4-x", "fp8"):
        with pytest.raises(ConfigError):
            QuantConfig.parse(bad)
    with pytest.raises(ConfigError):
        QuantConfig.parse(None, group_size=32)
    with pytest.raises(CheckpointError):
        QuantizedLinear(torch.zeros(4, 9, dtype=torch.uint8), torch.ones(4, 1), None, 4, 16, 16)  # 9 bytes for 16 columns


def float_twin(model, folder):
    """The float model of `folder` with every weight the quantized `model` holds replaced by its
    dequantized value (norms, biases and position tables are the checkpoint's in both)."""
    twin = load_decoder(folder)
    with torch.no_grad():
        for name, m in quantized_linears(model).items():
            target = twin.embed if name == "embed.table" else twin.get_submodule(name)
            target.weight.copy_(m.dequantize())
        if not isinstance(model.embed, torch.nn.Embedding) and model.embed.table is model.lm_head:
            assert twin.embed.weight is twin.lm_head.weight  # tied in both
    return twin


@pytest.mark.parametrize("quant", ["int8", "int4-g32", "int4-g16-asym", "int8-g16-asym"])
def test_quantized_decoder_equals_dequantized_float_model(hf_decoder, quant, tmp_path, monkeypatch):
    kind, folder, _ = hf_decoder
    monkeypatch.setenv("MMFUSE_INT8_ACTIVATIONS", "0")  # fp32 arithmetic in the fused decode step (its int8 inputs: test_fused_decode.py)
    model = load_decoder(folder, quantize=quant)
    assert isinstance(model.blocks[0].attn.qkv, QuantizedLinear) and isinstance(model.lm_head, QuantizedLinear)
    twin = float_twin(model, folder)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(13).expand(2, 13)
    with torch.inference_mode():
        ref = twin(ids, pos)
        out = model(ids, pos)
        step = model(ids[:, :1], pos[:, :1])  # the fused decode kernels (2 rows)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, ref[:, :1], rtol=1e-4, atol=1e-4)
    # greedy generation through the engine: the same tokens as the float twin
    a = Engine(model).generate([[1, 2, 3]], temperature=0.0, max_new_tokens=8, ignore_eos=True)[0].token_ids
    b = Engine(twin).generate([[1, 2, 3]], temperature=0.0, max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert a == b
    # saved folder loads back without re-quantizing: same tensors, same logits
    out_dir = save_quantized(model, tmp_path / "q", json.loads((folder / "config.json").read_text()), folder)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mmfuse"
    assert (out_dir / "tokenizer.json").is_file()
    back = load_decoder(out_dir)
    with torch.inference_mode():
        assert torch.equal(back(ids, pos), out)
    with pytest.raises(ConfigError):
        load_decoder(out_dir, quantize="int8")


def test_quantize_options_head_and_embeddings(tmp_path):
    folder = tmp_path / "llama"
    build_hf_decoder("llama", folder)  # untied head
    m = load_decoder(folder, quantize=QuantConfig(bits=8, lm_head=False, embeddings=False))
    assert isinstance(m.lm_head, torch.nn.Linear) and isinstance(m.embed, torch.nn.Embedding)
    m = load_decoder(folder, quantize=QuantConfig(bits=8, lm_head=True, embeddings=True))
    assert isinstance(m.lm_head, QuantizedLinear) and m.embed.table is not m.lm_head
    norms = [p for n, p in m.named_parameters()]
    assert all(p.dtype == torch.float32 for p in norms)  # norms stay float
    tied = tmp_path / "tied"
    build_hf_decoder("llama_tied", tied)
    m = load_decoder(tied, quantize="int4")
    assert m.embed.table is m.lm_head
    out = save_quantized(m, tmp_path / "tq", json.loads((tied / "config.json").read_text()))
    keys = load_file(str(out / "model.safetensors")).keys()
    assert "lm_head.qweight" in keys and not any(k.startswith("embed.") for k in keys)
    back = load_decoder(out)
    assert back.embed.table is back.lm_head


def test_cli_generate_and_bench_quantized(gpt2_folder):
    run = [sys.executable, "-m", "mmfuse.cli"]
    r = subprocess.run(run + ["generate", "--model", str(gpt2_folder), "--prompt", "the quick", "--max-new-tokens", "4",
                              "--temperature", "0", "--quantize", "int4", "--group-size", "32"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(run + ["bench", "--model", str(gpt2_folder), "--quantize", "int8", "--batch", "1",
                              "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "int8" in r.stdout


# ---- GPTQ / AWQ: an independent packer written from the published formats -------------------

def to_int32(a: np.ndarray) -> torch.Tensor:
    """Unsigned 32-bit words (as int64) -> int32 with two's-complement wrap, as the checkpoints store them."""
    a = a.astype(np.int64) & 0xFFFFFFFF
    return torch.from_numpy(((a + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32))


def gptq_pack(q, z, bits, v1):
    """q (K, N) ints in 0..2^bits-1 -> qweight (K*bits/32, N); z (G, N) -> qzeros (G, N*bits/32)."""
    w = 32 // bits
    K, N = q.shape
    qweight = np.zeros((K // w, N), dtype=np.int64)
    for r in range(K // w):
        for k in range(w):
            qweight[r] |= q[r * w + k].astype(np.int64) << (bits * k)
    stored = (z - 1) if v1 else z
    stored = stored & (2 ** bits - 1)
    G = z.shape[0]
    qzeros = np.zeros((G, N // w), dtype=np.int64)
    for c in range(N // w):
        for k in range(w):
            qzeros[:, c] |= stored[:, c * w + k].astype(np.int64) << (bits * k)
    return to_int32(qweight), to_int32(qzeros)


AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(q, z):
    """q (K, N), z (G, N) -> int32 (K, N/8), (G, N/8): nibble k of word c holds column 8c + ORDER[k]."""
    def pack(a):
        out = np.zeros((a.shape[0], a.shape[1] // 8), dtype=np.int64)
        for c in range(a.shape[1] // 8):
            for k in range(8):
                out[:, c] |= a[:, c * 8 + AWQ_PACK_ORDER[k]].astype(np.int64) << (4 * k)
        return to_int32(out)
    return pack(q), pack(z)


def write_quantized_hf(folder, out, method, bits, group, desc_act=False, v1=True, seed=0):
    """Rewrite a float HF Llama/Qwen2 folder as a GPTQ/AWQ checkpoint with random integer codes;
    return {HF linear name: the float weight (N, K) those codes stand for}."""
    sd = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    rng = np.random.default_rng(seed)
    new, expected, perms = {}, {}, {}
    for key, t in sd.items():
        if not (key.endswith(".weight") and "layers" in key and t.dim() == 2):
            new[key] = t
            continue
        prefix = key[: -len(".weight")]
        N, K = t.shape
        g = K if group == -1 else group
        G = -(-K // g)
        share = prefix.rsplit(".", 1)[0] + ("qkv" if prefix.endswith(("q_proj", "k_proj", "v_proj")) else
                                            "gu" if prefix.endswith(("gate_proj", "up_proj")) else prefix)
        if desc_act:  # the same act order for linears over the same input, as GPTQ computes it
            perm = perms.setdefault(share, rng.permutation(K))
            g_idx = np.empty(K, dtype=np.int64)
            g_idx[perm] = np.arange(K) // g
        else:
            g_idx = np.arange(K) // g
        top = 2 ** bits
        q = rng.integers(0, top, size=(K, N))
        z = rng.integers(1 if (method == "gptq" and v1) else 0, top, size=(G, N))  # v1 cannot store zero 0 safely
        s = (rng.random((G, N)) * 0.02 + 0.001).astype(np.float16)
        w = s.astype(np.float64)[g_idx] * (q - z[g_idx])  # (K, N)
        expected[prefix] = torch.from_numpy(w.T.copy())
        if method == "gptq":
            qweight, qzeros = gptq_pack(q, z, bits, v1)
            new[prefix + ".g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            qweight, qzeros = awq_pack(q, z)
        new[prefix + ".qweight"], new[prefix + ".qzeros"] = qweight, qzeros
        new[prefix + ".scales"] = torch.from_numpy(s)
    out.mkdir()
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"))
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": False,
              "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    return expected


def check_against_transformers(kind, hf_folder, qfolder, expected, hf_model):
    ours = load_decoder(qfolder)
    cfg = ours.cfg
    for i in range(cfg.n_layer):  # each fused module dequantizes to the independently computed weights
        a = f"model.layers.{i}.self_attn."
        m = f"model.layers.{i}.mlp."
        blk = ours.blocks[i]
        for mod, parts in ((blk.attn.qkv, [a + "q_proj", a + "k_proj", a + "v_proj"]), (blk.attn.o, [a + "o_proj"]),
                           (blk.mlp.up, [m + "gate_proj", m + "up_proj"]), (blk.mlp.down, [m + "down_proj"])):
            assert isinstance(mod, QuantizedLinear)
            torch.testing.assert_close(mod.dequantize(torch.float64), torch.cat([expected[p] for p in parts]),
                                       rtol=1e-6, atol=1e-7)
    # the transformers model with the dequantized weights gives the same logits
    with torch.no_grad():
        for name, w in expected.items():
            hf_model.get_submodule(name).weight.copy_(w.float())
        ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
        ref = hf_model(ids).logits
        out = ours(ids, torch.arange(9).expand(2, 9))
        step = ours(ids[:, :1], torch.zeros(2, 1, dtype=torch.long))
    tol = 1e-4 * ref.abs().max().item()  # random codes make large weights and logits (weights checked exactly above)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=tol)
    torch.testing.assert_close(step, ref[:, :1], rtol=1e-4, atol=tol)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("bits,group,desc_act,v1", [(4, 16, False, True), (4, 32, True, True), (8, 16, True, True),
                                                    (8, -1, False, False), (4, -1, True, False)])
def test_gptq_checkpoint(kind, bits, group, desc_act, v1, tmp_path):
    hf_folder = tmp_path / "hf"
    hf = build_hf_decoder(kind, hf_folder)
    expected = write_quantized_hf(hf_folder, tmp_path / "gptq", "gptq", bits, group, desc_act, v1)
    check_against_transformers(kind, hf_folder, tmp_path / "gptq", expected, hf)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("group", [16, 32])
def test_awq_checkpoint(kind, group, tmp_path):
    hf_folder = tmp_path / "hf"
    hf = build_hf_decoder(kind, hf_folder)
    expected = write_quantized_hf(hf_folder, tmp_path / "awq", "awq", 4, group)
    check_against_transformers(kind, hf_folder, tmp_path / "awq", expected, hf)


def _autoawq_packing_utils():
    """AutoAWQ's own unpack code, loaded by file (its package __init__ needs a GPU stack)."""
    import importlib.util

    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq)")
    path = list(spec.submodule_search_locations)[0] + "/utils/packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("awq_packing_utils", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_awq_unpack_matches_autoawq_reference(tmp_path):
    ref = _autoawq_packing_utils()
    from mmfuse.checkpoint import Checkpoint
    from mmfuse.quant.published import PublishedQuant, read_linear

    hf_folder = tmp_path / "hf"
    build_hf_decoder("qwen2", hf_folder)
    write_quantized_hf(hf_folder, tmp_path / "awq", "awq", 4, 16, seed=4)
    ck = Checkpoint(tmp_path / "awq")
    p = "model.layers.1.mlp.gate_proj"
    ours = read_linear(ck, PublishedQuant("awq", 4, 16), p, 64, 48, torch.float32).dequantize(torch.float64)
    theirs = ref.dequantize_gemm(ck.take(p + ".qweight"), ck.take(p + ".qzeros"), ck.take(p + ".scales").double(), 4, 16)
    torch.testing.assert_close(ours, theirs.t(), rtol=0, atol=0)


def test_published_config_errors(tmp_path):
    hf_folder = tmp_path / "hf"
    build_hf_decoder("llama", hf_folder)
    write_quantized_hf(hf_folder, tmp_path / "g", "gptq", 4, 16)
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    for change in ({"bits": 3}, {"checkpoint_format": "marlin"}, {"quant_method": "bitsandbytes"}, {"group_size": "x"}):
        bad = dict(cfg, quantization_config=dict(cfg["quantization_config"], **change))
        (tmp_path / "g" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError):
            load_decoder(tmp_path / "g")
    (tmp_path / "g" / "config.json").write_text(json.dumps(dict(cfg, quantization_config=dict(
        cfg["quantization_config"], group_size=32))))  # scales shape no longer matches
    with pytest.raises(CheckpointError):
        load_decoder(tmp_path / "g")
