"""The fused CPU decode step (mmfuse._decode, engine/decoder/fused_step.py) against the PyTorch
decode step: float64 references, random-init odd-shaped GPT-2 / Llama / Qwen2 models, fp32, bf16,
int8 and int4 weights, rows of different lengths, poisoned outputs and caches, greedy sequences, and
the fallbacks (switched off, unsupported models); then several tokens per cache row (verification,
short prefills, speculative decoding) against the per-op multi-token forward."""
import pytest
import torch

from mmfuse.decoder import generate
from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.fused_step import FusedStep
from mmfuse.decoder.generate import DecodeState, Engine
from mmfuse.errors import CapacityError
from mmfuse.decoder.transformer import Decoder
from mmfuse.kernels.quant_cpu import dequantize
from mmfuse.quant import QuantConfig, QuantizedLinear, quantize_weight
from mmfuse.quant.quantize_model import quantize_decoder

_decode = pytest.importorskip("mmfuse._decode", reason="mmfuse was built without its C++ extension")

LLAMA = dict(family="llama", norm="rmsnorm", act="silu", gated_mlp=True, learned_pos=False, norm_eps=1e-5)
CONFIGS = {
    "gpt2": DecoderConfig(vocab_size=101, n_layer=3, n_head=3, n_kv_head=3, d_model=48, head_dim=16, d_ff=70,
                          max_seq_len=64),
    "gpt2_gelu": DecoderConfig(vocab_size=67, n_layer=2, n_head=2, n_kv_head=2, d_model=38, head_dim=19, d_ff=45,
                               max_seq_len=64, act="gelu", tie_embeddings=False),
    # GQA 3:1, llama3 RoPE scaling, q/k/v/o and MLP bias, odd widths
    "llama": DecoderConfig(vocab_size=97, n_layer=2, n_head=6, n_kv_head=2, d_model=60, head_dim=10, d_ff=77,
                           max_seq_len=64, qkv_bias=True, o_bias=True, mlp_bias=True, tie_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **LLAMA),
    # Qwen2: q/k/v bias only, tied head, linear RoPE scaling, head_dim != d_model / n_head
    "qwen2": DecoderConfig(vocab_size=89, n_layer=3, n_head=4, n_kv_head=2, d_model=40, head_dim=14, d_ff=52,
                           max_seq_len=64, qkv_bias=True, o_bias=False, mlp_bias=False, tie_embeddings=True,
                           rope_theta=1000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}, **LLAMA),
    # head_dim 64 (the AVX-512 attention kernel's sizes), GQA 3:1, tied head
    "gqa64": DecoderConfig(vocab_size=83, n_layer=2, n_head=3, n_kv_head=1, d_model=70, head_dim=64, d_ff=58,
                           max_seq_len=64, tie_embeddings=True, **LLAMA),
}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]


def random_model(name: str, seed: int = 0) -> Decoder:
    """Random weights with non-trivial norms and biases (init_weights leaves them 1 and 0)."""
    model = Decoder.random(CONFIGS[name], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if p.abs().sum() == p.numel() else
                        0.1 * torch.randn(p.shape, generator=g))
    return model


def run(model, prompts, steps, fused: bool, monkeypatch, poison: bool = False):
    """Prefill, then `steps` greedy decode steps through `DecodeState.decode`; logits per step and the cache."""
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1" if fused else "0")
    state = DecodeState(model, len(prompts), 40)
    logits = state.prefill(prompts)
    if poison:  # positions past each row's length: an attention that reads them turns NaN
        for b, n in enumerate(state.cache.filled):
            state.cache.k[:, b, :, n:] = float("nan")
            state.cache.v[:, b, :, n:] = float("nan")
    out = []
    tok = logits.argmax(-1)
    for _ in range(steps):
        logits = state.decode(tok)
        out.append(logits.clone())
        tok = logits.argmax(-1)
    return out, state


def assert_close(a, b, rel):
    assert torch.isfinite(a).all()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rel * b.abs().max().item(), f"max error {err:.3g} vs max |ref| {b.abs().max().item():.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_matches_float64_reference(name, batch, monkeypatch):
    model = random_model(name)
    prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[2:]
    got, state = run(model, prompts, 6, True, monkeypatch, poison=True)
    assert state._fused[True] is not None  # the fused step ran
    ref, ref_state = run(random_model(name).double(), prompts, 6, False, monkeypatch)  # the same weights
    for a, b in zip(got, ref):
        assert_close(a, b, 2e-5)
    assert state.cache.filled == ref_state.cache.filled
    for b, n in enumerate(state.cache.filled):  # past n: the poison
        assert_close(state.cache.k[:, b, :, :n], ref_state.cache.k[:, b, :, :n], 2e-5)
        assert_close(state.cache.v[:, b, :, :n], ref_state.cache.v[:, b, :, :n], 2e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_and_greedy_sequences_match_torch(threads, monkeypatch):
    """Several threads split every op; greedy tokens equal the PyTorch path's."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in ("gpt2", "qwen2"):
            model = random_model(name, seed=threads)
            got, _ = run(model, PROMPTS, 20, True, monkeypatch)
            ref, _ = run(model, PROMPTS, 20, False, monkeypatch)
            assert [g.argmax(-1).tolist() for g in got] == [r.argmax(-1).tolist() for r in ref]
            for a, b in zip(got, ref):
                assert_close(a, b, 1e-4)
    finally:
        torch.set_num_threads(before)


def test_inactive_rows_and_poisoned_output(monkeypatch):
    """Rows that do not advance are rewritten in place; every logit is written."""
    model = random_model("llama")
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
    state = DecodeState(model, 3, 40)
    state.prefill(PROMPTS)
    ref = DecodeState(model, 3, 40)
    ref.prefill(PROMPTS)
    for active in ([True, False, True], [False, True, True], [True, True, True]):
        tok = torch.tensor([7, 11, 13])
        monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
        a = state.decode(tok, torch.tensor(active))
        monkeypatch.setenv("MMFUSE_FUSED_DECODE", "0")
        b = ref.decode(tok, torch.tensor(active))
        assert_close(a, b, 1e-5)
        assert state.cache.filled == ref.cache.filled
    fused = state._fused[True]
    out = torch.full((3, model.cfg.vocab_size), float("nan"))
    fused(torch.tensor([1, 2, 3]), state.cache, model.rope_cos, model.rope_sin, out=out)
    assert torch.isfinite(out).all()


def quantized(name: str, spec: str) -> Decoder:
    return quantize_decoder(random_model(name), QuantConfig.parse(spec))


QUANT = ["int8", "int8-asym", "int8-g32", "int8-g34", "int4-g32", "int4-g64-asym", "int4-g128", "int4-g6-asym",
         "int4-g32-asym"]


@pytest.mark.parametrize("spec", QUANT)
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_quantized_fp32_arithmetic_matches_torch(name, spec, monkeypatch):
    """MMFUSE_INT8_ACTIVATIONS=0: dequantized in registers, the same numbers as the PyTorch path."""
    monkeypatch.setenv("MMFUSE_INT8_ACTIVATIONS", "0")
    model = quantized(name, spec)
    got, state = run(model, PROMPTS, 4, True, monkeypatch, poison=True)
    assert state._fused[False] is not None and state._fused[False].integer_layers == 0
    ref, _ = run(model, PROMPTS, 4, False, monkeypatch)
    for a, b in zip(got, ref):
        assert_close(a, b, 1e-4)


@pytest.mark.parametrize("spec", QUANT)
def test_quantized_int8_activations_stay_close(spec, monkeypatch):
    """Integer dot products where they fit (groups of 32 / multiples of 64): the activation's int8
    rounding costs well under 3% of the logits' scale."""
    model = quantized("llama", spec)
    got, state = run(model, PROMPTS, 4, True, monkeypatch)
    fits = spec.split("-")[1] not in ("g34", "g6") if "-g" in spec else True
    expect = 4 * model.cfg.n_layer + 1 if fits and _decode.has_vnni() else 0
    assert state._fused[True].integer_layers == expect
    ref, _ = run(model, PROMPTS, 4, False, monkeypatch)
    for a, b in zip(got, ref):
        assert_close(a, b, 3e-2)


def quantize_activation_blocks(x: torch.Tensor) -> torch.Tensor:
    """The reference of the integer kernels' input: int8 per block of 32 columns, scale max|x| / 127."""
    rows, k = x.shape
    xp = torch.nn.functional.pad(x.double(), (0, -k % 32)).view(rows, -1, 32)
    d = xp.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xp / torch.where(d > 0, d, 1)), 0)
    return (q * d).view(rows, -1)[:, :k]


@pytest.mark.parametrize("bits,g,K,N,asym", [(8, -1, 100, 37, False), (8, -1, 96, 5, True), (8, 64, 192, 9, True),
                                            (4, 32, 96, 41, False), (4, 32, 224, 7, True), (4, 128, 256, 13, True),
                                            (4, 64, 70, 6, False), (4, 32, 576, 9, False), (4, 32, 40, 3, True),
                                            (4, 256, 512, 5, True), (4, 192, 384, 5, False)])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_integer_kernels_match_block_quantized_reference(bits, g, K, N, asym, rows):
    """One layer: the integer kernel equals dequantized weights times the block-quantized input."""
    gen = torch.Generator().manual_seed(K + rows)
    lin = quantize_weight(torch.randn(N, K, generator=gen), bits, g, symmetric=not asym)
    Kp = lin.scales.shape[1] * lin.group_size
    x = torch.randn(rows, K, generator=gen) * torch.linspace(0.1, 3, K)
    xp = torch.nn.functional.pad(x, (0, Kp - K)).contiguous()
    y = torch.full((rows, N), float("nan"))
    spec = (bits, lin.qweight.data_ptr(), lin.scales.data_ptr(), 0 if lin.zeros is None else lin.zeros.data_ptr(), 0,
            N, K, lin.group_size, lin.scales.shape[1])
    used = _decode.linear(spec, xp.data_ptr(), Kp, rows, y.data_ptr(), True)
    assert used == _decode.has_vnni()
    w = dequantize(lin.qweight, lin.scales, lin.zeros, bits, lin.group_size, K, torch.float64)
    ref = (quantize_activation_blocks(x) if used else x.double()) @ w.T
    assert_close(y, ref, 1e-5)
    exact = torch.empty(rows, N)
    assert not _decode.linear(spec, xp.data_ptr(), Kp, rows, exact.data_ptr(), False)
    assert_close(exact, x.double() @ w.T, 1e-5)


def test_switched_off_and_unsupported_models_fall_back(monkeypatch):
    model = random_model("gpt2")
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "0")
    state = DecodeState(model, 1, 20)
    state.prefill([[1, 2]])
    monkeypatch.setattr(FusedStep, "__call__", lambda *a, **k: pytest.fail("fused step called while switched off"))
    state.decode(torch.tensor([3]))
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
    monkeypatch.setenv("MMFUSE_ATTENTION", "sdpa")  # a backend chosen by name: attention runs through it
    state.decode(torch.tensor([3]))
    assert state._fused == {}
    monkeypatch.undo()
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "bogus")
    with pytest.raises(Exception, match="MMFUSE_FUSED_DECODE"):
        state.decode(torch.tensor([3]))

    fp16 = random_model("llama").to(torch.float16)
    assert "float16" in FusedStep.unsupported(fp16)
    # GPTQ's activation order: a gather before the layer, which the fused step does not do
    ordered = random_model("qwen2")
    lin = ordered.blocks[1].mlp.down
    q = quantize_weight(lin.weight, 4, 26)
    ordered.blocks[1].mlp.down = QuantizedLinear(q.qweight, q.scales, q.zeros, 4, 26, lin.in_features,
                                                 in_perm=torch.randperm(lin.in_features))
    assert "desc_act" in FusedStep.unsupported(ordered)
    for m in (fp16, ordered):
        monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
        state = DecodeState(m, 2, 20)
        state.prefill(PROMPTS[:2])
        logits = state.decode(torch.tensor([1, 2]))
        assert state._fused[True] is None and torch.isfinite(logits.float()).all()
    assert FusedStep.unsupported(random_model("gpt2")) is None


def test_engine_greedy_generation_unchanged(gpt2_folder, monkeypatch):
    """Through `Engine.generate` on a checkpoint: the same completions with the fused step on and off."""
    eng = Engine.from_pretrained(gpt2_folder)
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MMFUSE_FUSED_DECODE", flag)
        out[flag] = [c.token_ids for c in eng.generate(["hello world", "the lazy dog"], max_new_tokens=12,
                                                       temperature=0.0, ignore_eos=True)]
    assert out["1"] == out["0"] and len(out["1"][0]) == 12


# ---- several tokens per cache row: verification (`DecodeState.forward`) and short prefills


def verify_run(model, fused: bool, monkeypatch, max_len: int = 40, poison: bool = False):
    """Prefill PROMPTS (rows at lengths 7, 2, 11), then `forward` k tokens per row for k = 3, 1, 4,
    rolling rows back by different amounts in between: logits per call and the state."""
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1" if fused else "0")
    monkeypatch.setattr(generate, "FUSED_MAX_ROWS", 10**6)  # every size through the fused step
    state = DecodeState(model, 3, max_len)
    state.prefill(PROMPTS)
    if poison:
        poison_cache(state)
    g = torch.Generator().manual_seed(5)
    out = []
    for k, back in ((3, [1, 0, 2]), (1, [0, 0, 0]), (4, [2, 1, 0])):
        out.append(state.forward(torch.randint(0, model.cfg.vocab_size, (3, k), generator=g)).clone())
        state.cache.truncate([n - b for n, b in zip(state.cache.filled, back)])
    return out, state


def poison_cache(state):
    """NaN past each row's length: an attention that reads a position it should not turns NaN."""
    for b, n in enumerate(state.cache.filled):
        state.cache.k[:, b, :, n:] = float("nan")
        state.cache.v[:, b, :, n:] = float("nan")


def assert_same_cache(state, ref, rel):
    assert state.cache.filled == ref.cache.filled
    for b, n in enumerate(state.cache.filled):
        assert_close(state.cache.k[:, b, :, :n], ref.cache.k[:, b, :, :n], rel)
        assert_close(state.cache.v[:, b, :, :n], ref.cache.v[:, b, :, :n], rel)


@pytest.fixture
def count_rows(monkeypatch):
    """How many fused calls of several rows per cache row ran."""
    calls = []
    run = FusedStep._run
    monkeypatch.setattr(FusedStep, "_run", lambda self, tok, crow, *a: calls.append(len(set(crow.tolist())) <
                                                                                     len(tok)) or run(self, tok, crow, *a))
    return calls


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("threads", [1, 3])
def test_multi_token_forward_matches_float64_reference(name, threads, monkeypatch, count_rows):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, state = verify_run(random_model(name), True, monkeypatch, poison=True)
    finally:
        torch.set_num_threads(before)
    assert count_rows == [True, True, False, True]  # the prefill, k = 3, 1 (one row per cache row), 4
    ref, ref_state = verify_run(random_model(name).double(), False, monkeypatch)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert_close(a, b, 2e-5)
    assert_same_cache(state, ref_state, 2e-5)


@pytest.mark.parametrize("spec", ["int8-asym", "int8-g34", "int4-g32", "int4-g6-asym", "int4-g128"])
@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_multi_token_forward_quantized(name, spec, monkeypatch):
    """fp32 arithmetic: the PyTorch path's numbers; integer dot products: within their rounding."""
    model = quantized(name, spec)
    ref, ref_state = verify_run(model, False, monkeypatch)
    for int_dots, rel in (("0", 1e-4), ("1", 3e-2)):
        monkeypatch.setenv("MMFUSE_INT8_ACTIVATIONS", int_dots)
        got, state = verify_run(model, True, monkeypatch, poison=True)
        assert state._fused[int_dots == "1"] is not None
        for a, b in zip(got, ref):
            assert_close(a, b, rel)
        assert_same_cache(state, ref_state, rel)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_verify_fills_the_cache_to_capacity(name, monkeypatch, count_rows):
    """The longest row (11 cached) verifies 9 tokens into a cache of 20: every position written."""
    model = random_model(name)
    out = {}
    for fused in (True, False):
        monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1" if fused else "0")
        monkeypatch.setattr(generate, "FUSED_MAX_ROWS", 10**6)
        state = DecodeState(model, 3, 20)
        state.prefill(PROMPTS)
        tokens = torch.randint(0, model.cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
        out[fused] = state.forward(tokens), state
        assert state.cache.filled == [16, 11, 20]
        with pytest.raises(CapacityError):
            state.forward(tokens[:, :1])
    assert count_rows == [True, True]  # the prefill and the verify
    assert_close(out[True][0], out[False][0], 1e-5)
    assert_same_cache(out[True][1], out[False][1], 1e-5)


def test_rows_check_indices_and_fill_poisoned_output(monkeypatch):
    """Any order of rows and cache rows; every logit written; an index out of range is a ValueError
    before anything is written."""
    model = random_model("qwen2")
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
    state = DecodeState(model, 2, 16)
    state.prefill(PROMPTS[:2])  # lengths 7, 2
    fused = state._fused_step()
    V, cos, sin = model.cfg.vocab_size, model.rope_cos, model.rope_sin
    out = torch.full((3, V), float("nan"))
    # cache row 1 gets positions 3 and 2 (in that order: 3 attends over 2), cache row 0 position 7
    got = fused.rows(torch.tensor([4, 9, 5]), torch.tensor([1, 0, 1]), torch.tensor([3, 7, 2]), state.cache,
                     cos, sin, out=out)
    assert got is out and torch.isfinite(out).all()
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "0")
    ref = DecodeState(model, 2, 16)
    ref.prefill(PROMPTS[:2])
    ref.cache.truncate([7, 2])
    r1 = ref.forward(torch.tensor([[9, 5], [5, 4]]))  # row 0's second token is a dummy
    assert_close(out[[1, 2, 0]], torch.stack([r1[0, 0], r1[1, 0], r1[1, 1]]), 1e-5)
    # the same rows again (same positions, same cache writes), logits of rows 2 and 0 only
    some = torch.full((2, V), float("nan"))
    got = fused.rows(torch.tensor([4, 9, 5]), torch.tensor([1, 0, 1]), torch.tensor([3, 7, 2]), state.cache,
                     cos, sin, out=some, logits_index=torch.tensor([2, 0]))
    assert got is some and torch.equal(some, out[[2, 0]])
    k = state.cache.k.clone()
    for index in ([3], [-1], []):
        with pytest.raises(ValueError, match="logits row"):
            fused.rows(torch.tensor([4, 9, 5]), torch.tensor([1, 0, 1]), torch.tensor([3, 7, 2]), state.cache,
                       cos, sin, logits_index=torch.tensor(index, dtype=torch.long))
    for bad, what in (((V, 0, 7), "bad token"), ((1, 2, 7), "bad cache row"), ((1, 0, 16), "bad position"),
                      ((1, -1, 7), "bad cache row"), ((-1, 0, 7), "bad token")):
        t, c, p = (torch.tensor([1, x]) for x in bad)
        with pytest.raises(ValueError, match=what):
            fused.rows(t, c, torch.tensor([0, 0]) + p, state.cache, cos, sin)
    with pytest.raises(ValueError, match="positions"):
        fused.rows(torch.tensor([1]), torch.tensor([0, 1]), torch.tensor([3]), state.cache, cos, sin)
    assert torch.equal(state.cache.k, k)


@pytest.mark.parametrize("name", ["gpt2_gelu", "llama"])
def test_short_prefill_continuation_runs_fused(name, monkeypatch, count_rows):
    """A follow-up after a reused prefix (and a fresh short batch) through the fused step: the same
    logits and cache as the padded PyTorch prefill."""
    model = random_model(name)
    got = {}
    for fused in (True, False):
        monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1" if fused else "0")
        state = DecodeState(model, 2, 30)
        first = state.prefill([[4, 8, 15], [16, 23]])
        follow = state.prefill([[42, 4, 2], [7]], start=[3, 1])  # row 1 overwrites its last position
        got[fused] = first, follow, state
    assert count_rows == [True, True]
    for a, b in zip(got[True][:2], got[False][:2]):
        assert_close(a, b, 1e-5)
    assert_same_cache(got[True][2], got[False][2], 1e-5)


def test_large_multi_token_calls_use_torch(monkeypatch, count_rows):
    """Past FUSED_MAX_ROWS tokens the per-op path's matrix products are faster; a prefill on a narrow
    model runs fused up to FUSED_PREFILL_NARROW_ROWS tokens."""
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
    monkeypatch.setattr(generate, "NARROW_D_MODEL", 32)  # the test model (48 wide) counts as wide
    state = DecodeState(random_model("gpt2"), 2, 64)
    state.prefill([[1] * (generate.FUSED_MAX_ROWS + 1), [2, 3]])
    state.forward(torch.ones(2, generate.FUSED_MAX_ROWS // 2 + 1, dtype=torch.long))
    assert count_rows == []
    state.forward(torch.ones(2, generate.FUSED_MAX_ROWS // 2, dtype=torch.long))
    assert count_rows == [True]
    monkeypatch.setattr(generate, "NARROW_D_MODEL", 48)  # now narrow
    narrow = DecodeState(random_model("gpt2"), 2, 64)
    narrow.prefill([[1] * (generate.FUSED_PREFILL_NARROW_ROWS - 2), [2, 3]])
    assert count_rows == [True, True]
    narrow.prefill([[1] * (generate.FUSED_PREFILL_NARROW_ROWS - 1), [2, 3]])
    assert count_rows == [True, True]


class _Oracle:
    """Drafts the true greedy continuation with every third token wrong: accepts and rejections."""

    def __init__(self, truth, prompt_len, vocab):
        self.truth, self.prompt_len, self.vocab = truth, prompt_len, vocab

    def propose(self, context, k):
        n = len(context) - self.prompt_len
        return [(t + 1) % self.vocab if (n + i) % 3 == 2 else t for i, t in enumerate(self.truth[n: n + k])]


@pytest.mark.parametrize("spec", [None, "int4-g32"])
def test_speculative_generate_identical_with_fused_verify(spec, monkeypatch, count_rows):
    from mmfuse.decoder.speculative import speculative_generate

    monkeypatch.setattr(generate, "NARROW_D_MODEL", 0)  # prompts through the per-op path: count verifications only
    model = random_model("qwen2") if spec is None else quantized("qwen2", spec)
    engine = Engine(model)
    prompt = PROMPTS[2]
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "0")
    plain = engine.generate(prompt, temperature=0.0, max_new_tokens=30, ignore_eos=True)[0].token_ids
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
    fused_plain = engine.generate(prompt, temperature=0.0, max_new_tokens=30, ignore_eos=True)[0].token_ids
    spec_out, stats = speculative_generate(engine, prompt, _Oracle(plain, len(prompt), model.cfg.vocab_size), k=5,
                                           temperature=0.0, max_new_tokens=30, ignore_eos=True)
    assert spec_out.token_ids == plain == fused_plain
    assert 0 < stats.accepted < stats.drafted and sum(count_rows) == stats.forwards


# ---- bf16 models: bf16 weights and KV cache; fp32 residual stream, bf16-rounded layer inputs (fused_step.py)

BF16_STEPS = 32


def forced(model, prompts, tokens, fused: bool, monkeypatch, poison: bool = False):
    """Prefill, then decode the given tokens (steps, B) whatever the logits say: fp64 logits per step."""
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1" if fused else "0")
    state = DecodeState(model, len(prompts), 48)
    state.prefill(prompts)
    if poison:
        for b, n in enumerate(state.cache.filled):
            state.cache.k[:, b, :, n:] = float("nan")
            state.cache.v[:, b, :, n:] = float("nan")
    return [state.decode(t).double() for t in tokens], state


def rel_error(got: list, ref: list) -> float:
    """The largest error of any step's logits, relative to that step's largest reference logit."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_closer_to_float64_than_torch_bf16(name, batch, monkeypatch):
    """Against an fp64 run of the same bf16-rounded weights, over 32 steps of fresh random tokens: the
    fused step is within 0.6% of the logits' scale and at least as close as PyTorch's bf16 path (which
    rounds every intermediate), and within 1.5% of that path. The cache it writes is bf16 and
    within one bf16 rounding (plus the path's error) of the reference's."""
    model = random_model(name).to(torch.bfloat16)
    prompts = PROMPTS[:batch] if batch > 1 else PROMPTS[2:]
    tokens = torch.randint(0, model.cfg.vocab_size, (BF16_STEPS, batch), generator=torch.Generator().manual_seed(batch))
    got, state = forced(model, prompts, tokens, True, monkeypatch, poison=True)
    assert state._fused[True] is not None and state.cache.k.dtype == torch.bfloat16
    torch_bf16, _ = forced(model, prompts, tokens, False, monkeypatch)
    ref, ref_state = forced(random_model(name).to(torch.bfloat16).double(), prompts, tokens, False, monkeypatch)
    assert all(torch.isfinite(g).all() for g in got)
    fused_err, torch_err = rel_error(got, ref), rel_error(torch_bf16, ref)
    assert fused_err <= 6e-3 and fused_err <= torch_err, (fused_err, torch_err)
    assert rel_error(got, torch_bf16) <= 1.5e-2
    start = [len(p) for p in prompts]  # what the steps wrote (the prefill's keys are PyTorch's)
    for b, n in enumerate(state.cache.filled):
        for c, r in ((state.cache.k, ref_state.cache.k), (state.cache.v, ref_state.cache.v)):
            assert_close(c[:, b, :, start[b]:n], r[:, b, :, start[b]:n], 2e-2)


def greedy(model, steps: int, fused: bool, monkeypatch):
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1" if fused else "0")
    state = DecodeState(model, len(PROMPTS), 48)
    logits, out = state.prefill(PROMPTS), []
    for _ in range(steps):
        logits = state.decode(logits.argmax(-1))
        out.append(logits.float())
    return out


@pytest.mark.parametrize("name,seed", [("gpt2", 0), ("llama", 2), ("qwen2", 2)])
def test_bf16_greedy_tokens_match_torch_bf16(name, seed, monkeypatch):
    """Free-running greedy decoding, 32 steps, 3 rows: the same tokens as PyTorch's bf16 path, on
    models whose top-2 logit margins stay well above the two paths' difference (checked, so a
    token flip here is a bug, not a near tie)."""
    model = random_model(name, seed=seed).to(torch.bfloat16)
    got, ref = greedy(model, BF16_STEPS, True, monkeypatch), greedy(model, BF16_STEPS, False, monkeypatch)
    for step, (a, b) in enumerate(zip(got, ref)):
        margin = b.topk(2, -1).values.diff(dim=-1).abs().min().item()
        assert margin > 0.05 * b.abs().max().item(), f"step {step}: a near tie (margin {margin:.3g}), pick another seed"
        assert a.argmax(-1).tolist() == b.argmax(-1).tolist(), f"step {step}"


def test_bf16_threads_agree_and_output_is_written(monkeypatch):
    """The numbers do not depend on how many threads share the ops; every logit of `out` is written."""
    model = random_model("llama").to(torch.bfloat16)
    tokens = torch.randint(0, model.cfg.vocab_size, (6, 3), generator=torch.Generator().manual_seed(5))
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append(forced(model, PROMPTS, tokens, True, monkeypatch))
    finally:
        torch.set_num_threads(before)
    (one, s1), (three, s3) = runs
    assert all(torch.equal(a, b) for a, b in zip(one, three))
    assert torch.equal(s1.cache.k, s3.cache.k) and torch.equal(s1.cache.v, s3.cache.v)
    out = torch.full((3, model.cfg.vocab_size), float("nan"))
    s1._fused[True](torch.tensor([1, 2, 3]), s1.cache, model.rope_cos, model.rope_sin, out=out)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="bfloat16 KV cache"):
        s1._fused[True](torch.tensor([1, 2, 3]), DecodeState(random_model("llama"), 3, 8).cache, model.rope_cos,
                        model.rope_sin)


@pytest.mark.parametrize("K,N", [(100, 37), (33, 5), (31, 3), (576, 19), (70, 64)])
@pytest.mark.parametrize("rows", [1, 3, 5, 16])
def test_bf16_kernels_match_float64_reference(K, N, rows):
    """One bf16 layer, both kernels (AVX-512 BF16 dot products where the CPU has them, and the
    conversion + FMA one): the input rounded to bf16, then exact products summed in fp32."""
    gen = torch.Generator().manual_seed(K * N + rows)
    w = torch.randn(N, K, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, K, generator=gen) * torch.linspace(0.1, 3, K)
    ref = x.to(torch.bfloat16).double() @ w.double().T
    spec = (16, w.data_ptr(), 0, 0, 0, N, K, 0, 0)
    for dots in (True, False):
        y = torch.full((rows, N), float("nan"))
        assert _decode.linear(spec, x.data_ptr(), K, rows, y.data_ptr(), dots) == (dots and _decode.has_bf16())
        assert_close(y, ref, 1e-5)


def test_bf16_input_rounding_is_torchs():
    """The layer input's rounding (shared with the cache writes) is round-to-nearest-even, as
    PyTorch's float -> bfloat16: through an identity layer (ties, the largest finite values, random)."""
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), -(1 + 3 * 2 ** -8), 3.0e38, -3.39e38])
    x = torch.cat([ties, torch.randn(57, generator=torch.Generator().manual_seed(0)) * 100])[None]
    K = x.shape[1]
    eye = torch.eye(K).to(torch.bfloat16)
    for dots in (True, False):
        y = torch.empty(1, K)
        _decode.linear((16, eye.data_ptr(), 0, 0, 0, K, K, 0, 0), x.data_ptr(), K, 1, y.data_ptr(), dots)
        assert torch.equal(y, x.to(torch.bfloat16).float())  # one nonzero product per output: exact sums


def test_engine_bf16_checkpoint_builds_the_fused_step(gpt2_folder, monkeypatch):
    """`Engine.from_pretrained(dtype="bf16")`: its decode runs the fused step on a bf16 cache, and
    its logits stay within the bf16 bound of the PyTorch path's, fed the same tokens (the same
    PyTorch prefill: the prompts are short enough to run fused on this narrow model)."""
    monkeypatch.setattr(generate, "NARROW_D_MODEL", 0)
    eng = Engine.from_pretrained(gpt2_folder, dtype="bf16")
    assert eng.model.norm_f.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, eng.cfg.vocab_size, (12, 2), generator=torch.Generator().manual_seed(3))
    got, state = forced(eng.model, PROMPTS[:2], tokens, True, monkeypatch)
    assert state._fused[True] is not None and state._fused[True].dtype == torch.bfloat16
    ref, _ = forced(eng.model, PROMPTS[:2], tokens, False, monkeypatch)
    assert rel_error(got, ref) <= 1.5e-2
    monkeypatch.setenv("MMFUSE_FUSED_DECODE", "1")
    out = eng.generate(["hello world"], max_new_tokens=8, temperature=0.0, ignore_eos=True)
    assert len(out[0].token_ids) == 8


def test_bf16_portable_kernel_agrees():
    """The whole step with the kernel of CPUs without AVX-512 BF16 (bf16 -> fp32 in registers and
    FMA): the same products summed in another order."""
    model = random_model("qwen2").to(torch.bfloat16)
    tokens = torch.randint(0, model.cfg.vocab_size, (8, 3), generator=torch.Generator().manual_seed(7))
    runs = {}
    for dots in (True, False):
        step = FusedStep.build(model, 3, bf16_dots=dots)
        state = DecodeState(model, 3, 48)
        state.prefill(PROMPTS)
        runs[dots] = []
        for t in tokens:
            runs[dots].append(step(t, state.cache, model.rope_cos, model.rope_sin).double())
            state.cache.advance(1)
    assert rel_error(runs[False], runs[True]) <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_bf16_multi_token_forward(name, monkeypatch, count_rows):
    """Several tokens per cache row (the fused prefill and verification) on a bf16 model: as the
    one-token step, at least as close to the fp64 reference as PyTorch's bf16 path, and near it."""
    model = random_model(name).to(torch.bfloat16)
    got, state = verify_run(model, True, monkeypatch, poison=True)
    assert count_rows == [True, True, False, True] and state.cache.k.dtype == torch.bfloat16
    torch_bf16, _ = verify_run(model, False, monkeypatch)
    ref, ref_state = verify_run(random_model(name).to(torch.bfloat16).double(), False, monkeypatch)
    got, torch_bf16, ref = ([t.double().flatten(0, 1) for t in run] for run in (got, torch_bf16, ref))
    assert all(torch.isfinite(g).all() for g in got)
    assert rel_error(got, ref) <= min(6e-3, rel_error(torch_bf16, ref)), (rel_error(got, ref), rel_error(torch_bf16, ref))
    assert rel_error(got, torch_bf16) <= 1.5e-2
    assert_same_cache(state, ref_state, 2e-2)
