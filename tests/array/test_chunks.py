"""ChunkedSources (fastema/_chunks.py), what an offloaded average streams its sources through: every
group's row cut into windows of at most one chunk, each packed into a chunk and folded from a host copy
of it into the window's columns of a host shadow. Whatever the sizes, chunk, split and dtypes, the
windows hold every element once, and packing and folding window by window gives the plain shadow's
bits (stochastic rounding included). The GPU layout (16-byte aligned pieces, CUDA pack tables and the
chunk's device-to-host copy) runs in the Numba CUDA simulator or on a GPU."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastema import FlatShadow
from fastema._checks import sr_key
from fastema._chunks import ChunkedSources
from fastema.kernels.kinds import ITEMSIZE


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _host_rows(cs: ChunkedSources, rows: int) -> list[torch.Tensor]:
    from fastema._backends.torch import dtype_of

    return [torch.zeros((rows, g.n), dtype=dtype_of(g.shadow_kind)) for g in cs.layout.groups]


def _check(sizes, chunk, dtype, rounding, rows, split, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    src = [torch.randn(n, generator=gen).to(torch.bfloat16 if i % 3 == 2 else torch.float32)
           for i, n in enumerate(sizes)]
    decays = [0.9, 0.5, 0.99][:rows]
    plain = FlatShadow(src, rows=rows, dtype=dtype, split=split)
    cs = ChunkedSources(src, dtype=dtype, chunk_bytes=chunk, split=split)
    hosts = _host_rows(cs, rows)
    nbytes = max((cs.nbytes_of(i) for i in range(len(cs.windows))), default=0)
    chunks = [torch.zeros(max(nbytes, 1), dtype=torch.uint8) for _ in range(2)]

    # every held element in exactly one window, every window within one chunk
    for gi, g in enumerate(cs.layout.groups):
        held = np.zeros(g.n, np.int64)
        for w in (w for w in cs.windows if w.gi == gi):
            assert w.extent * ITEMSIZE[g.src_kind] <= chunk
            for c, n in zip(w.col, w.count):
                held[c:c + n] += 1
            assert (np.diff(w.place) == w.count[:-1]).all()          # the pieces' places follow each other
        real = np.zeros(g.n, np.int64)
        for s, f, n in zip(g.pieces, g.piece_first, g.piece_count):
            col = g.starts[s] + f - g.lo
            real[col:col + n] = 1
        assert (held == real).all()

    for i, w in enumerate(cs.windows):                                 # rows <- the sources
        cs.pack(i, chunks[i % 2].data_ptr())
        cs.copy_in(i, chunks[i % 2].data_ptr(), hosts[w.gi].data_ptr(), rows)
    for step in range(steps):
        for t in src:
            t.add_(torch.randn(t.shape, generator=gen).to(t.dtype))
        plain.update(decays, rounding=rounding, seed=7, step=step)
        weights = tuple(1 - d for d in decays)
        for i, w in enumerate(cs.windows):
            cs.pack(i, chunks[i % 2].data_ptr())
            key = sr_key(7 + (w.gi << 32), step) if rounding == "stochastic" else 0
            cs.fold(i, chunks[i % 2].data_ptr(), hosts[w.gi].data_ptr(), weights, rounding == "stochastic", key)
    for (buffer, pieces), host in zip(plain.pieces(), hosts):
        for _, _, n, col in pieces:
            assert torch.equal(_bits(buffer[:, col:col + n]), _bits(host[:, col:col + n]))


@pytest.mark.parametrize("chunk", [16, 40, 1000, 1 << 20])
@pytest.mark.parametrize("dtype,rounding", [("float32", "nearest"), ("bfloat16", "stochastic"), ("same", "nearest")])
@pytest.mark.parametrize("split", [None, (0, 3), (2, 3)])
def test_window_by_window_equals_the_plain_shadow(chunk, dtype, rounding, split):
    _check([15, 7, 1, 130, 48, 0, 10, 33, 4096, 5], chunk, dtype, rounding, 3, split)


@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12), chunk=st.integers(16, 700),
       ranks=st.integers(1, 4), stochastic=st.booleans(), data=st.data())
def test_any_sizes_chunks_and_slices_are_cut_and_folded_exactly(sizes, chunk, ranks, stochastic, data):
    rank = data.draw(st.integers(0, ranks - 1))
    _check(sizes, chunk, "bfloat16" if stochastic else "float32", "stochastic" if stochastic else "nearest", 2,
           (rank, ranks) if ranks > 1 else None, steps=2)


def test_a_chunk_below_16_bytes_is_refused_by_name():
    with pytest.raises(ValueError, match="offload_chunk must be a number of bytes >= 16"):
        ChunkedSources([torch.zeros(4)], dtype="float32", chunk_bytes=8)


def test_moved_sources_are_packed_from_their_new_place():
    src = [torch.arange(100, dtype=torch.float32), torch.ones(30)]
    cs = ChunkedSources(src, dtype="float32", chunk_bytes=64)
    chunk = torch.zeros(64, dtype=torch.uint8)
    cs.pack(0, chunk.data_ptr())                                       # tables made for the first addresses
    moved = [src[0] * 2, src[1]]
    cs.rebind(moved)
    cs.pack(0, chunk.data_ptr())
    assert torch.equal(chunk.view(torch.float32), moved[0][:16])


@pytest.fixture
def small_cuda_launches():
    """Small launches (the simulator's speed), fewer blocks than chunks (grid-stride)."""
    from fastema._launch import config

    with config.tuned(CUDA_CHUNK=16, CUDA_THREADS=8, CUDA_MAX_BLOCKS=3):
        yield


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                    reason="needs a CUDA GPU or NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize("dtype,rounding", [("float32", "nearest"), ("float16", "nearest")])
@pytest.mark.usefixtures("small_cuda_launches")
def test_the_gpu_layout_packs_aligned_pieces_and_folds_them_exactly(dtype, rounding):
    """Sources on a (simulated) GPU: pieces start 16-byte aligned in the chunk, the pack tables live on
    the device, the chunk comes back with a device-to-host copy, and the host fold equals a FlatShadow
    of the same sources on the device (padded GPU layout) bit for bit."""
    from numba import cuda

    from fastema._backends import describe

    def at(a) -> int:
        return describe(a.view(np.float32) if a.dtype == np.uint8 else a, "buffer").address

    rng = np.random.default_rng(0)
    src = [cuda.to_device(rng.standard_normal(n).astype(np.float32)) for n in (5, 17, 1, 40, 64, 3)]
    for chunk, split in ((100, None), (64, (1, 2))):
        plain = FlatShadow(src, rows=2, dtype=dtype, split=split)
        cs = ChunkedSources(src, dtype=dtype, chunk_bytes=chunk, split=split)
        assert all((w.off % 4 == 0).all() for w in cs.windows)         # 16 bytes of float32
        kind = {"float32": np.float32, "float16": np.float16, "same": np.float32}[dtype]
        hosts = [np.zeros((2, g.n), kind) for g in cs.layout.groups]
        nbytes = -(-max(cs.nbytes_of(i) for i in range(len(cs.windows))) // 4) * 4
        chunks = [cuda.device_array(nbytes, np.uint8) for _ in range(2)]
        slots = [np.zeros(nbytes, np.uint8) for _ in range(2)]
        stream = cuda.stream()

        def stage(i):
            c = i % 2
            cs.pack(i, at(chunks[c]))
            chunks[c].copy_to_host(slots[c], stream=stream)           # the device-to-host copy
            stream.synchronize()
            return at(slots[c])

        for i, w in enumerate(cs.windows):
            cs.copy_in(i, stage(i), at(hosts[w.gi]), 2)
        for step in range(2):
            for s in src:
                s.copy_to_device(rng.standard_normal(s.shape[0]).astype(np.float32))
            plain.update([0.9, 0.5], step=step)
            for i, w in enumerate(cs.windows):
                cs.fold(i, stage(i), at(hosts[w.gi]), (0.1, 0.5), False, 0)
        for (buffer, pieces), host in zip(plain.pieces(), hosts):
            got = buffer.copy_to_host()
            for _, _, n, col in pieces:
                assert (got[:, col:col + n].view(np.uint8) == host[:, col:col + n].view(np.uint8)).all(), chunk
