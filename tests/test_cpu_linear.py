"""The CPU linear paths (numba GEMV, oneDNN with packed weights) against float64, and their fall-backs."""
import gc

import pytest
import torch
import torch.nn.functional as F

from mmfuse.kernels import cpu_linear
from mmfuse.kernels.cpu_linear import GEMV_MAX_ROWS, linear, linear_reference

needs_packed = pytest.mark.skipif(not cpu_linear._PACKED, reason="torch built without oneDNN")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _case(rows, K, N, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    ref = linear_reference(x.to(dtype).double(), w.to(dtype).double(), None if b is None else b.to(dtype).double())
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), ref


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 17, 50, 301])
@pytest.mark.parametrize("K, N", [(1, 1), (17, 5), (768, 2304), (300, 1001)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float64(rows, K, N, bias, dtype):
    x, w, b, ref = _case(rows, K, N, bias, dtype, seed=K * N + rows)
    out = linear(x, w, b)
    assert out.shape == (rows, 1, N) and out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol["atol"] * K ** 0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "quick_gelu", "silu", "relu"])
@pytest.mark.parametrize("rows", [1, 5, 50])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_matches_float64(act, rows, bias, dtype):
    x, w, b, _ = _case(rows, 300, 1001, bias, dtype, seed=rows)
    ref = linear_reference(x.double(), w.double(), None if b is None else b.double(), act)
    out = linear(x, w, b, act=act)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype]["atol"] * 300 ** 0.5, rtol=TOL[dtype]["rtol"])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        linear(x, w, b, act="swish")


@needs_packed
def test_packed_weight_follows_in_place_updates():
    lin = torch.nn.Linear(37, 29)
    x = torch.randn(GEMV_MAX_ROWS + 3, 37)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        lin.weight.mul_(-2.0)  # what an optimizer step does: same tensor, new values
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        lin.load_state_dict({"weight": torch.randn(29, 37), "bias": torch.randn(29)})
        torch.testing.assert_close(linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))


@needs_packed
def test_views_share_one_packed_copy_and_dead_weights_free_it():
    conv_weight = torch.randn(16, 3, 4, 4)
    x = torch.randn(9, 48)
    before = len(cpu_linear._packs)
    for _ in range(3):  # a fresh view object per call, as the ViT patch embedding makes
        out = linear(x, conv_weight.view(16, -1))
    assert len(cpu_linear._packs) == before + 1
    torch.testing.assert_close(out, x @ conv_weight.view(16, -1).T)
    w = torch.randn(8, 48)
    linear(x, w)
    assert len(cpu_linear._packs) == before + 2
    del conv_weight, w
    gc.collect()
    assert len(cpu_linear._packs) == before


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
