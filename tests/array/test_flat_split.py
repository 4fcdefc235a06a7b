"""A FlatShadow split over ranks (``split=(rank, ranks)``, what ``shard_replicas`` builds on): each
rank's slice, updated alone, holds the whole shadow's elements bit for bit, stochastic rounding
included (its noise keyed by the element's place in the whole group), in slices that are contiguous,
16-byte aligned and balanced. All ranks live in one process here: the split needs no communication."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastema import FlatShadow
from fastema._layout import window


def _real(g) -> np.ndarray:
    """The columns of a whole group's row that hold elements (not the GPU layout's padding)."""
    return np.concatenate([np.arange(s, s + c) for s, c in zip(g.starts, g.counts)])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _check_split_equals_whole(sizes, dtype, rounding, rows, ranks, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = [torch.randn(n, generator=gen).to(torch.bfloat16 if i % 3 == 2 else torch.float32)
           for i, n in enumerate(sizes)]
    decays = [0.9, 0.5, 0.99][:rows]
    whole = FlatShadow(src, rows=rows, dtype=dtype)
    parts = [FlatShadow(src, rows=rows, dtype=dtype, split=(r, ranks)) for r in range(ranks)]
    for step in range(steps):
        for t in src:
            t.add_(torch.randn(t.shape, generator=gen).to(t.dtype))
        whole.update(decays, rounding=rounding, seed=7, step=step)
        for p in parts:
            p.update(decays, rounding=rounding, seed=7, step=step)
    for gi, g in enumerate(whole.layout.groups):
        joined = torch.cat([p.pieces()[gi][0] for p in parts], dim=1)
        assert joined.shape == g.buffer.shape
        real = torch.from_numpy(_real(g))
        assert torch.equal(_bits(joined[:, real]), _bits(g.buffer[:, real])), (gi, ranks)
        unit = 16 // g.buffer.element_size()
        for p in parts:
            held = p.layout.groups[gi]
            assert held.n <= -(-g.whole // ranks) + unit                       # balanced
            assert held.lo % unit == 0                                          # 16-byte aligned
    assert sum(p.nbytes for p in parts) == whole.nbytes


@pytest.mark.parametrize("dtype,rounding", [("float32", "nearest"), ("bfloat16", "nearest"),
                                            ("bfloat16", "stochastic"), ("same", "nearest")])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7])
def test_the_slices_updated_apart_are_the_whole_shadow_bit_for_bit(dtype, rounding, ranks):
    _check_split_equals_whole([15, 7, 1, 130, 48, 10, 33, 4096, 5], dtype, rounding, 3, ranks, 6)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=9).filter(any),
       ranks=st.integers(1, 9), rows=st.integers(1, 3), stochastic=st.booleans())
def test_any_sizes_and_rank_count_split_exactly(sizes, ranks, rows, stochastic):
    _check_split_equals_whole(sizes, "bfloat16" if stochastic else "float32",
                              "stochastic" if stochastic else "nearest", rows, ranks, 3)


def test_the_windows_tile_the_row_in_aligned_balanced_slices():
    for n in (0, 1, 3, 4, 17, 64, 1000, 4099):
        for ranks in (1, 2, 3, 8, 13):
            cuts = [window(n, 4, (r, ranks)) for r in range(ranks)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))          # contiguous, no gap or overlap
            assert all(lo % 4 == 0 and hi - lo <= -(-n // ranks) + 4 for lo, hi in cuts)


def test_a_rank_that_holds_nothing_updates_nothing_and_the_others_are_exact():
    src = [torch.randn(3)]
    parts = [FlatShadow(src, split=(r, 4)) for r in range(4)]
    assert [p.layout.groups[0].n for p in parts] == [0, 0, 0, 3]
    src[0].fill_(1.0)
    for p in parts:
        p.update(0.5)
    assert parts[3].pieces()[0][0].shape == (1, 3)


def test_a_split_shadow_has_no_whole_views_and_says_why():
    src = [torch.randn(10), torch.randn(10)]
    part = FlatShadow(src, split=(0, 2))
    with pytest.raises(RuntimeError, match="shard_replicas"):
        part.view(1)
    with pytest.raises(ValueError, match="rank, ranks"):
        FlatShadow(src, split=(2, 2))
    for call in (part.swap, part.copy_to_sources):              # this rank's slice alone: the sources half done
        with pytest.raises(RuntimeError, match="split shadow"):
            call()


def test_moved_sources_are_followed_piece_by_piece():
    """``param.data = new`` moves a source: the pieces' addresses follow it (each at its offset)."""
    src = [torch.randn(40), torch.randn(40)]
    whole, part = FlatShadow(src), FlatShadow(src, split=(1, 2))
    src[1] = src[1].clone() + 1
    whole.update(0.5, sources=src)
    part.update(0.5, sources=src)
    lo = part.layout.groups[0].lo
    assert torch.equal(part.pieces()[0][0], whole.pieces()[0][0][:, lo:])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                    reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_gpu_layout_splits_exactly_too(dtype):
    """The GPU layout pads every source to 16 bytes; a slice keeps the padding where the whole row has
    it, so its vector paths stay aligned, and a rank that holds nothing still launches (one block).
    (The simulator runs every launch's threads in Python: the ranks that hold nothing come from 2
    small sources, 2-3 units of 16 bytes over 5 ranks, not from 40 ranks over the 5 sources.)"""
    from numba import cuda

    from fastema._launch import config

    rng = np.random.default_rng(0)
    sizes = (5, 17, 1, 40, 64)
    # the simulator runs each of a block's threads in Python: a warp a block walks the same layout
    # (the kernels stride by the block's size) in a sixth of the time (20 s -> 3 s); a GPU runs 256
    simulated = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    with config.tuned(CUDA_THREADS=32) if simulated else contextlib.nullcontext():
        _split_exactly(cuda, rng, sizes, dtype)


def _split_exactly(cuda, rng, sizes, dtype):
    for ranks, shape in ((2, sizes), (3, sizes), (5, sizes), (5, (5, 1))):
        src = [cuda.to_device(rng.standard_normal(n).astype(np.float32)) for n in shape]
        whole = FlatShadow(src, rows=2, dtype=dtype)
        parts = [FlatShadow(src, rows=2, dtype=dtype, split=(r, ranks)) for r in range(ranks)]
        for step in range(3):
            for s in src:
                s.copy_to_device(rng.standard_normal(s.shape[0]).astype(np.float32))
            whole.update([0.9, 0.5], step=step)
            for p in parts:
                p.update([0.9, 0.5], step=step)
        g = whole.layout.groups[0]
        real = _real(g)
        w = np.ascontiguousarray(whole.pieces()[0][0].copy_to_host()[:, real])
        c = np.ascontiguousarray(np.concatenate([p.pieces()[0][0].copy_to_host() for p in parts], axis=1)[:, real])
        assert (w.view(np.uint8) == c.view(np.uint8)).all(), ranks
        held = [p.layout.groups[0].n for p in parts]
        assert sum(held) == g.whole and (0 in held) == (shape != sizes), (ranks, held)


def test_every_slice_scans_the_whole_sources_so_every_rank_skips_alike():
    """skip_nonfinite under a split: a NaN anywhere in the sources stops every rank's fold (each rank
    scans its whole replica: the same decision everywhere with no collective), as the whole shadow's."""
    src = [torch.randn(64), torch.randn(64)]
    whole = FlatShadow(src)
    parts = [FlatShadow(src, split=(r, 2)) for r in range(2)]
    src[1][60] = float("nan")                                   # in rank 1's slice only
    for s in [whole, *parts]:
        s.update(0.5, skip_nonfinite=True)
        assert int(s.skipped["cpu"][0]) == 1
    assert torch.equal(torch.cat([p.pieces()[0][0] for p in parts], 1), whole.pieces()[0][0])
    src[1][60] = 1.0
    moved = [src[0], src[1].clone()]                           # a moved source is scanned at its new place
    moved[1][3] = float("inf")
    for s in [whole, *parts]:
        s.update(0.5, skip_nonfinite=True, sources=moved)
        assert int(s.skipped["cpu"][0]) == 1


@pytest.mark.parametrize("ring_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_a_window_split_over_ranks_keeps_the_whole_windows_elements(ring_dtype, ranks):
    """``WindowShadow(split=)``: each rank's slice of the mean, the compensated sums and the ring, pushed
    apart past the window's recompute, is the whole window's bit for bit; its views are its pieces."""
    from fastema import WindowShadow

    gen = torch.Generator().manual_seed(3)
    src = [torch.randn(n, generator=gen) for n in (15, 7, 1, 130, 48, 4096, 5)]
    whole = WindowShadow(src, 3, ring_dtype=ring_dtype)
    parts = [WindowShadow(src, 3, ring_dtype=ring_dtype, split=(r, ranks)) for r in range(ranks)]
    for _ in range(7):                                           # the ring wraps twice; the sum is rebuilt
        for t in src:
            t.add_(torch.randn(t.shape, generator=gen))
        for w in (whole, *parts):
            w.push()
    for i in range(len(src)):
        for view in ("state_view", "ring_view"):
            joined = torch.cat([getattr(p, view)(i) for p in parts], dim=1)
            want = getattr(whole, view)(i)
            assert torch.equal(_bits(joined), _bits(want.reshape(want.shape[0], -1))), (i, view)
        assert torch.equal(torch.cat([p.view(i) for p in parts]), whole.view(i))
    assert sum(p.nbytes for p in parts) == whole.nbytes
    if ranks > 1:
        for call in (parts[0].swap, parts[0].copy_to_sources):
            with pytest.raises(RuntimeError, match="split shadow"):
                call()
