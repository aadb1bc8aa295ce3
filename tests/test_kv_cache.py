"""KVCache on its own: writes at per-row positions, lengths, capacity, rollback, grow, the row-0 record."""
import pytest
import torch

from mmfuse.decoder.config import DecoderConfig
from mmfuse.decoder.kv_cache import KVCache
from mmfuse.errors import CapacityError

CFG = DecoderConfig(vocab_size=11, n_layer=3, n_head=4, n_kv_head=2, d_model=12, head_dim=3, d_ff=8, max_seq_len=40)


def _kv(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B, CFG.n_kv_head, T, CFG.head_dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_update_writes_each_row_at_its_positions_and_returns_the_layer():
    cache = KVCache(CFG, 2, 9, torch.float64, "cpu")
    cache.k.fill_(float("nan"))  # poisoned: every position read below must have been written
    cache.v.fill_(float("nan"))
    k, v = _kv(2, 4, 0)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])  # (B, T): rows at different offsets
    kc, vc = cache.update(1, k, v, positions)
    assert kc.data_ptr() == cache.k[1].data_ptr() and kc.shape == (2, CFG.n_kv_head, 9, CFG.head_dim)
    for b in range(2):
        torch.testing.assert_close(kc[b, :, positions[b]], k[b].double(), rtol=0, atol=0)
        torch.testing.assert_close(vc[b, :, positions[b]], v[b].double(), rtol=0, atol=0)
    assert torch.isnan(cache.k[0]).all() and torch.isnan(cache.k[2]).all()  # other layers untouched
    assert torch.isnan(kc[0, :, 4:]).all() and torch.isnan(kc[1, :, :5]).all()


def test_lengths_advance_truncate_and_capacity():
    cache = KVCache(CFG, 3, 8, torch.float32, "cpu")
    cache.advance([2, 5, 0])
    cache.advance(torch.tensor([True, False, True]))
    cache.advance(1)
    assert cache.filled == [4, 6, 2] and cache.lengths.tolist() == [4, 6, 2]
    assert cache.next_positions(2).tolist() == [[4, 5], [6, 7], [2, 3]]
    cache.check_room([4, 2, 6])
    with pytest.raises(CapacityError, match="row 1: 6 cached \\+ 3 new"):
        cache.check_room([0, 3, 0])
    cache.truncate([1, 6, 0])
    assert cache.filled == [1, 6, 0] and cache.lengths.tolist() == [1, 6, 0]
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate([2, 0, 0])  # never forward
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate([0, 0])


@pytest.mark.parametrize("made_in_inference_mode", [False, True])
def test_lengths_advance_in_any_mode(made_in_inference_mode):
    """A decode step advances outside inference mode (the fused CPU step runs none): every kind of
    advance works there and inside it, whichever mode made the cache, and the tensor follows."""
    with torch.inference_mode(made_in_inference_mode):
        cache = KVCache(CFG, 2, 30, torch.float32, "cpu")
    steps = [1, [3, 0], torch.tensor([False, True]), 2]
    for inside in (False, True):
        for n in steps:
            with torch.inference_mode(inside):
                cache.advance(n)
    assert cache.filled == [12, 8] and cache.lengths.tolist() == [12, 8]
    cache.truncate([5, 1])
    cache.advance(1)
    assert cache.lengths.tolist() == [6, 2] == cache.filled


def test_allocation_checks_the_context():
    with pytest.raises(CapacityError, match="exceeds the model's context of 40"):
        KVCache(CFG, 1, 41, torch.float32, "cpu")
    with pytest.raises(CapacityError, match="batch >= 1"):
        KVCache(CFG, 0, 4, torch.float32, "cpu")


def test_grow_keeps_every_row_and_bumps_the_version():
    cache = KVCache(CFG, 2, 6, torch.float32, "cpu")
    k, v = _kv(2, 6, 1)
    cache.update(2, k, v, torch.arange(6).expand(2, 6))
    cache.advance([6, 3])
    lengths = cache.lengths
    cache.grow(4)  # smaller: nothing happens
    assert cache.version == 0 and cache.max_len == 6
    cache.grow(17)
    assert cache.version == 1 and cache.max_len == 17 and cache.filled == [6, 3]
    assert cache.lengths is lengths  # the lengths tensor never moves (CUDA graphs read it)
    torch.testing.assert_close(cache.k[2, 0, :, :6], k[0], rtol=0, atol=0)
    torch.testing.assert_close(cache.v[2, 1, :, :3], v[1, :, :3], rtol=0, atol=0)
    with pytest.raises(CapacityError):
        cache.grow(41)


def test_row0_record_follows_writes_and_rollback():
    cache = KVCache(CFG, 1, 10, torch.float32, "cpu")
    cache.record([1, 2])  # no record kept: nothing happens
    assert cache.tokens is None
    cache.advance(3)
    cache.tokens = [7, 8, 9]
    cache.record([4])
    cache.advance(1)
    assert cache.tokens == [7, 8, 9, 4]
    cache.truncate([2])
    cache.record([5, 6])
    cache.advance(2)
    assert cache.tokens == [7, 8, 5, 6]
    cache.advance(1)  # written without a record: a gap ends it
    cache.record([3])
    assert cache.tokens is None
