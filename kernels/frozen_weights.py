"""The registry of weights marked as inference constants, with the packed copies kept of them.

`cpu_linear.linear` may run a frozen weight from a copy in another layout (oneDNN's blocked one)
made once. The contract, all in `FrozenWeights`:

- `add(module)` freezes every parameter of 2+ dims of `module`; `remove(module)` unfreezes them
  and drops their copies. An entry lives as long as its parameter (weak reference).
- `packed(weight, scale, pack)` gives `pack(scale * weight)` for a frozen parameter or a view of one
  (the ViT patch embedding views its conv weight per call; SigLIP's pooling head slices q and kv
  out of one weight), made on first use and again after the parameter's version counter moved
  (in-place ops, `load_state_dict`, the default optimizers); None for any other weight.
- Writes that bypass the version counter (through `.data`, fused optimizers such as
  `AdamW(fused=True)`) leave a stale copy: after those call `add(module, refresh=True)` (drops the
  copies; they are remade on use) or `remove(module)`.
- `copies(weight=None)` counts the copies held, of one parameter or of all.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch


class FrozenWeights:
    """Frozen parameters by id: (weak reference, {(scale, address, shape, stride, dtype): (version, copy)})."""

    def __init__(self):
        self._entries: dict = {}

    def add(self, module: torch.nn.Module, refresh: bool = False) -> None:
        """Freeze `module`'s parameters of 2+ dims; freezing again keeps their copies unless `refresh`."""
        for p in module.parameters():
            if p.dim() >= 2 and (refresh or id(p) not in self._entries):
                if id(p) not in self._entries:
                    weakref.finalize(p, self._entries.pop, id(p), None)
                self._entries[id(p)] = (weakref.ref(p), {})

    def remove(self, module: torch.nn.Module) -> None:
        """Unfreeze `module`'s parameters and drop their copies."""
        for p in module.parameters():
            self._entries.pop(id(p), None)

    def copies(self, weight: Optional[torch.Tensor] = None) -> int:
        """Copies held for `weight` (a parameter), or for every frozen parameter when None."""
        if weight is None:
            return sum(len(entry[1]) for entry in self._entries.values())
        entry = self._entries.get(id(weight))
        return 0 if entry is None or entry[0]() is not weight else len(entry[1])

    def packed(self, weight: torch.Tensor, scale: float,
               pack: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.Tensor]:
        """`pack(scale * weight)` (N, K) if `weight` is a frozen parameter or a view of one, else None.
        Made on first use and again when the version moves; copies of views the parameter no longer
        holds (after `.to()` or `.data =`) are dropped then."""
        owner = weight if weight._base is None else weight._base
        entry = self._entries.get(id(owner))
        if entry is None or entry[0]() is not owner:
            return None
        key = (scale, weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)
        hit = entry[1].get(key)
        if hit is not None and hit[0] == owner._version:
            return hit[1]
        storage = owner.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        for k in [k for k in list(entry[1]) if k[4] != owner.dtype or not start <= k[1] < end]:  # list(): threads
            entry[1].pop(k, None)
        copy = pack(weight.detach().contiguous() if scale == 1.0 else weight.detach() * scale)
        entry[1][key] = (owner._version, copy)
        return copy
