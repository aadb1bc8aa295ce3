"""The CPU paths of `attention()` (SDPA and the few-query grouped matmul) against the float64 reference."""
import pytest
import torch

from mmfuse.kernels import attention, attention_reference


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("Tq", [1, 3, 16, 37])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (8, 2), (6, 1)])
def test_cache_attention_matches_reference(dtype, tol, Tq, Hq, Hkv):
    g = torch.Generator().manual_seed(Tq * 100 + Hq * 10 + Hkv)
    B, Tmax, D = 3, 70, 24
    q = torch.randn(B, Hq, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tmax, D, generator=g)
    v = torch.randn(B, Hkv, Tmax, D, generator=g)
    q_start = torch.tensor([0, 5, Tmax - Tq])
    kv_len = q_start + Tq
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, q_start=q_start, kv_len=kv_len)
    out = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, q_start=q_start, kv_len=kv_len)
    assert out.dtype == dtype and out.shape == (B, Hq, Tq, D)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_padded_encoder_batch_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    kv_len = torch.tensor([9, 4])
    ref = attention_reference(q.double(), k.double(), v.double(), causal=False, kv_len=kv_len)
    torch.testing.assert_close(attention(q, k, v, causal=False, kv_len=kv_len).double(), ref, atol=2e-5, rtol=0)
