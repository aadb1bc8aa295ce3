"""Huge pages for memory mmfuse does not allocate itself (engine/huge_pages.py): onnxruntime's
weight buffers collapsed after a session loads, with the same results; nothing done when switched off."""
from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

from mmfuse import huge_pages
from mmfuse.huge_pages import HUGE_PAGE, PAGE, anonymous_regions, collapse, collapse_new_memory, filled_runs, new_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")


def huge_bytes(lo: int, hi: int) -> int:
    """AnonHugePages of the mappings inside [lo, hi) (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()
            if "-" in first[0] and len(first) >= 5:
                a, b = (int(x, 16) for x in first[0].split("-"))
                inside = lo <= a and b <= hi
            elif inside and first[0] == "AnonHugePages:":
                total += int(first[1]) * 1024
    return total


def anonymous(n: int, touch) -> np.ndarray:
    """n bytes of a new private anonymous mapping (as a large allocation gets); `touch`: True (every
    page) or a slice of the pages to touch."""
    a = np.frombuffer(mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), np.uint8)
    if touch is not False:
        a.reshape(-1, PAGE)[slice(None) if touch is True else touch, 0] = 1
    return a


def overlap(a: np.ndarray, lo: int, hi: int) -> int:
    return max(0, min(hi, a.ctypes.data + a.nbytes) - max(lo, a.ctypes.data))


def test_anonymous_regions_see_a_new_mapping():
    before = anonymous_regions()
    a = anonymous(6 * HUGE_PAGE + PAGE, False)
    lo, hi = a.ctypes.data, a.ctypes.data + a.nbytes
    assert any(r_lo <= lo and hi <= r_hi for r_lo, r_hi in anonymous_regions())
    assert sum(b - a_ for a_, b in new_memory(before, anonymous_regions())) >= hi - lo


def test_new_memory_of_regions_that_grew_or_appeared():
    M = HUGE_PAGE
    before = {(0, 4 * M), (10 * M, 12 * M)}
    after = {(0, 4 * M), (10 * M, 20 * M), (30 * M, 31 * M)}  # unchanged, grew, appeared
    assert new_memory(before, after) == [(12 * M, 20 * M), (30 * M, 31 * M)]
    assert new_memory(before, {(8 * M, 14 * M)}) == [(8 * M, 10 * M), (12 * M, 14 * M)]  # grew on both sides
    assert new_memory(before, before) == []


def test_filled_runs_take_whole_filled_huge_pages():
    per = HUGE_PAGE // PAGE
    a = anonymous(10 * HUGE_PAGE, False)
    lo = a.ctypes.data
    first = -lo % HUGE_PAGE // PAGE  # the first whole huge page's first page
    pages = a.reshape(-1, PAGE)
    for k in (1, 2, 5):
        pages[first + k * per:first + (k + 1) * per, 0] = 1
    pages[first + 3 * per:first + 3 * per + per // 2, 0] = 1  # half: not filled
    pages[first + 6 * per:first + 7 * per:8, 0] = 1  # an eighth: not filled
    base = lo + first * PAGE
    assert filled_runs(lo, lo + a.nbytes) == [(base + HUGE_PAGE, base + 3 * HUGE_PAGE),
                                              (base + 5 * HUGE_PAGE, base + 6 * HUGE_PAGE)]
    assert filled_runs(base + HUGE_PAGE + PAGE, base + 3 * HUGE_PAGE) == [(base + 2 * HUGE_PAGE, base + 3 * HUGE_PAGE)]
    assert filled_runs(base, base + HUGE_PAGE - 1) == []


def test_collapse_keeps_the_values():
    rng = np.random.default_rng()
    m = mmap.mmap(-1, 9 * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, np.float32)
    values = rng.standard_normal(a.size).astype(np.float32)
    a[:] = values
    runs = filled_runs(a.ctypes.data, a.ctypes.data + a.nbytes)
    assert sum(hi - lo for lo, hi in runs) >= 8 * HUGE_PAGE
    done = [collapse(lo, hi) for lo, hi in runs]
    np.testing.assert_array_equal(a, values)
    if not any(done):
        pytest.skip("this kernel collapses no huge pages (MADV_COLLAPSE: Linux 6.1+, THP not 'never')")
    assert done == [hi - lo for lo, hi in runs]
    assert huge_bytes(a.ctypes.data, a.ctypes.data + a.nbytes) >= sum(done) - 4 * HUGE_PAGE  # merges may hide a few
    del a
    m.close()


def test_collapse_new_memory_takes_only_new_filled_memory(monkeypatch):
    old = anonymous(4 * HUGE_PAGE, True)  # before the block: left alone
    asked = []
    monkeypatch.setattr(huge_pages, "collapse", lambda lo, hi: asked.append((lo, hi)) or 0)
    monkeypatch.setenv("MMFUSE_HUGE_PAGES", "1")
    with collapse_new_memory() as collapsed:
        filled = anonymous(6 * HUGE_PAGE, True)
        empty = anonymous(6 * HUGE_PAGE, False)  # reserved, never touched (a thread's stack)
    assert collapsed == [0] * len(asked)
    assert sum(overlap(filled, lo, hi) for lo, hi in asked) >= 5 * HUGE_PAGE  # every whole huge page of it
    assert not any(overlap(old, lo, hi) for lo, hi in asked)
    assert sum(overlap(empty, lo, hi) for lo, hi in asked) < HUGE_PAGE // 2  # at most a page it shares with `filled`


def test_no_proc_maps_skips_quietly(monkeypatch):
    def unreadable():
        raise PermissionError("/proc/self/maps")

    monkeypatch.setattr(huge_pages, "anonymous_regions", unreadable)
    monkeypatch.setenv("MMFUSE_HUGE_PAGES", "1")
    with collapse_new_memory() as collapsed:
        filled = anonymous(6 * HUGE_PAGE, True)
    assert collapsed == [] and filled.sum() == 6 * HUGE_PAGE // PAGE


def test_switched_off_does_nothing(monkeypatch):
    monkeypatch.setattr(huge_pages, "collapse", lambda lo, hi: pytest.fail("collapse called with MMFUSE_HUGE_PAGES=0"))
    monkeypatch.setattr(huge_pages, "anonymous_regions", lambda: pytest.fail("smaps read with MMFUSE_HUGE_PAGES=0"))
    monkeypatch.setenv("MMFUSE_HUGE_PAGES", "0")
    with collapse_new_memory() as collapsed:
        np.ones(6 * HUGE_PAGE // 4, np.float32)
    assert collapsed == []


@pytest.mark.parametrize("flag", ["1", "0"])
def test_onnxruntime_session_weights(monkeypatch, tmp_path, flag):
    """A session whose weights (16 MiB) onnxruntime copies at load computes the same with them
    collapsed; with the flag on, that memory is in huge pages where the kernel grants them."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from mmfuse.ort.session import make_session

    rng = np.random.default_rng()
    K, N = 1031, 4099  # odd shapes
    w = rng.standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", N])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "matmul.onnx"
    onnx.save(model, str(path))
    monkeypatch.setenv("MMFUSE_HUGE_PAGES", flag)
    before = total_huge()
    sess = make_session(path, threads=1)
    gained = total_huge() - before
    x = rng.standard_normal((3, K)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], (x.astype(np.float64) @ w).astype(np.float32),
                               rtol=1e-4, atol=1e-3)
    if flag == "1":
        if gained == 0:
            pytest.skip("this kernel collapses no huge pages")
        assert gained >= 4 * HUGE_PAGE  # most of the 16 MiB


def total_huge() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:"))
