"""The CUDA ``skip_nonfinite`` scan (:func:`nonfinite_kernel`), re-exported by :mod:`.cuda`: a streaming
kernel of its own, vectorised (16-byte loads, two a thread in flight) and branch-light."""

import numpy as np
from numba import cuda

from ._cuda_hw import VECTORS
from ._cuda_jit import M16, S16, E, jit, pointer
from ._store.identity import variant as _variant
from ._target import bodies
from .kinds import F64, ITEMSIZE

SCAN_BOUNDS = (256, 6)
"""The launch bounds of :func:`nonfinite_kernel`: 6 blocks per multiprocessor (40 registers; 50 without
them, 4 blocks): two 16-byte loads a thread in flight, 48 KiB per SM."""


@_variant
def nonfinite_kernel(src_kind):
    """See :func:`fastema.kernels.cpu.nonfinite_kernel`.

    Branch-light: a thread ORs what it finds into a register and stores the flag once, at its end
    (only if it found something and the flag is not set yet: no store storm on a diverged model).
    Each chunk goes by 16-byte vectors (4 float32 or 8 16-bit elements), two a thread before it tests
    any: from the first 16-byte boundary of the source on, the few elements before it (an unaligned
    start) and after the last whole vector taken one by one. float64 sources go element by element.
    """
    xptr = pointer(src_kind)
    XK = src_kind
    nonfinite_at, = bodies(E, XK == F64, "nonfinite_at")
    is_nonfinite = E.is_nonfinite
    VEC = XK != F64
    XB = ITEMSIZE[XK]
    PER = 16 // XB                                       # elements per 16-byte vector
    load4 = VECTORS["load4_u32"]

    @cuda.jit(device=True, inline="always")
    def word_bad(w):
        """Whether the 32-bit word ``w`` (one float32, or two 16-bit elements) holds an inf or NaN."""
        if XB == 4:
            return is_nonfinite(w, XK)
        return is_nonfinite(w & M16, XK) | is_nonfinite(w >> S16, XK)

    @cuda.jit(device=True, inline="always")
    def vector_bad(a0, a1, a2, a3):
        return word_bad(a0) | word_bad(a1) | word_bad(a2) | word_bad(a3)

    def kernel(seg_addr, seg_offset, chunk_seg, chunk_begin, flag):
        step = cuda.blockDim.x
        bad = False
        for c in range(cuda.blockIdx.x, chunk_seg.size, cuda.gridDim.x):
            s = chunk_seg[c]
            off = seg_offset[s]
            lo = chunk_begin[c] - off                    # the chunk, as positions within its source
            m = chunk_begin[c + 1] - off - lo            # its elements
            pa = seg_addr[s]
            head, vectors = m, 0                         # element by element: the head, then the tail
            if VEC and pa % XB == 0:
                head = min(((-(pa + lo * XB)) & 15) // XB, m)    # elements before the first 16-byte boundary
                vectors = np.int32((m - head) // PER)       # 32-bit counters: fewer registers
                base = pa + (lo + head) * XB
                for v in range(np.int32(cuda.threadIdx.x), vectors, np.int32(2 * step)):
                    a = base + 16 * v
                    b = a + 16 * step if v + step < vectors else a   # no second vector: the first again
                    a0, a1, a2, a3 = load4(a)
                    b0, b1, b2, b3 = load4(b)            # both loads issued before either is tested
                    bad |= vector_bad(a0, a1, a2, a3) | vector_bad(b0, b1, b2, b3)
            p = xptr(pa, seg_offset[s + 1] - off)
            mid = head + PER * vectors                   # the tail starts there
            for t in range(cuda.threadIdx.x, m - mid + head, step):
                bad |= nonfinite_at(p, lo + (t if t < head else t - head + mid), XK)
        if bad and flag[0] == 0:
            flag[0] = 1

    return jit(kernel, launch_bounds=SCAN_BOUNDS)
