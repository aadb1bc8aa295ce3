"""Shared test set-up: Triton runs in its CPU interpreter; tiny random-init Hugging Face decoder
checkpoints (with a trained byte-level BPE tokenizer) are built once per session."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

# `python -m pytest` puts the repository root on sys.path, where our top-level kernels/ folder would
# shadow Hugging Face's `kernels` distribution that transformers imports (mmfuse.kernels is found
# through the editable install, not through the root).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(_ROOT)]

import pytest
import torch

# Tiny decoders covering every family feature the engine supports.
DECODER_SPECS = {
    "gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, n_positions=96, initializer_range=0.2)),
    # GQA 4:1, llama3 RoPE scaling, untied head, q/k/v/o bias.
    "llama": ("llama", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                            intermediate_size=96, max_position_embeddings=96, attention_bias=True,
                            tie_word_embeddings=False, initializer_range=0.2,
                            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # tied head, linear RoPE scaling, GQA 2:1, no bias.
    "llama_tied": ("llama", dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=80, max_position_embeddings=96, tie_word_embeddings=True,
                                 initializer_range=0.2, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # Qwen2: q/k/v bias, no o bias, GQA 3:1, head_dim from hidden/heads.
    "qwen2": ("qwen2", dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=96, tie_word_embeddings=False,
                            initializer_range=0.2)),
}
VOCAB = 300


def make_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE trained on generated text (multi-byte UTF-8 included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = "the quick brown fox jumps over a lazy dog naïve café 日本語 hello world".split()
    g = torch.Generator().manual_seed(0)
    text = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist()) for _ in range(200)]
    tok.train_from_iterator(text, trainer)
    return tok


def build_hf_decoder(kind: str, folder, tokenizer=None, spec=None):
    """Save a random-init transformers model of `kind` (or of `spec`, a (model_type, kwargs) pair
    like DECODER_SPECS' entries) as a checkpoint folder; return the HF model."""
    import transformers

    model_type, kw = DECODER_SPECS[kind] if spec is None else spec
    cls_cfg = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig,
               "qwen2": transformers.Qwen2Config}[model_type]
    cls_lm = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
              "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    cfg = cls_cfg(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    torch.manual_seed(1234)
    model = cls_lm(cfg).eval()
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=sorted(DECODER_SPECS))
def hf_decoder(request, tmp_path_factory, tokenizer):
    """(kind, folder, transformers model) for each tiny decoder."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build_hf_decoder(request.param, folder, tokenizer)


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("gpt2_single")
    build_hf_decoder("gpt2", folder, tokenizer)
    return folder
