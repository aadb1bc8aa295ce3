"""Decoder.save_pretrained: folders transformers loads with identical logits, and mmfuse reloads."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import VOCAB, build_hf_decoder
from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.loader import load_decoder
from mmfuse.decoder.transformer import Decoder
from mmfuse.errors import ConfigError

# Odd shapes beyond the shared specs: an untied GPT-2 with its own MLP width, a Llama with an MLP bias.
ODD_SPECS = {
    "gpt2_untied": ("gpt2", dict(n_layer=3, n_embd=40, n_head=5, n_inner=72, n_positions=64,
                                 tie_word_embeddings=False, activation_function="relu",
                                 initializer_range=0.2)),
    "llama_mlp_bias": ("llama", dict(num_hidden_layers=2, hidden_size=36, num_attention_heads=6,
                                     num_key_value_heads=3, head_dim=10, intermediate_size=52,
                                     max_position_embeddings=64, mlp_bias=True, attention_bias=False,
                                     rope_theta=5000.0, initializer_range=0.2)),
}


def _ids(n, seed):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _round_trip(folder, hf, tmp_path):
    import transformers

    model = load_decoder(folder)
    out = model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # Tensor for tensor what transformers itself saved (tied heads left out, as it does).
    theirs, ours = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    theirs = {k: v for k, v in theirs.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids(11, 3)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    back = load_decoder(out)
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    pos = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        assert torch.equal(back(ids, pos), model(ids, pos))
        torch.testing.assert_close(model(ids, pos), hf(ids).logits, atol=1e-4, rtol=0)
    return out


def test_save_pretrained_round_trips_through_transformers(hf_decoder, tmp_path):
    kind, folder, hf = hf_decoder
    _round_trip(folder, hf, tmp_path)


@pytest.mark.parametrize("kind", sorted(ODD_SPECS))
def test_save_pretrained_odd_shapes(kind, tmp_path):
    folder = tmp_path / "hf"
    hf = build_hf_decoder(kind, folder, spec=ODD_SPECS[kind])
    _round_trip(folder, hf, tmp_path)


def test_save_pretrained_of_a_random_model_loads_in_transformers(tmp_path):
    """A model mmfuse made (no config.json behind it): Qwen2-shaped, llama3-scaled RoPE, bf16."""
    import transformers

    cfg = DecoderConfig(vocab_size=97, n_layer=2, n_head=6, n_kv_head=2, d_model=42, head_dim=8, d_ff=50,
                        max_seq_len=80, family="llama", norm="rmsnorm", act="silu", gated_mlp=True,
                        learned_pos=False, rope_theta=777.0, qkv_bias=True, o_bias=False, mlp_bias=False,
                        tie_embeddings=True, eos_token_ids=(3, 5),
                        rope_scaling={"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = Decoder.random(cfg, dtype=torch.bfloat16, seed=7)
    out = model.save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.config.eos_token_id == [3, 5]
    back = load_decoder(out)
    assert back.embed.weight.dtype == torch.bfloat16 and back.cfg == cfg
    f32 = load_decoder(out, dtype="fp32")
    ids = torch.randint(0, 97, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(f32(ids, torch.arange(23)[None]), hf(ids).logits, atol=1e-4, rtol=0)


def test_save_pretrained_refuses_what_a_config_cannot_describe(tmp_path):
    odd = DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, d_model=8, head_dim=4, d_ff=8,
                        max_seq_len=16, family="llama", norm="rmsnorm", act="silu", gated_mlp=True,
                        learned_pos=False, qkv_bias=False, o_bias=True)
    with pytest.raises(ConfigError, match="o_bias"):
        Decoder.random(odd).save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_save_pretrained_refuses_quantized_models(gpt2_folder, tmp_path):
    model = load_decoder(gpt2_folder, quantize="int8")
    with pytest.raises(ConfigError, match="save_quantized"):
        model.save_pretrained(tmp_path / "q")


def test_a_failed_save_leaves_the_previous_checkpoint(gpt2_folder, tmp_path, monkeypatch):
    import errno

    import mmfuse.weight_map as weight_map
    from mmfuse.errors import OutputError

    model = load_decoder(gpt2_folder)
    folder = model.save_pretrained(tmp_path / "ck")
    good = (folder / "model.safetensors").read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(weight_map, "save_file", full_disk)
    with pytest.raises(OutputError, match="model.safetensors: write failed"):
        model.save_pretrained(folder)
    assert (folder / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
