"""The decoder against transformers on tiny random-init checkpoints (fp32)."""
import pytest
import torch

from mmfuse.decoder.generate import DecodeState, Engine
from mmfuse.decoder.loader import load_decoder

TOL = 1e-4


def _rand_ids(n, seed, vocab=300):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_prefill_and_every_decode_step_match_transformers(hf_decoder):
    kind, folder, hf = hf_decoder
    model = load_decoder(folder)
    prompt = _rand_ids(13, 0)
    steps = 20
    state = DecodeState(model, 1, len(prompt) + steps)
    ids = torch.tensor([prompt])
    # Full prefill logits: the cache-free forward of every prompt position.
    ref_all = hf(ids).logits
    ours_all = model(ids, torch.arange(len(prompt))[None])
    torch.testing.assert_close(ours_all, ref_all, atol=TOL, rtol=0)
    out = hf(ids, use_cache=True)
    past, ref = out.past_key_values, out.logits[:, -1]
    ours = state.prefill([prompt])
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)
    for _ in range(steps):
        tok = ref.argmax(-1)
        out = hf(tok[:, None], past_key_values=past, use_cache=True)
        past, ref = out.past_key_values, out.logits[:, -1]
        ours = state.decode(tok)
        torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(hf_decoder):
    kind, folder, hf = hf_decoder
    engine = Engine.from_pretrained(folder)
    prompt = _rand_ids(9, 1)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40)[0, len(prompt):]
    ours = engine.generate(prompt, temperature=0.0, max_new_tokens=40)[0]
    assert ours.token_ids == ref.tolist()
    assert ours.finish_reason == "length"


@torch.no_grad()
def test_batch_of_different_lengths_equals_one_by_one(hf_decoder):
    kind, folder, _ = hf_decoder
    engine = Engine.from_pretrained(folder)
    prompts = [_rand_ids(n, 10 + n) for n in (5, 17, 1, 11)]
    batched = engine.generate(prompts, temperature=0.0, max_new_tokens=24, logprobs=True)
    for p, b in zip(prompts, batched):
        alone = engine.generate(p, temperature=0.0, max_new_tokens=24, logprobs=True)[0]
        assert b.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)


@torch.no_grad()
def test_multi_token_verification_and_rollback(gpt2_folder):
    model = load_decoder(gpt2_folder)
    prompts = [_rand_ids(7, 3), _rand_ids(4, 4)]
    k = 5
    seq = DecodeState(model, 2, 32)
    seq.prefill(prompts)
    proposals = torch.tensor([_rand_ids(k, 5), _rand_ids(k, 6)])
    step_logits = torch.stack([seq.decode(proposals[:, i]) for i in range(k)], dim=1)  # (B, k, V)
    ver = DecodeState(model, 2, 32)
    ver.prefill(prompts)
    torch.testing.assert_close(ver.forward(proposals), step_logits, atol=TOL, rtol=0)
    # Keep 2 and 3 of the proposals, roll back the rest, then continue: same as having decoded only those.
    ver.cache.truncate([7 + 2, 4 + 3])
    nxt = torch.tensor([11, 12])
    got = ver.decode(nxt)
    ref = DecodeState(model, 2, 32)
    ref.prefill([prompts[0] + proposals[0, :2].tolist(), prompts[1] + proposals[1, :3].tolist()])
    torch.testing.assert_close(got, ref.decode(nxt), atol=TOL, rtol=0)


def test_stop_token_ends_generation(gpt2_folder):
    engine = Engine.from_pretrained(gpt2_folder)
    prompt = _rand_ids(6, 7)
    free = engine.generate(prompt, temperature=0.0, max_new_tokens=12)[0].token_ids
    stop = free[4]
    first = free.index(stop)
    out = engine.generate(prompt, temperature=0.0, max_new_tokens=12, stop_token_ids=(stop,))[0]
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"


def test_stream_equals_generate_and_stop_strings(gpt2_folder, tokenizer):
    engine = Engine.from_pretrained(gpt2_folder)
    full = engine.generate("hello world", temperature=0.0, max_new_tokens=30)[0]
    chunks = list(engine.stream("hello world", temperature=0.0, max_new_tokens=30))
    assert [c.token_id for c in chunks] == full.token_ids
    assert "".join(c.text for c in chunks) == full.text == tokenizer.decode(full.token_ids)
    assert chunks[-1].finish_reason == "length"
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    if stop:
        cut = engine.generate("hello world", temperature=0.0, max_new_tokens=30, stop_strings=(stop,))[0]
        assert cut.finish_reason == "stop"
        assert cut.text == full.text[: full.text.index(stop)]


def test_seeded_sampling_reproduces(gpt2_folder):
    engine = Engine.from_pretrained(gpt2_folder)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=16)
    a = engine.generate("the fox", seed=7, **kw)[0].token_ids
    b = engine.generate("the fox", seed=7, **kw)[0].token_ids
    c = engine.generate("the fox", seed=8, **kw)[0].token_ids
    assert a == b and a != c


def test_capacity_error_before_allocation(gpt2_folder):
    from mmfuse.errors import CapacityError

    engine = Engine.from_pretrained(gpt2_folder)  # n_positions = 96
    with pytest.raises(CapacityError, match="90 prompt \\+ 10 new tokens exceed the model's context of 96"):
        engine.generate(_rand_ids(90, 0), max_new_tokens=10)
    with pytest.raises(CapacityError, match="exceeds the model's context of 96"):
        DecodeState(engine.model, 1, 97)
    state = DecodeState(engine.model, 1, 8)
    state.prefill([_rand_ids(8, 0)])
    with pytest.raises(CapacityError, match="8 cached \\+ 1 new positions exceed the KV cache of 8"):
        state.decode(torch.tensor([1]))


def test_bf16_load_is_bf16_and_close(gpt2_folder):
    m32 = load_decoder(gpt2_folder)
    m16 = load_decoder(gpt2_folder, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    ids = torch.tensor([_rand_ids(10, 2)])
    pos = torch.arange(10)[None]
    with torch.no_grad():
        a, b = m32(ids, pos), m16(ids, pos).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_sharded_checkpoint_loads(tmp_path):
    from conftest import build_hf_decoder

    hf = build_hf_decoder("llama", tmp_path)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    model = load_decoder(tmp_path)
    ids = torch.tensor([_rand_ids(6, 9)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.arange(6)[None]), hf(ids).logits, atol=TOL, rtol=0)
