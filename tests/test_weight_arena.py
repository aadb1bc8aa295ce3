"""Weights moved into one huge-page mapping (engine/nn/weight_arena.py): same objects, same values,
still trainable, still tied; decoding from them gives the same logits."""
import copy
import gc
import re

import pytest
import torch

from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.generate import DecodeState, Engine
from mmfuse.decoder.loader import load_decoder
from mmfuse.decoder.transformer import Decoder
from mmfuse.nn import weight_arena
from mmfuse.nn.weight_arena import relocate
from mmfuse.quant import QuantConfig
from mmfuse.quant.quantize_model import quantize_decoder

# odd widths; 4.4 MB of fp32 weights, above MIN_BYTES
CFG = DecoderConfig(vocab_size=3001, n_layer=3, n_head=5, n_kv_head=5, d_model=155, head_dim=31, d_ff=333,
                    max_seq_len=64, tie_embeddings=True)


def forward(model, x):
    return model(x, torch.arange(x.shape[1]).expand(x.shape[0], -1))


def tensors(model):
    return [t for m in model.modules() for t in list(m._parameters.values()) + list(m._buffers.values())
            if t is not None]


def vma_of(address: int) -> dict:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
            elif inside and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
    return fields


def test_same_parameters_same_values_one_mapping():
    model = Decoder.random(CFG, seed=3)
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items()}
    x = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        ref = forward(model, x)
    moved = relocate(model)
    assert moved >= sum(v.numel() * 4 for v in values.values())
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    assert model.lm_head.weight is model.embed.weight  # still tied
    for k, p in params.items():
        assert torch.equal(p, values[k]), k
    ptrs = sorted(t.data_ptr() for t in tensors(model))
    assert ptrs[-1] - ptrs[0] < moved  # every tensor inside the one mapping
    assert all(p % weight_arena.ALIGN == 0 for p in ptrs)
    with torch.no_grad():
        assert torch.equal(forward(model, x), ref)
    assert relocate(model) == 0  # once only


def test_saves_and_loads_back(tmp_path):
    model = Decoder.random(CFG, seed=8)
    relocate(model)
    model.save_pretrained(tmp_path / "m")
    back = load_decoder(tmp_path / "m")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


def test_outlives_the_mapping_object_trains_and_copies():
    model = Decoder.random(CFG, seed=4)
    relocate(model)
    gc.collect()  # the tensors keep the mapping alive
    before = model.blocks[0].mlp.up.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = forward(model, torch.randint(0, CFG.vocab_size, (1, 7))).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(model.blocks[0].mlp.up.weight, before)  # updated in place, in the mapping
    clone = copy.deepcopy(model)
    assert torch.equal(clone.blocks[0].mlp.up.weight, model.blocks[0].mlp.up.weight)


def test_small_models_and_switched_off_stay(monkeypatch):
    tiny = Decoder.random(DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=16, head_dim=8,
                                        d_ff=20, max_seq_len=16), seed=0)
    ptr = tiny.embed.weight.data_ptr()
    assert relocate(tiny) == 0 and tiny.embed.weight.data_ptr() == ptr
    model = Decoder.random(CFG, seed=5)
    ptr = model.embed.weight.data_ptr()
    monkeypatch.setenv("MMFUSE_HUGE_PAGES", "0")
    assert relocate(model) == 0 and model.embed.weight.data_ptr() == ptr


def test_decoding_relocates_once_and_matches(monkeypatch):
    """DecodeState moves a model's weights before its first step; greedy tokens and logits are those of
    the model where it was (fused step and per-op path alike), quantized models included."""
    monkeypatch.setattr(weight_arena, "MIN_BYTES", 0)  # the int4 model is smaller
    for quantize in (None, "int4-g32"):
        for fused in ("1", "0"):
            monkeypatch.setenv("MMFUSE_FUSED_DECODE", fused)
            ref_model = Decoder.random(CFG, seed=6)
            if quantize:
                quantize_decoder(ref_model, QuantConfig.parse(quantize))
            model = copy.deepcopy(ref_model)
            monkeypatch.setenv("MMFUSE_HUGE_PAGES", "0")
            ref = Engine(ref_model).generate([[5, 7, 11, 13]], max_new_tokens=12, temperature=0.0, ignore_eos=True,
                                             logprobs=True)
            monkeypatch.setenv("MMFUSE_HUGE_PAGES", "1")
            ptr = model.blocks[1].attn.qkv.weight.data_ptr() if not quantize else model.blocks[1].attn.qkv.qweight.data_ptr()
            got = Engine(model).generate([[5, 7, 11, 13]], max_new_tokens=12, temperature=0.0, ignore_eos=True,
                                         logprobs=True)
            moved = (model.blocks[1].attn.qkv.weight if not quantize else model.blocks[1].attn.qkv.qweight).data_ptr()
            assert moved != ptr
            assert got[0].token_ids == ref[0].token_ids
            assert got[0].logprobs == pytest.approx(ref[0].logprobs, abs=1e-5)
            DecodeState(model, 1, 32)
            assert (model.blocks[1].attn.qkv.weight if not quantize else model.blocks[1].attn.qkv.qweight).data_ptr() == moved


def test_huge_pages_where_the_kernel_gives_them():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are switched off (never)")
    model = Decoder.random(CFG, seed=7)
    relocate(model)
    kb = int(vma_of(model.embed.weight.data_ptr()).get("AnonHugePages", "0 kB").split()[0])
    assert kb >= 2048  # at least the first huge page of the mapping
