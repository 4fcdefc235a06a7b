"""The CUDA kernel of a smoother's streams (:func:`streams_kernel`), re-exported by :mod:`.cuda`: the
EMA and the SMA of K metric streams in one launch, one stream a thread (grid-stride over streams)."""

from numba import cuda

from ._cuda_jit import E, jit
from ._store.identity import variant as _variant
from .kinds import SMA_PART


@_variant
def streams_kernel(kind, parts, skip, weighted):
    """See :func:`fastema.kernels.cpu.streams_kernel` (same arguments and bodies).

    Unweighted, each thread issues every load of its stream before it waits for any (the value, the
    pair (a, b), the ring entry it replaces, the pair (s, comp) and ``n``: 16-byte pairs), and moves
    96 bytes a stream for float64 values with the EMA and the SMA (40 the EMA alone, 64 the SMA
    alone; 4 fewer for float32 values, 6 for 16-bit ones)."""
    K, P, SKIP, WEIGHTED = kind, parts, skip, weighted
    SMA = bool(parts & SMA_PART)
    streams_at, weighted_at, widen_at = E.streams_at, E.streams_weighted_at, E.streams_widen_at

    def kernel(y, w0, c, per_stream, mode, d, ab, ring_v, sc, n, ring_w, wsc, bad, slot, filled, widen):
        size = y.size
        base = slot * size
        full = filled * size == ring_v.size
        for k in range(cuda.grid(1), size, cuda.gridsize(1)):
            if WEIGHTED:
                if SMA and widen:
                    widen_at(k, size, ring_v, ring_w, wsc, n, bad, filled, SKIP)
                weighted_at(y, k, w0, c, per_stream, mode, d, ab, ring_v, sc, n, ring_w, wsc, bad, base + k, K, P,
                            SKIP)
            else:
                streams_at(y, k, mode, d, ab, ring_v, sc, n, base + k, full, K, P, SKIP)

    return jit(kernel)
