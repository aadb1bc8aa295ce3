"""A preallocated static KV cache, written in place: no concatenation, no allocation per token."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CapacityError


@dataclass
class KVCache:
    k: torch.Tensor  # (L, B, Hkv, T_max, D)
    v: torch.Tensor  # (L, B, Hkv, T_max, D)

    @classmethod
    def allocate(cls, cfg, batch: int, max_len: int, dtype, device) -> "KVCache":
        """Check the request against the model's context first, then allocate zeros."""
        if max_len > cfg.max_seq_len:
            raise CapacityError(f"a KV cache of {max_len} positions exceeds the model's context of "
                                f"{cfg.max_seq_len} positions")
        if batch < 1 or max_len < 1:
            raise CapacityError(f"KV cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer(self, i: int):
        return self.k[i], self.v[i]
