"""A model's weights moved into one anonymous mapping backed by transparent huge pages.

Batch-1 decoding reads every weight once a step, so a step is as fast as the weights stream from
memory. Read through 4 KiB pages (where safetensors' memory maps and most allocations put them)
each core's stream misses the TLB and the hardware prefetcher stops at every 4 KiB boundary; two
threads each reading one contiguous half of a layer stream 26.7 GB/s from 2 MiB pages against 24.2
from 4 KiB ones (bench/stream_chunks.cpp), and whole decode steps run 4-14% faster
(bench/README.md). `relocate` copies every parameter and buffer into one mapping, in module order
(the order a decode step reads them), and points each tensor there (`tensor.data`): the same
Parameter objects with the same values, so optimizers, tied weights and the per-op path see no
difference. The mapping lives as long as any tensor in it.
"""
from __future__ import annotations

import mmap
import threading
import weakref

import torch

from mmfuse import envs
from mmfuse.huge_pages import HUGE_PAGE, MADV_POPULATE_WRITE

ALIGN = 64  # each tensor starts on a cache line
MIN_BYTES = 2 * HUGE_PAGE  # smaller models stay where they are: they live in the caches anyway
_LOCK = threading.Lock()  # two engines of one model, started in two threads, move it once
_DONE: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # modules relocate has seen: later calls cost nothing


def _movable(t: torch.Tensor) -> bool:
    """A CPU tensor that owns its whole storage, contiguously (so moving it moves nothing else)."""
    return (t.device.type == "cpu" and not t.is_inference() and t.is_contiguous() and t.numel() > 0
            and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def relocate(module: torch.nn.Module) -> int:
    """Move `module`'s parameters and buffers into one huge-page mapping; returns the bytes moved (0:
    `MMFUSE_HUGE_PAGES=0`, fewer than MIN_BYTES, or already moved). Views (tensors that do not own
    their whole storage), non-CPU and inference-mode tensors stay where they are; a view held
    elsewhere of a tensor that moves keeps the old memory (the same values, no longer shared). Tied
    weights are one Parameter object and stay tied."""
    if not envs.read("MMFUSE_HUGE_PAGES") or not hasattr(mmap, "MAP_PRIVATE"):  # no anonymous private maps (Windows)
        return 0
    with _LOCK:
        if module in _DONE:
            return 0
        _DONE.add(module)
        return _relocate(module)


def _relocate(module: torch.nn.Module) -> int:
    tensors, seen = [], set()
    for mod in module.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None and id(t) not in seen and _movable(t):
                seen.add(id(t))
                tensors.append(t)
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    if total < MIN_BYTES:
        return 0
    arena = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room to start on a huge page
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
        try:  # faulting the pages in with one call is about twice as fast as one by one during the copy
            arena.madvise(MADV_POPULATE_WRITE)
        except OSError:  # an older kernel: the copy below faults the pages in
            pass
    with torch.inference_mode(False), torch.no_grad():
        memory = torch.frombuffer(arena, dtype=torch.uint8)  # keeps `arena` alive while any view of it lives
        start = -memory.data_ptr() % HUGE_PAGE
        for t, off in zip(tensors, offsets):
            n = t.numel() * t.element_size()
            dst = memory[start + off:start + off + n].view(t.dtype).view(t.shape)
            dst.copy_(t)
            t.data = dst
    return total
