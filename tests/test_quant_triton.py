"""The Triton w8a16 / w4a16 kernel under the interpreter (fp32) against dequantize-then-matmul."""
import pytest
import torch

from mmfuse.kernels.quant_cpu import quant_linear_reference

from test_quant import random_quant

triton = pytest.importorskip("triton")
from mmfuse.kernels.quant_triton import quant_linear_triton  # noqa: E402


@pytest.mark.parametrize("bits,g,K,N,rows,asym", [(8, 37, 37, 29, 1, False), (8, 16, 50, 70, 5, True),
                                                  (4, 32, 96, 41, 3, False), (4, 16, 50, 19, 17, True),
                                                  (4, 64, 128, 65, 1, True)])
def test_triton_matches_reference(bits, g, K, N, rows, asym):
    q, s, z = random_quant(N, K, bits, g, asym, seed=K + N)
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(N)
    ref = quant_linear_reference(x.double(), q, s.double(), z, bits, g, bias.double(), act="gelu_tanh")
    out = quant_linear_triton(x, q, s, z, bits, g, bias, act="gelu_tanh")
    assert out.shape == (rows, N)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5 * ref.abs().max().item())
