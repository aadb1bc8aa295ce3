"""Transparent huge pages for weights that a library other than mmfuse allocates (onnxruntime's
prepacked matrices).

Batch-1 decoding streams every weight once a step, and streams faster from 2 MiB pages than from
4 KiB ones (bench/stream_chunks.cpp). mmfuse puts its own PyTorch weights there when it allocates
them (`mmfuse.nn.weight_arena`); onnxruntime copies the weights of a graph into buffers of its own
while the session loads, in 4 KiB pages on a system whose huge pages are opt-in (`madvise`, the
usual setting). `collapse_new_memory` wraps such a load: the anonymous memory that appears during
it is then, wherever whole huge pages of it are filled, marked for huge pages and collapsed into
them (`MADV_COLLAPSE`, Linux 6.1+). Both are hints that leave the contents alone; where the system
refuses them nothing changes. Memory reused from earlier frees, inside regions that existed
before, is not seen. Torch-free (the ONNX Runtime engine uses it): it imports numpy only.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from typing import Iterator, List, Set, Tuple

import numpy as np

from . import envs

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
PAGE = mmap.PAGESIZE
MIN_BYTES = 2 * HUGE_PAGE  # less new memory than this lives in the caches anyway
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14+: a range's pages faulted in by one call, huge pages included
MADV_COLLAPSE = 25  # Linux 6.1+: a range's pages copied into huge pages now
FILLED = 0.75  # a huge page's worth of memory is collapsed from this share of resident pages (not a reserve)

Region = Tuple[int, int]  # [start, end) addresses


def anonymous_regions() -> Set[Region]:
    """The process's anonymous private writable mappings: unnamed, or malloc's `[heap]` (/proc/self/maps)."""
    regions = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1].startswith("rw") and fields[1][3] == "p" and (len(fields) == 5 or fields[5] == "[heap]"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                regions.add((lo, hi))
    return regions


def new_memory(before: Set[Region], after: Set[Region]) -> List[Region]:
    """The address ranges of `after` that no region of `before` covered. A new allocation can merge
    into the mapping beside it, so a region that grew gives only its new part."""
    old = sorted(before)
    gaps = []
    for lo, hi in sorted(after - before):
        at = lo
        for a, b in old:
            if a < hi and lo < b:
                if a > at:
                    gaps.append((at, a))
                at = max(at, b)
        if at < hi:
            gaps.append((at, hi))
    return gaps


def filled_runs(lo: int, hi: int) -> List[Region]:
    """The runs of whole huge pages in [lo, hi) of which at least FILLED is resident (mincore)."""
    start, end = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return []
    resident = np.zeros((end - start) // PAGE, np.uint8)
    if _libc().mincore(start, end - start, resident.ctypes.data):
        return []
    filled = (resident & 1).reshape(-1, HUGE_PAGE // PAGE).mean(axis=1) >= FILLED
    edges = np.flatnonzero(np.diff(np.concatenate([[False], filled, [False]]).astype(np.int8)))
    return [(start + int(a) * HUGE_PAGE, start + int(b) * HUGE_PAGE) for a, b in zip(edges[::2], edges[1::2])]


def collapse(lo: int, hi: int) -> int:
    """Mark [lo, hi) (whole huge pages) for huge pages and collapse it now; the bytes collapsed: 0
    where the system refuses (older kernels, huge pages off, none free), and the memory then stays
    as it is."""
    madvise = _libc().madvise
    if madvise(lo, hi - lo, MADV_HUGEPAGE) or madvise(lo, hi - lo, MADV_COLLAPSE):
        return 0
    return hi - lo


@contextlib.contextmanager
def collapse_new_memory() -> Iterator[list]:
    """Run the block, then collapse into huge pages the filled huge pages of the anonymous memory
    that appeared during it (at least MIN_BYTES in a range); the list it yields then holds the bytes
    collapsed per run. Nothing happens with `MMFUSE_HUGE_PAGES=0` or off Linux."""
    collapsed: list = []
    if not sys.platform.startswith("linux") or not envs.read("MMFUSE_HUGE_PAGES"):
        yield collapsed
        return
    try:
        before = anonymous_regions()
    except OSError:  # no /proc (a sandbox): nothing to collapse
        before = None
    yield collapsed
    if before is None:
        return
    try:
        for lo, hi in new_memory(before, anonymous_regions()):
            if hi - lo >= MIN_BYTES:
                collapsed.extend(collapse(a, b) for a, b in filled_runs(lo, hi))
    except OSError:
        pass


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("madvise", "mincore"):
            fn = getattr(libc, name)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p if name == "mincore" else ctypes.c_int]
            fn.restype = ctypes.c_int
        _LIBC = libc
    return _LIBC
