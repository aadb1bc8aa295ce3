"""The CPU linear paths (numba GEMV, oneDNN with packed weights) against float64, and their fall-backs."""
import gc

import pytest
import torch
import torch.nn.functional as F

from mmfuse.kernels import cpu_linear
from mmfuse.kernels.cpu_linear import GEMV_MAX_ROWS, freeze, linear, linear_reference, unfreeze

needs_packed = pytest.mark.skipif(not cpu_linear.packs(torch.float32), reason="torch built without oneDNN")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _case(rows, K, N, bias, dtype, seed, frozen=True):
    """x (rows, 1, K), an nn.Linear's weight and bias in `dtype` (frozen or not), the float64 result."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    if frozen:
        freeze(lin)
    x = torch.randn(rows, 1, K, generator=g).to(dtype)
    w, b = lin.weight, lin.bias
    ref = linear_reference(x.double(), w.double(), None if b is None else b.double())
    return x, w, b, ref


def assert_path(w, rows, dtype, frozen=True):
    """The case ran where it should: packed oneDNN for frozen weights beyond the GEMV's rows (or in bf16)."""
    packed = cpu_linear.FROZEN.copies(w) > 0
    packs = cpu_linear.packs(dtype)
    assert packed == (frozen and packs and (rows > GEMV_MAX_ROWS or dtype == torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 50, 301])
@pytest.mark.parametrize("K, N", [(1, 1), (17, 5), (768, 2304), (300, 1001)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", [True, False])
def test_linear_matches_float64(rows, K, N, bias, dtype, frozen):
    x, w, b, ref = _case(rows, K, N, bias, dtype, seed=K * N + rows, frozen=frozen)
    with torch.no_grad():
        out = linear(x, w, b)
    assert_path(w, rows, dtype, frozen)
    assert out.shape == (rows, 1, N) and out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol["atol"] * K ** 0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "quick_gelu", "silu", "relu"])
@pytest.mark.parametrize("rows", [1, 5, 50])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_matches_float64(act, rows, bias, dtype):
    x, w, b, _ = _case(rows, 300, 1001, bias, dtype, seed=rows)
    with torch.no_grad():
        ref = linear_reference(x.double(), w.double(), None if b is None else b.double(), act)
        out = linear(x, w, b, act=act)
        assert out.dtype == dtype
        assert_path(w, rows, dtype)
        torch.testing.assert_close(out.double(), ref, atol=TOL[dtype]["atol"] * 300 ** 0.5, rtol=TOL[dtype]["rtol"])
        with pytest.raises(ValueError, match="unknown activation 'swish'"):
            linear(x, w, b, act="swish")


def _packed_copies():
    return cpu_linear.FROZEN.copies()


@needs_packed
def test_packed_weight_follows_in_place_updates():
    lin = freeze(torch.nn.Linear(37, 29))
    x = torch.randn(GEMV_MAX_ROWS + 3, 37)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        lin.weight.mul_(-2.0)  # an in-place op: same tensor, new values, version bumped
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        lin.load_state_dict({"weight": torch.randn(29, 37), "bias": torch.randn(29)})
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)  # the default (non-fused) step bumps versions
    for _ in range(2):
        lin(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
    with torch.no_grad():
        lin.weight.data.add_(1.0)  # bypasses the version counter: the documented case for refresh
        freeze(lin, refresh=True)
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        lin.to(torch.bfloat16)  # same Parameter object, new data and dtype: repacked, not reused
        xb = x.bfloat16()
        torch.testing.assert_close(linear(xb, lin.weight, lin.bias), F.linear(xb, lin.weight, lin.bias))


@needs_packed
def test_only_frozen_weights_are_packed_and_views_share_one_copy():
    conv = torch.nn.Conv2d(3, 16, 4, bias=False)
    x = torch.randn(9, 48)
    before = _packed_copies()
    with torch.no_grad():
        linear(x, conv.weight.view(16, -1))
        assert _packed_copies() == before  # not frozen: F.linear, nothing kept
        freeze(conv)
        for _ in range(3):  # a fresh view object per call, as the ViT patch embedding makes
            out = linear(x, conv.weight.view(16, -1))
        assert _packed_copies() == before + 1
        torch.testing.assert_close(out, x @ conv.weight.view(16, -1).T)
        linear(x, conv.weight.view(16, -1), act="quick_gelu")  # the 1.702-scaled copy is a second one
        assert _packed_copies() == before + 2
        freeze(conv)  # freezing again (every DecodeState does) keeps the copies
        assert _packed_copies() == before + 2
        unfreeze(conv)
        assert _packed_copies() == before
        freeze(conv)
        linear(x, conv.weight.view(16, -1))
    assert _packed_copies() == before + 1
    del conv, out
    gc.collect()
    assert _packed_copies() == before


@needs_packed
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not cpu_linear.packs(torch.bfloat16), reason="oneDNN packs bf16 only with AVX-512 or AVX-NE-CONVERT"))])
def test_two_views_of_one_weight_keep_their_own_copies(dtype):
    pool = freeze(torch.nn.Linear(48, 3 * 16).to(dtype))  # SigLIP's head: q and kv sliced from one weight
    x = torch.randn(9, 48, dtype=dtype)
    before = _packed_copies()
    with torch.no_grad():
        w, b = pool.weight, pool.bias
        q_pack = cpu_linear.packed_weight(w[:16], 1.0)
        for _ in range(2):
            torch.testing.assert_close(linear(x, w[:16], b[:16]), F.linear(x, w[:16], b[:16]))
            torch.testing.assert_close(linear(x, w[16:], b[16:]), F.linear(x, w[16:], b[16:]))
        assert cpu_linear.packed_weight(w[:16], 1.0) is q_pack  # the kv view did not evict it
        assert _packed_copies() == before + 2
        pool.weight.data = pool.weight.data.clone()  # new storage: the old copies go at the next packing
        linear(x, w[16:], b[16:])
        assert _packed_copies() == before + 1


def test_fallbacks_give_torch_results():
    w = torch.randn(7, 5)
    xg = torch.randn(GEMV_MAX_ROWS + 5, 5, requires_grad=True)
    linear(xg, w).sum().backward()  # gradients: F.linear
    torch.testing.assert_close(xg.grad, w.sum(0, keepdim=True).expand(GEMV_MAX_ROWS + 5, 5))
    wg = torch.randn(7, 5, requires_grad=True)
    linear(torch.randn(2, 5), wg).sum().backward()
    assert wg.grad is not None
    xd = torch.randn(20, 5, dtype=torch.float64)
    torch.testing.assert_close(linear(xd, w.double()), xd @ w.double().T)  # other dtypes
    with pytest.raises(RuntimeError):  # mismatched dtypes fail as in torch, not silently
        linear(torch.randn(20, 5), w.bfloat16())
    assert linear(torch.randn(0, 5), w).shape == (0, 7)


def test_export_records_a_plain_linear():
    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(7))

        def forward(self, t):
            return linear(t, self.w, self.b)

    m, x = Lin(), torch.randn(20, 5)
    with torch.no_grad():
        graph = str(torch.export.export(m, (x,)).graph)
    assert "linear" in graph and "mkldnn" not in graph
