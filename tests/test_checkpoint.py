"""Bad checkpoints and configs raise the documented typed errors, naming the file and key."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmfuse.cli import main as cli_main
from mmfuse.decoder.config import DecoderConfig
from mmfuse.errors import CheckpointError, ConfigError
from mmfuse.hf_config import IgnoredFieldsWarning
from mmfuse.decoder.loader import load_decoder


@pytest.fixture
def ckpt(gpt2_folder, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(gpt2_folder, folder)
    return folder


def _edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_names_key(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        load_decoder(ckpt)


def test_wrong_shape_names_file_key_and_shapes(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("transformer.h.0.attn.c_attn.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'transformer\.h\.0\.attn\.c_attn\.bias' "
                                              r"has shape \(7,\), expected \(192,\)"):
        load_decoder(ckpt)


def test_unexpected_tensor_is_reported(ckpt):
    _edit_tensors(ckpt, lambda t: t.__setitem__("transformer.h.9.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): 'transformer\.h\.9\.extra\.weight'"):
        load_decoder(ckpt)


def test_truncated_safetensors(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: (truncated|cannot read)"):
        load_decoder(ckpt)


def test_garbage_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_decoder(ckpt)


def test_pickled_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickled weights are not loaded"):
        load_decoder(ckpt)


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, lambda c: c.__setitem__("model_type", "mamba"))
    with pytest.raises(ConfigError, match=r"config\.json: unknown or unsupported model_type 'mamba'"):
        load_decoder(ckpt)


def test_unknown_field_is_ignored_with_a_warning(ckpt):
    _edit_config(ckpt, lambda c: c.__setitem__("use_magic", True))
    with pytest.warns(IgnoredFieldsWarning, match=r"ignoring field\(s\) that do not change the computation: \['use_magic'\]"):
        load_decoder(ckpt)


def test_field_that_changes_the_computation_is_named(ckpt):
    _edit_config(ckpt, lambda c: c.__setitem__("attn_logit_softcapping", 50.0))
    with pytest.raises(ConfigError, match=r"config\.json: attn_logit_softcapping=50\.0 changes what the model computes"):
        load_decoder(ckpt)


def test_malformed_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_decoder(ckpt)


@pytest.mark.parametrize("rope, err", [({"rope_type": "yarn", "factor": 2.0}, "unsupported rope_type 'yarn'"),
                                       ({"rope_type": "llama3", "factor": 8.0}, "needs field 'low_freq_factor'")])
def test_unsupported_rope(rope, err):
    cfg = dict(model_type="llama", vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
               intermediate_size=16, rope_scaling=rope)
    with pytest.raises(ConfigError, match=err):
        from mmfuse.decoder.transformer import Decoder
        Decoder(DecoderConfig.from_hf(cfg))


def test_cli_info_and_generate(gpt2_folder, capsys):
    assert cli_main(["info", "--model", str(gpt2_folder)]) == 0
    out = capsys.readouterr().out
    n_params = sum(v.numel() for k, v in load_file(gpt2_folder / "model.safetensors").items())
    assert f"{n_params:,}" in out
    assert "KV cache:      1,024 bytes per token" in out  # 2 (k, v) * 2 layers * 4 heads * 16 dims * 4 bytes
    assert cli_main(["generate", "--model", str(gpt2_folder), "--prompt", "hello", "--temperature", "0",
                     "--max-new-tokens", "5", "--stream"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_cli_reports_bad_checkpoint(tmp_path, capsys):
    assert cli_main(["info", "--model", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
