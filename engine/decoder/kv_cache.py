"""The static KV cache of a batch: preallocated buffers, how many positions each row holds, and the
only code that writes them (`update`, as gpt-fast's `KVCache.update`).

Every write lands in place at given positions: no concatenation and no allocation per token, so a
decode step can be captured in a CUDA graph (the buffers, `lengths` and the row index never move;
`grow` replaces the buffers and bumps `version`, which tells a graph owner to capture again).
Rows advance independently; `truncate` rolls rows back (speculative decoding's rejected drafts,
a reused prompt prefix) and later writes overwrite what lies past each row's length.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..errors import CapacityError


class KVCache:
    def __init__(self, cfg, batch: int, max_len: int, dtype, device):
        """Check the request against the model's context first, then allocate zeros."""
        if max_len > cfg.max_seq_len:
            raise CapacityError(f"a KV cache of {max_len} positions exceeds the model's context of "
                                f"{cfg.max_seq_len} positions")
        if batch < 1 or max_len < 1:
            raise CapacityError(f"KV cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        self.cfg = cfg
        self.k, self.v = self._buffers(batch, max_len, dtype, device)  # (L, B, Hkv, T_max, D) each
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) positions each row holds
        self._filled = [0] * batch  # host mirror of `lengths`: capacity checks need no device sync
        # a CPU cache's lengths as a numpy view: a decode step advances them by item assignment, not by
        # a tensor op (tens of microseconds each once a step has streamed the weights through the caches)
        self._host = self.lengths.numpy() if self.lengths.device.type == "cpu" else None
        self._rows = torch.arange(batch, device=device)[:, None]  # (B, 1) row index of every write
        self.version = 0  # bumped when `grow` replaces the buffers
        # The token ids row 0 holds, position by position, when the owner records them (prefix
        # reuse, batch 1): `record` keeps it in step with the writes; None when not recorded.
        self.tokens: Optional[list] = None

    def _buffers(self, batch: int, max_len: int, dtype, device) -> tuple:
        c = self.cfg
        shape = (c.n_layer, batch, c.n_kv_head, max_len, c.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def filled(self) -> list:
        """Positions each row holds."""
        return list(self._filled)

    # ---- writes
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple:
        """Write one layer's new keys/values k, v (B, Hkv, T, D) at `positions` (B, T); return that
        layer's whole cache (B, Hkv, T_max, D) each, which attention reads up to each row's length."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache[self._rows, :, positions] = k.transpose(1, 2).to(k_cache.dtype)  # index (B, T) -> (B, T, Hkv, D)
        v_cache[self._rows, :, positions] = v.transpose(1, 2).to(v_cache.dtype)
        return k_cache, v_cache

    def next_positions(self, k: int) -> torch.Tensor:
        """(B, k) positions of k more tokens after each row's cached ones."""
        return self.lengths[:, None] + torch.arange(k, device=self.lengths.device)

    # ---- lengths
    def check_room(self, extra: Sequence[int]) -> None:
        """Raise CapacityError unless row b has room for extra[b] more positions."""
        for b, (n, k) in enumerate(zip(self._filled, extra)):
            if n + k > self.max_len:
                raise CapacityError(f"row {b}: {n} cached + {k} new positions exceed the KV cache of "
                                    f"{self.max_len} positions")

    def advance(self, n: Union[int, Sequence[int], torch.Tensor]) -> None:
        """Count n more positions in every row (an int) or per row (a list, or a (B,) int/bool tensor
        such as a decode step's active rows)."""
        per_row = [n] * self.batch if isinstance(n, int) else n.tolist() if isinstance(n, torch.Tensor) else n
        self._filled = [m + int(a) for m, a in zip(self._filled, per_row)]
        if self._host is not None:
            for b, m in enumerate(self._filled):
                self._host[b] = m
            return
        with torch.inference_mode():  # whichever mode the caller is in (`lengths` may be an inference tensor)
            self.lengths += n if isinstance(n, int) else torch.as_tensor(n).to(device=self.lengths.device,
                                                                               dtype=self.lengths.dtype)

    def truncate(self, lengths: Sequence[int]) -> None:
        """Roll rows back to `lengths` cached positions (never forward); later writes overwrite the rest."""
        if len(lengths) != self.batch or any(n > m or n < 0 for n, m in zip(lengths, self._filled)):
            raise ValueError(f"truncate to {list(lengths)}: must be one length per row within {self._filled}")
        self._filled = [int(n) for n in lengths]
        with torch.inference_mode():
            self.lengths.copy_(torch.as_tensor(self._filled, device=self.lengths.device))

    def grow(self, max_len: int) -> None:
        """Reallocate the buffers to `max_len` positions, keeping what every row holds."""
        if max_len <= self.max_len:
            return
        if max_len > self.cfg.max_seq_len:
            raise CapacityError(f"a KV cache of {max_len} positions exceeds the model's context of "
                                f"{self.cfg.max_seq_len} positions")
        n = max(self._filled)
        k, v = self._buffers(self.batch, max_len, self.k.dtype, self.k.device)
        k[..., :n, :] = self.k[..., :n, :]
        v[..., :n, :] = self.v[..., :n, :]
        self.k, self.v = k, v
        self.version += 1

    # ---- what row 0 holds
    def record(self, row0: Sequence[int]) -> None:
        """Keep `tokens` in step with row 0 before a write of `row0` at its length: drop what
        `truncate` rolled back, append the tokens written; a gap (positions written without a
        record) ends the record."""
        if self.tokens is None:
            return
        n = self._filled[0]
        if len(self.tokens) < n:
            self.tokens = None
            return
        del self.tokens[n:]
        self.tokens.extend(int(t) for t in row0)
