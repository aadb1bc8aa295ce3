"""The numba GEMV against float64 matmul, and its fall-backs."""
import pytest
import torch

from mmfuse.kernels.cpu_linear import MAX_ROWS, linear, linear_reference


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("K, N", [(1, 1), (17, 5), (768, 2304), (300, 1001)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_matches_float64(rows, K, N, bias):
    g = torch.Generator().manual_seed(K * N + rows)
    x = torch.randn(rows, 1, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    ref = linear_reference(x.double(), w.double(), None if b is None else b.double())
    out = linear(x, w, b)
    assert out.shape == (rows, 1, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * K ** 0.5, rtol=1e-5)


def test_fallbacks_give_torch_results():
    w = torch.randn(7, 5)
    x = torch.randn(MAX_ROWS + 1, 5)
    torch.testing.assert_close(linear(x, w), x @ w.T)  # too many rows: F.linear
    xb = torch.randn(1, 5, dtype=torch.bfloat16)
    assert linear(xb, w.bfloat16()).dtype == torch.bfloat16  # other dtypes: F.linear
    xg = torch.randn(1, 5, requires_grad=True)
    linear(xg, w).sum().backward()  # gradients: F.linear
    torch.testing.assert_close(xg.grad, w.sum(0, keepdim=True))
