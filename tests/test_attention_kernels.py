"""Triton attention kernels (prefill_attention, decode_attention, the "triton" backend of attention())
against a float64 reference, under the Triton interpreter on CPU.

Every temporary the launchers allocate (output, LSE, split partials) is NaN-poisoned, so an element
a kernel forgets to write fails the comparison. Shapes are small and odd so the interpreter stays
fast, while the interpreter's block sizes (prefill 32x32, decode BLOCK_N=16) still put several key
blocks, diagonal blocks and split boundaries in every case.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mmfuse.kernels import attention_dispatch  # noqa: E402
from mmfuse.kernels import attention, attention_reference, lse_reference, set_backend  # noqa: E402
from mmfuse.kernels.flash_decode import choose_num_splits, decode_attention  # noqa: E402
from mmfuse.kernels.flash_prefill import prefill_attention  # noqa: E402
from mmfuse.kernels.testing import poisoned_allocations  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log2(0) for empty rows

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3)}
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poison_allocations():
    """torch.empty returns NaN-filled (float) or garbage-filled (int) tensors during each test."""
    with poisoned_allocations():
        yield


def make_qkv(B, Hq, Hkv, Tq, Tk, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    return q, k, v


def as_long(x):
    return None if x is None else torch.tensor(x, dtype=torch.long)


def check(out, lse, q, k, v, dtype, **sem):
    """Compare with the float64 reference (output and natural-log LSE)."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref = attention_reference(q64, k64, v64, **sem)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    if lse is not None:
        lref = lse_reference(q64, k64, v64, **sem)
        assert torch.equal(torch.isinf(lse), torch.isinf(lref))  # -inf exactly where no key is visible
        fin = torch.isfinite(lref)
        torch.testing.assert_close(lse.double()[fin], lref[fin], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- prefill
# (B, Hq, Hkv, T, D, causal): sequence lengths 1, 17, 100, 257; head dims 64, 80, 128; GQA 1, 4, 8.
PREFILL_SHAPES = [
    (1, 2, 2, 1, 64, True),
    (2, 4, 1, 17, 80, False),
    (1, 8, 1, 100, 128, True),
    (1, 2, 2, 257, 64, True),
    (1, 4, 1, 257, 80, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "B{}-H{}/{}-T{}-D{}-{}".format(
    *s[:5], "causal" if s[5] else "full"))
def test_prefill_matches_reference(shape, dtype):
    B, Hq, Hkv, T, D, causal = shape
    q, k, v = make_qkv(B, Hq, Hkv, T, T, D, dtype, seed=T * D + Hq)
    out, lse = prefill_attention(q, k, v, causal=causal, return_lse=True)
    check(out, lse, q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_prefill_mixed_lengths(causal):
    """Right-padded batch (prompts / padded encoder batch): kv_len per row, q_start = 0."""
    q, k, v = make_qkv(3, 4, 2, 130, 130, 64, torch.float16, seed=3)
    kv_len, q_start = as_long([130, 57, 1]), as_long([0, 0, 0])
    out, lse = prefill_attention(q, k, v, causal=causal, q_start=q_start, kv_len=kv_len, return_lse=True)
    check(out, lse, q, k, v, torch.float16, causal=causal, q_start=q_start, kv_len=kv_len)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_chunk_against_static_cache(dtype):
    """Chunk of 40 queries at [p, p+40) against a 257-slot cache holding [0, p+40) (row 2 padded)."""
    q, k, v = make_qkv(3, 8, 2, 40, 257, 80, dtype, seed=4)
    q_start, kv_len = as_long([0, 217, 33]), as_long([40, 257, 50])
    out, lse = prefill_attention(q, k, v, q_start=q_start, kv_len=kv_len, return_lse=True)
    check(out, lse, q, k, v, dtype, causal=True, q_start=q_start, kv_len=kv_len)


def test_prefill_default_positions_are_last_queries():
    """Without q_start the queries are the last Tq positions of the keys (Tq < Tk)."""
    q, k, v = make_qkv(2, 4, 4, 33, 90, 64, torch.float32, seed=5)
    check(prefill_attention(q, k, v), None, q, k, v, torch.float32, causal=True)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=64), dict(BLOCK_M=64, BLOCK_N=16)],
                         ids=["M16-N64", "M64-N16"])
def test_prefill_other_block_shapes(config):
    """Diagonal handling must not assume BLOCK_M == BLOCK_N (GPU configs differ from the interpreter's)."""
    q, k, v = make_qkv(1, 2, 1, 100, 150, 128, torch.float32, seed=6)
    q_start, kv_len = as_long([37]), as_long([137])
    out = prefill_attention(q, k, v, q_start=q_start, kv_len=kv_len,
                            config=dict(config, num_warps=4, num_stages=1))
    check(out, None, q, k, v, torch.float32, causal=True, q_start=q_start, kv_len=kv_len)


def test_prefill_odd_and_large_head_dims():
    for D in (40, 256):
        q, k, v = make_qkv(1, 2, 1, 45, 45, D, torch.float32, seed=D)
        check(prefill_attention(q, k, v), None, q, k, v, torch.float32, causal=True)


def test_prefill_strided_views_and_empty_rows():
    """q/k/v as views of a fused (B, T, 3, H, D) projection; a row with kv_len = 0 gives zeros and -inf."""
    B, T, H, D = 2, 70, 4, 64
    qkv = torch.randn(B, T, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), not contiguous
    kv_len = as_long([70, 0])
    out, lse = prefill_attention(q, k, v, causal=False, kv_len=kv_len, return_lse=True)
    check(out, lse, q, k, v, torch.float32, causal=False, kv_len=kv_len)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()


# ---------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["1split", "3splits", "auto"])
def test_decode_one_token_mixed_lengths(num_splits, dtype):
    """One new token per row; cache lengths 1 .. several BLOCK_N=16 blocks; GQA 4, D=128."""
    lens = [1, 16, 47, 130]
    q, k, v = make_qkv(4, 8, 2, 1, 160, 128, dtype, seed=7)
    q_start, kv_len = as_long([n - 1 for n in lens]), as_long(lens)
    out, lse = decode_attention(q, k, v, q_start=q_start, kv_len=kv_len, return_lse=True,
                                num_splits=num_splits)
    check(out, lse, q, k, v, dtype, causal=True, q_start=q_start, kv_len=kv_len)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_verification_tokens(dtype):
    """Tq = 16 draft tokens at [len, len+16), GQA 8 (128 rows per program), 5 splits."""
    q, k, v = make_qkv(2, 16, 2, 16, 257, 64, dtype, seed=8)
    q_start = as_long([100, 3])
    kv_len = q_start + 16
    out, lse = decode_attention(q, k, v, q_start=q_start, kv_len=kv_len, return_lse=True, num_splits=5)
    check(out, lse, q, k, v, dtype, causal=True, q_start=q_start, kv_len=kv_len)


def test_decode_large_group_uses_several_row_blocks():
    """GQA 16 x 9 tokens = 144 rows > 128: two row blocks per KV head."""
    q, k, v = make_qkv(1, 16, 1, 9, 100, 80, torch.float32, seed=9)
    q_start = as_long([60])
    out = decode_attention(q, k, v, q_start=q_start, kv_len=q_start + 9, num_splits=2)
    check(out, None, q, k, v, torch.float32, causal=True, q_start=q_start, kv_len=q_start + 9)


@pytest.mark.parametrize("num_splits", [1, 7], ids=["1split", "7splits"])
def test_decode_non_causal_and_empty_rows(num_splits):
    """Short padded encoder batch (Tq = Tk = 12, non-causal); kv_len 0 gives zeros and -inf."""
    q, k, v = make_qkv(3, 4, 4, 12, 12, 64, torch.float32, seed=10)
    kv_len = as_long([12, 5, 0])
    out, lse = decode_attention(q, k, v, causal=False, kv_len=kv_len, return_lse=True, num_splits=num_splits)
    check(out, lse, q, k, v, torch.float32, causal=False, kv_len=kv_len)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isinf(lse[2]).all()


@pytest.mark.parametrize("config", [dict(BLOCK_N=32), dict(BLOCK_N=64)], ids=["N32", "N64"])
def test_decode_other_block_sizes_and_default_positions(config):
    """GPU block sizes; q_start / kv_len left to their defaults (queries are the last Tq keys)."""
    q, k, v = make_qkv(2, 4, 1, 3, 200, 64, torch.float16, seed=11)
    out = decode_attention(q, k, v, num_splits=3, config=dict(config, num_warps=4, num_stages=1))
    check(out, None, q, k, v, torch.float16, causal=True)


def test_split_count_fills_the_gpu():
    """Batch 1 at long context gets many splits; a batch that already fills the GPU gets one."""
    sms = 132
    n = choose_num_splits(programs=8, Tk=8192, num_sms=sms, granule=128)  # B=1, Hkv=8
    assert 8 * n >= sms and 8192 / n >= 256
    assert choose_num_splits(programs=16 * 8, Tk=8192, num_sms=sms, granule=128) > 1
    assert choose_num_splits(programs=64 * 8, Tk=8192, num_sms=sms, granule=128) == 1
    assert choose_num_splits(programs=8, Tk=100, num_sms=sms, granule=128) == 1  # too short to split


# ---------------------------------------------------------------- attention() dispatch
@pytest.fixture
def backend():
    yield set_backend
    set_backend(None)


@pytest.mark.parametrize("Tq", [1, 5, 16, 17, 60])
def test_triton_backend_dispatch(backend, Tq):
    """backend "triton" sends Tq <= 16 to decode_attention and longer queries to prefill_attention."""
    backend("triton")
    q, k, v = make_qkv(2, 8, 2, Tq, 96, 64, torch.float16, seed=Tq)
    q_start, kv_len = as_long([96 - Tq, 40 - Tq]) if Tq < 40 else as_long([0, 0]), as_long([96, 40])
    out = attention(q, k, v, causal=True, q_start=q_start, kv_len=kv_len)
    check(out, None, q, k, v, torch.float16, causal=True, q_start=q_start, kv_len=kv_len)


def test_unsupported_inputs_fall_back(backend, monkeypatch):
    """bf16 on CPU, inputs needing gradients and CPU tensors under "auto" never reach the kernels."""
    def no_kernels(*args, **kwargs):
        raise AssertionError("Triton kernels called for unsupported inputs")

    monkeypatch.setattr(attention_dispatch, "triton_attention", no_kernels)
    q, k, v = make_qkv(1, 4, 2, 20, 20, 64, torch.float32, seed=12)
    backend("auto")
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), **TOL[torch.float32])
    backend("triton")
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    torch.testing.assert_close(attention(qb, kb, vb).float(), attention_reference(q, k, v), atol=3e-2, rtol=3e-2)
    qg = q.clone().requires_grad_()
    attention(qg, k, v).sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()


def test_bad_positions_and_backend_names(backend):
    q, k, v = make_qkv(2, 4, 2, 3, 10, 64, torch.float32, seed=13)
    with pytest.raises(ValueError, match="kv_len"):
        attention(q, k, v, kv_len=as_long([10, 10, 10]))
    with pytest.raises(ValueError, match="q_start"):
        attention(q, k, v, q_start=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="backend"):
        backend("flash")
    with pytest.raises(ValueError, match="shapes do not agree"):
        prefill_attention(q, k[..., :32], v)
    with pytest.raises(ValueError, match="shapes do not agree"):
        decode_attention(q, k, v[:1])


# ---------------------------------------------------------------- the decoder on the kernels
@torch.no_grad()
def test_decoder_greedy_tokens_match_sdpa(backend, monkeypatch):
    """A tiny random Llama-style decoder (GQA 4:2, RoPE) gives the same greedy tokens and close
    logits with backend "triton" (prefill kernel for the 23-token prompt batch, decode kernel for
    each step and for a 4-token verification) as with SDPA."""
    from mmfuse.decoder.config import DecoderConfig
    from mmfuse.decoder.generate import DecodeState, Engine
    from mmfuse.nn.layers import init_weights
    from mmfuse.decoder.transformer import Decoder

    cfg = DecoderConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=24, d_ff=96,
                        max_seq_len=64, family="llama", norm="rmsnorm", act="silu", gated_mlp=True,
                        learned_pos=False, qkv_bias=False, o_bias=False, mlp_bias=False, tie_embeddings=False)
    model = Decoder.random(cfg)
    init_weights(model, std=0.3)  # peaked attention and logits, not near-uniform ones
    g = torch.Generator().manual_seed(14)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 23, 1)]
    draft = torch.randint(0, 300, (3, 4), generator=g)
    calls, kernels = [], attention_dispatch.triton_attention
    monkeypatch.setattr(attention_dispatch, "triton_attention", lambda q, *a: calls.append(q.shape[2]) or kernels(q, *a))
    runs = {}
    for name in ("sdpa", "triton"):
        backend(name)
        done = Engine(model).generate(prompts, temperature=0.0, max_new_tokens=8, logprobs=True)
        state = DecodeState(model, 3, 40)
        state.prefill(prompts)
        runs[name] = ([c.token_ids for c in done], torch.tensor([c.logprobs for c in done]), state.forward(draft))
    assert sorted(set(calls)) == [1, 4, 23]  # decode steps, verification, prefill: all on the kernels
    assert runs["triton"][0] == runs["sdpa"][0]
    torch.testing.assert_close(runs["triton"][1], runs["sdpa"][1], atol=1e-4, rtol=0)
    torch.testing.assert_close(runs["triton"][2], runs["sdpa"][2], atol=1e-4, rtol=1e-4)
