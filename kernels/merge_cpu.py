"""CPU kernel of checkpoint merging: the weighted sum of K inputs, one tensor (or one piece of
one) per launch, around the element bodies of :mod:`._merge` (numba, parallel over chunks).

:func:`merge_kernel` ``(n, out_addr, acc_addr, in_addr, weights, start, finish, key, first, chunk)``:

    n:        elements in this launch.
    out_addr: address of the output, ``n`` elements of ``out_kind`` (the bits of float32,
              bfloat16 or float16 as uint32/uint16, or float64 values); written when ``finish``.
    acc_addr: address of ``n`` accumulator elements (float32, float64 for a wide kernel), read
              unless ``start`` and written unless ``finish``; 0 when ``start and finish``.
    in_addr:  int64[K] address of each input's ``n`` elements, all of ``in_kind``.
    weights:  float32[K] (float64[K] for a wide kernel), one per input, added in this order.
    start:    the sum begins at 0 (else at the accumulator).
    finish:   the sum is stored to the output (else to the accumulator, for the next launch).
    key:      uint32 stochastic-rounding key (ignored unless ``stochastic``).
    first:    int64 noise index of element 0 (the element's position in its whole tensor).
    chunk:    elements per work item (a tunable from the host).

Element ``j`` ends as ``fma(w[K-1], x_{K-1}[j], ... fma(w[0], x_0[j], 0))`` rounded to the
output kind: the same bits whether the K inputs come in one launch or in several (an input that
cannot be memory-mapped is read and added on its own), on every target. Each chunk sums into a
scratch buffer that stays in cache, inputs outer, elements inner: contiguous loops LLVM
vectorises. There is no CUDA merge yet (a merge is a host job: it reads files).
"""
import functools

import numpy as np
from numba import njit, prange
from numba.core import types as numba_types

from . import _cache, _merge
from .cpu import E as _E
from .cpu import _pointer
from .kinds import F64

# the merge's element bodies are functions of their own, which LLVM inlines when it links them (numba's
# inlining took every branch of a body: the kinds, the rounding; kernels/cpu.py E_CALLED): a merge's
# compile 41 s -> 27 s over tests/merge/test_merge_formats.py, its kernels within the noise (2-8 %)
M = _merge.bind(lambda fn: _cache.cached(njit(nogil=True)(fn)), _E)
DEPENDENCIES = _cache.DEPENDENCIES + (_merge,)
"""The modules this file's kernels depend on besides itself (the disk cache's stamp)."""


def _cached(dispatcher):
    """:func:`._cache.cached`, with :mod:`._merge` among the sources that make a cached kernel stale."""
    cls = _cache._cache_class()
    if cls is None:
        return _cache.cached(dispatcher)
    try:
        _cache._attach(dispatcher, cls, DEPENDENCIES)
    except RuntimeError as e:                   # no writable cache location: compiled in every process
        if not _cache.NOT_CACHED:
            _cache.NOT_CACHED.append(str(e))
    return dispatcher


@functools.cache
def merge_kernel(in_kind, out_kind, wide, stochastic, parallel):
    """The weighted sum of K inputs of storage ``in_kind`` into ``out_kind`` (see the module),
    accumulated in float32, or float64 when ``wide`` (always for float64 inputs or output);
    ``stochastic``: bfloat16 output rounded stochastically; ``parallel``: chunks under ``prange``."""
    WIDE = wide or in_kind == F64 or out_kind == F64
    XK, QK, SR = in_kind, out_kind, stochastic
    xptr, XB = _pointer(XK)
    qptr, QB = _pointer(QK)
    aptr, AB = _pointer(F64 if WIDE else 0)
    ACC = numba_types.float64 if WIDE else numba_types.float32
    term = M.merge_term_wide if WIDE else M.merge_term
    store_wide, bits = M.merge_store_wide, M.merge_bits
    as_float, as_bits = _E.as_float, _E.as_bits

    @_cached
    @njit(nogil=True)
    def piece(q_addr, a_addr, in_addr, weights, m, start, finish, key, index):
        s = np.empty(m, ACC)
        a = aptr(a_addr, m)
        if start:
            for j in range(m):
                s[j] = 0.0
        elif WIDE:
            for j in range(m):
                s[j] = a[j]
        else:                                      # a float32 accumulator travels as its bits
            for j in range(m):
                s[j] = as_float(a[j])
        for i in range(in_addr.size):
            p = xptr(in_addr[i], m)
            w = weights[i]
            for j in range(m):
                s[j] = term(s[j], p, j, w, XK)
        if not finish:
            for j in range(m):
                if WIDE:
                    a[j] = s[j]
                else:
                    a[j] = as_bits(s[j])
            return
        q = qptr(q_addr, m)
        for j in range(m):
            if WIDE:
                store_wide(q, j, s[j], QK, SR, key, index + j)
            else:
                q[j] = bits(s[j], QK, SR, key, index + j)

    def kernel(n, out_addr, acc_addr, in_addr, weights, start, finish, key, first, chunk):
        pieces = (n + chunk - 1) // chunk
        for c in prange(pieces):
            lo = c * chunk
            m = min(chunk, n - lo)
            at = in_addr + lo * XB                 # every input's piece (a new small array per piece)
            piece(out_addr + lo * QB, acc_addr + lo * AB if acc_addr != 0 else 0, at, weights, m, start, finish,
                  key, first + lo)

    return _cached(njit(parallel=parallel, nogil=True)(kernel))
