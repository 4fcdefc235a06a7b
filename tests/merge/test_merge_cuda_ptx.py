"""The merge kernel's CUDA twin compiles for a real GPU (sm_90 PTX) without one: numba-cuda's real
typing and lowering of the merge bodies, pointers and intrinsics. Skipped without NVVM and NVRTC
(``pip install "fastema[cuda]"``) and under the simulator."""
import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("compiles the real target, not the simulator", allow_module_level=True)
try:
    from numba import cuda
    from numba.cuda import types as T

    def _probe(a):
        a[0] = 1

    cuda.compile_ptx(_probe, (T.Array(T.int32, 1, "C"),), cc=(9, 0))
except Exception as err:                                    # numba-cuda or its compilers missing
    pytest.skip(f"needs numba-cuda with NVVM and NVRTC ({err.__class__.__name__})", allow_module_level=True)

from fastema.kernels import merge_cuda  # noqa: E402
from fastema.kernels.kinds import BF16, F16, F32, F64  # noqa: E402


@pytest.mark.parametrize("ik, ok, wide, sr", [(F32, F32, False, False), (BF16, BF16, False, True),
                                              (F16, F32, True, False), (F64, F64, True, False)])
def test_merge_kernel_compiles_to_ptx(ik, ok, wide, sr):
    w = T.float64 if wide or F64 in (ik, ok) else T.float32
    sig = (T.int64, T.int64, T.int64, T.Array(T.int64, 1, "C"), T.Array(w, 1, "C"), T.boolean, T.boolean, T.uint32,
           T.int64)
    ptx, _ = cuda.compile_ptx(merge_cuda.merge_kernel(ik, ok, wide, sr).py_func, sig, cc=(9, 0))
    assert ".entry" in ptx and ("fma.rn" in ptx)
