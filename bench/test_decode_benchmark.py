"""pytest-benchmark view of decode steps: `python -m pytest bench/test_decode_benchmark.py --benchmark-enable`.

One decode step of a GPT-2-124M-shaped random model (fp32, CPU), ours vs transformers with a
KV cache, same weights."""
import tempfile

import pytest
import torch

from bench_decode import hf_model
from mmfuse.decoder.generate import DecodeState
from mmfuse.decoder.loader import load_decoder


@pytest.fixture(scope="module")
def models():
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        hf = hf_model("gpt2-124m", folder).eval()
        yield hf, load_decoder(folder)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_mmfuse(benchmark, models, batch):
    _, ours = models
    state = DecodeState(ours, batch, 1024)
    state.prefill([[1] * 128] * batch)
    tok = torch.ones(batch, dtype=torch.long)

    def step():
        if state.cache.filled[0] >= 1000:
            state.cache.truncate([128] * batch)
        state.decode(tok)

    benchmark(step)


@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step_transformers(benchmark, models, batch):
    hf, _ = models
    with torch.inference_mode():
        out = hf(torch.ones(batch, 128, dtype=torch.long), use_cache=True)
    tok = torch.ones(batch, 1, dtype=torch.long)

    def step():
        with torch.inference_mode():
            hf(tok, past_key_values=out.past_key_values, use_cache=True)
            out.past_key_values.crop(-1)  # drop the token just added: every step sees 128 cached

    benchmark(step)
